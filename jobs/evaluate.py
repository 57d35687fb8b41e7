"""Score the run's validation split (or a labelled image folder) and write metrics.json (accuracy, log loss, confusion).

Locally:      python jobs/evaluate.py --config configs/local.yaml [--input labelled-folder]
On a cluster: ray job submit --working-dir . -- python jobs/evaluate.py --config configs/gpu.yaml [--input s3://...]

Without --input it scores the validation split the model was trained with, never training images;
an --input that shares files with the training split gets a warning with their count.

Same options as `catdog evaluate`; --verbose shows Ray's own output.
The last stdout line is the URI of ``metrics.json``.
"""

import sys

from catdog.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("evaluate"))
