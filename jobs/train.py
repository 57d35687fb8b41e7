"""Train every architecture in ``models:`` and pick the best one on validation.

Locally:      python jobs/train.py --config configs/local.yaml [--set train.epochs=3] [--restart]
On a cluster: ray job submit --working-dir . -- python jobs/train.py --config configs/gpu.yaml

The last stdout line is the URI of the run's ``best.json``.
"""

import sys

from catdog.cli import job_parser, run_job
from catdog.train_job import run_training


def main() -> int:
    parser = job_parser(__doc__.splitlines()[0])
    parser.add_argument("--restart", action="store_true", help="move the previous run aside and start fresh")
    args = parser.parse_args()
    return run_job(args, lambda cfg: run_training(cfg, restart=args.restart))


if __name__ == "__main__":
    sys.exit(main())
