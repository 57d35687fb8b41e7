"""The predict merge at scale: time and driver peak RSS of ``promote`` over N earlier results.

    python bench/promote_scale.py [--rows 1000000] [--new 0.01]

Builds, in a temporary folder, a ``predictions/`` of ``rows`` results (one model) and committed
parts for a fraction ``new`` of fresh files, plans the rerun as predict does (``make_plan``), then
times ``promote``: read the earlier rows and the parts, keep one row per path, write the new
``predictions/``.  Each step runs in this process; no Ray and no images (the merge never reads
one).  Prints one JSON line.  Peak RSS is the process's ``ru_maxrss`` after the merge, so run it
in a fresh process per size.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catdog.images import LISTING_SCHEMA
from catdog.scoring_plan import PARTIAL, PARTS, PREDICTION_SCHEMA, make_plan, promote
from catdog.storage import Storage


def listing(n: int) -> pa.Table:
    """``n`` files named like a large image set: ``/data/set/00/000123.jpg``, 100 folders."""
    ids = np.arange(n, dtype=np.int64)
    folders = np.char.zfill((ids % 100).astype(str), 2)
    paths = np.char.add(np.char.add(np.char.add("/data/set/", folders), "/"), np.char.zfill(ids.astype(str), 9))
    return pa.table(
        {
            "path": pa.array(np.char.add(paths, ".jpg")),
            "size": pa.array(np.full(n, 20_000, dtype=np.int64)),
            "version": pa.array(np.full(n, "1700000000000000000")),
            "id": pa.array(ids),
            "label": pa.nulls(n, pa.int8()),
        },
        schema=LISTING_SCHEMA,
    ).sort_by("path")


def results(rows: pa.Table, scoring: str) -> pa.Table:
    n = rows.num_rows
    rng = np.random.default_rng(0)
    return pa.table(
        {
            "id": rows["id"],
            "path": rows["path"],
            "prob_dog": pa.array(rng.random(n, dtype=np.float32)),
            "label": pa.array(np.zeros(n, dtype=np.int8)),
            "model": pa.array(np.full(n, "resnet18")),
            "error": pa.nulls(n, pa.string()),
            "size": rows["size"],
            "version": rows["version"],
            "scoring": pa.array(np.full(n, scoring)),
        },
        schema=PREDICTION_SCHEMA,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--new", type=float, default=0.01, help="fraction of the files scored by this run")
    args = parser.parse_args()
    storage, files = Storage(), listing(args.rows)
    fresh = int(args.rows * args.new)
    with tempfile.TemporaryDirectory() as work:
        out = Path(work, "out")
        (out / "predictions").mkdir(parents=True)
        pq.write_table(results(files.slice(fresh), "fp"), out / "predictions" / "part-00000.parquet")
        (out / PARTIAL / PARTS).mkdir(parents=True)
        (out / PARTIAL / "state.json").write_text('{"scoring": "fp"}\n')
        for start in range(0, fresh, 1_000):  # one part per scored batch of 1,000
            pq.write_table(
                results(files.slice(start, min(1_000, fresh - start)), "fp"),
                out / PARTIAL / PARTS / f"p{start}.parquet",
            )
        plan = make_plan(storage, files.select(["path", "size", "version", "id"]), str(out), "fp", full=False)
        del files
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        started = time.perf_counter()
        rows = promote(storage, plan, 0.5)
        seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        json.dumps(
            {
                "rows": rows,
                "reused": plan.reused,
                "resumed": plan.resumed,
                "promote_s": round(seconds, 2),
                "peak_rss_gib_before_promote": round(rss_before, 2),
                "peak_rss_gib": round(peak, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
