"""Pack an image folder into Parquet shards (name, label/id, bytes, width, height, sha256).

Locally:      python jobs/prepare.py --input ../shared/data/dogs-vs-cats/train --output runs/shards/train
On a cluster: ray job submit --working-dir . -- python jobs/prepare.py \\
                  --input s3://my-catdog-bucket/dogs-vs-cats/train --output s3://my-catdog-bucket/shards/train

Every image is decoded on the way in; undecodable files go to rejected.parquet with the reason, exact
duplicates (same sha256) are reported.  The same input always gives the same shard files.
Train, predict and evaluate take the output URI wherever they take an image folder.
No --config is needed; one (or --endpoint-url / --region) supplies the storage settings.
Same options as `catdog prepare`.
The last stdout line is the URI of the shard set.
"""

import sys

from catdog.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("prepare"))
