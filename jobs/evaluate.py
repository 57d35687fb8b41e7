"""Score a labelled image folder and write metrics.json (accuracy, log loss, confusion matrix).

Locally:      python jobs/evaluate.py --config configs/local.yaml --input ../shared/data/dogs-vs-cats/train
On a cluster: ray job submit --working-dir . -- python jobs/evaluate.py --config configs/gpu.yaml --input s3://...

Same options as `catdog evaluate`; --verbose shows Ray's own output.
The last stdout line is the URI of ``metrics.json``.
"""

import sys

from catdog.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("evaluate"))
