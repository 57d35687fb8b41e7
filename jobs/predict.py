"""Score an image folder with the best model: predictions Parquet + Kaggle submission.csv.

Locally:      python jobs/predict.py --config configs/local.yaml [--model URI] [--input URI] [--output URI] [--full]
On a cluster: ray job submit --working-dir . -- python jobs/predict.py --config configs/gpu.yaml

A rerun into the same output scores only new or changed images, and a killed run resumes where it
stopped; ``--full`` re-scores everything.
Same options as `catdog predict`; --verbose shows Ray's own output.
The last stdout line is the URI of ``submission.csv``.
"""

import sys

from catdog.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("predict"))
