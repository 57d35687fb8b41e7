"""Pack an image folder into Parquet shards (name, label/id, bytes, width, height, sha256).

Locally:      python jobs/prepare.py --input ../shared/data/dogs-vs-cats/train --output runs/shards/train
On a cluster: ray job submit --working-dir . -- python jobs/prepare.py \\
                  --input s3://my-catdog-bucket/dogs-vs-cats/train --output s3://my-catdog-bucket/shards/train

Every image is decoded on the way in; undecodable files go to rejected.parquet with the reason, exact
duplicates (same sha256) are reported.  The same input always gives the same shard files.
Train, predict and evaluate take the output URI wherever they take an image folder.
No --config is needed; one (or --endpoint-url / --region) supplies the storage settings.
The last stdout line is the URI of the shard set.
"""

import sys

from catdog.cli import job_parser, run_job
from catdog.shards import DEFAULT_SHARD_SIZE, run_prepare


def main() -> int:
    parser = job_parser(__doc__.splitlines()[0], config_required=False)
    parser.add_argument("--input", required=True, help="image folder: Kaggle names or cat(s)/ dog(s)/ folders")
    parser.add_argument("--output", required=True, help="folder for the shards (local path or s3://bucket/prefix)")
    parser.add_argument(
        "--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help=f"images per shard (default {DEFAULT_SHARD_SIZE})"
    )
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    parser.add_argument("--region", help="S3 region")
    args = parser.parse_args()
    args.overrides += [
        f"storage.{key}={value}"
        for key, value in (("endpoint_url", args.endpoint_url), ("region", args.region))
        if value
    ]
    return run_job(args, lambda cfg: run_prepare(cfg, args.input, args.output, args.shard_size))


if __name__ == "__main__":
    sys.exit(main())
