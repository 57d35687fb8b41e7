"""Score the run's validation split (or a labelled image folder) and write metrics.json (accuracy, log loss, confusion).

Locally:      python jobs/evaluate.py --config configs/local.yaml [--input labelled-folder]
On a cluster: ray job submit --working-dir . -- python jobs/evaluate.py --config configs/gpu.yaml [--input s3://...]

Without --input it scores the validation split the model was trained with, never training images;
an --input that shares files with the training split gets a warning with their count.

The last stdout line is the URI of ``metrics.json``.
"""

import sys

from catdog.cli import job_parser, run_job
from catdog.inference import run_evaluate


def main() -> int:
    parser = job_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--input", help="labelled folder: cat.N.jpg/dog.N.jpg or cat(s)/ dog(s)/ (default: the validation split)"
    )
    parser.add_argument("--model", help="best.json or checkpoint folder (default: the run's best.json)")
    parser.add_argument("--output", help="output folder (default: <storage.root>/<run_name>/evaluate)")
    parser.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument("--ensemble", action="store_true", help="average every model on the leaderboard")
    args = parser.parse_args()
    return run_job(args, lambda cfg: run_evaluate(cfg, args.input, args.model, args.output, args.tta, args.ensemble))


if __name__ == "__main__":
    sys.exit(main())
