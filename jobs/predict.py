"""Score an image folder with the best model: predictions Parquet + Kaggle submission.csv.

Locally:      python jobs/predict.py --config configs/local.yaml [--model URI] [--input URI] [--output URI] [--full]
On a cluster: ray job submit --working-dir . -- python jobs/predict.py --config configs/gpu.yaml

A rerun into the same output scores only new or changed images, and a killed run resumes where it
stopped; ``--full`` re-scores everything.  The last stdout line is the URI of ``submission.csv``.
"""

import sys

from catdog.cli import job_parser, run_job
from catdog.inference import run_predict


def main() -> int:
    parser = job_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", help="best.json or checkpoint folder (default: the run's best.json)")
    parser.add_argument("--input", help="image folder (default: data.test)")
    parser.add_argument("--output", help="output folder (default: <storage.root>/<run_name>)")
    parser.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument("--ensemble", action="store_true", help="average every model on the leaderboard")
    parser.add_argument("--proba", action="store_true", help="write clipped probabilities (Kaggle Redux format)")
    parser.add_argument("--full", action="store_true", help="re-score every image (default: only new or changed ones)")
    args = parser.parse_args()
    return run_job(
        args,
        lambda cfg: run_predict(
            cfg, args.model, args.input, args.output, args.tta, args.ensemble, args.proba, full=args.full
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
