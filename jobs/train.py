"""Train every architecture in ``models:`` and pick the best one on validation.

Locally:      python jobs/train.py --config configs/local.yaml [--set train.epochs=3] [--restart]
On a cluster: ray job submit --working-dir . -- python jobs/train.py --config configs/gpu.yaml

Same options as `catdog train`; --verbose shows Ray's own output.
The last stdout line is the URI of the run's ``best.json``.
"""

import sys

from catdog.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("train"))
