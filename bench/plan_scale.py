"""Planning at scale: driver peak RSS and time to the first scored batch for 100k and 1M listed files.

    python bench/plan_scale.py [--sizes 100000,1000000] [--out bench/results]

The listing is synthetic (an Arrow table built in memory: no storage listing is timed), but every
path is a real file: 256 small JPEGs seen through N/256 symlinked folders, so the first batches
really decode and score.  Each size runs twice, each in a fresh subprocess with its own embedded
Ray (peak RSS is the driver's own ``ru_maxrss``; Ray's processes are separate):

* ``first``: nothing scored yet; the whole listing is planned and handed to Ray Data;
* ``nightly``: ``predictions/`` already holds 99% of the files (same model); 1% are new.

Times are from the start of the measured process's work (catdog imports included): Ray start,
listing build, plan (fingerprint, joins against ``predictions/`` and committed parts), building the
pipeline, first committed part.  The model, the image tree and the earlier ``predictions/`` are
made by the parent beforehand.  Writes ``<out>/plan_scale-<timestamp>.json`` and ``plan_scale.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
IMAGES = 256


def make_tree(root: Path, n: int) -> str:
    """256 JPEGs under ``root/images`` and ceil(n/256) symlinks to that folder: n distinct real paths."""
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for j in range(IMAGES):
        Image.new("RGB", (64, 64), (j, 255 - j, (7 * j) % 256)).save(images / f"{j:03d}.jpg")
    tree = root / "tree"
    tree.mkdir(exist_ok=True)
    for k in range(-(-n // IMAGES)):
        link = tree / f"d{k:05d}"
        if not link.exists():
            link.symlink_to(images, target_is_directory=True)
    return str(tree)


def synthetic_listing(tree: str, n: int):
    """The listing a folder of ``n`` files gives, as Arrow columns built without per-file objects."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from catdog.images import LISTING_SCHEMA

    k = np.arange(n, dtype=np.int64)
    folders = pa.array(np.char.add(f"{tree}/d", np.char.zfill((k // IMAGES).astype(str), 5)))
    names = pa.array(np.char.add(np.char.zfill((k % IMAGES).astype(str), 3), ".jpg"))
    paths = pc.binary_join_element_wise(folders, names, "/")
    return pa.table(
        {
            "path": paths,
            "size": pa.array(np.full(n, 2_000, dtype=np.int64)),
            "version": pa.array(np.full(n, "1764000000000000000")),
            "id": pa.nulls(n, pa.int64()),
            "label": pa.nulls(n, pa.int8()),
        },
        schema=LISTING_SCHEMA,
    )


def bench_config(work: Path):
    """The quick config, as the measured process runs it (the earlier run's fingerprint must match)."""
    from catdog.config import load_config

    return load_config(REPO / "configs" / "quick.yaml", [f"storage.root={work}", "ray.num_cpus=3"])


def prepare(n: int, scenario: str, work: Path) -> tuple[str, Path]:
    """In the parent: the model, the image tree and (``nightly``) the earlier ``predictions/``,
    so that the measured process does only what a job does."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from catdog.checkpoints import save_checkpoint
    from catdog.models import build_model
    from catdog.scoring_plan import scoring_fingerprint
    from catdog.storage import Storage

    checkpoint = work / "checkpoint"
    if not checkpoint.exists():
        checkpoint.mkdir()
        model = build_model("sequential_cnn")
        cfg = {"arch": "sequential_cnn", "image_size": 64, "config_hash": "bench", "run_name": "bench"}
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        save_checkpoint(str(checkpoint), model, optimizer, cfg=cfg, epoch=0, step=0, history=[{}])
    tree = make_tree(work, n)
    out = work / f"out-{n}-{scenario}"
    if scenario == "nightly":  # an earlier complete run scored 99% of the files with this model
        fingerprint = scoring_fingerprint(Storage(), [str(checkpoint)], False, bench_config(work).predict.amp)
        earlier = synthetic_listing(tree, n).slice(0, n - n // 100).select(["path", "size", "version"])
        (out / "predictions").mkdir(parents=True, exist_ok=True)
        scoring = pa.array(np.full(earlier.num_rows, fingerprint))
        pq.write_table(earlier.append_column("scoring", scoring), out / "predictions" / "part-00000.parquet")
    return tree, out


def measure(n: int, tree: str, out: Path, work: Path) -> dict:
    """One measurement, in this (fresh) process: what ``run_predict`` does up to its first committed part."""
    started = time.monotonic()
    from catdog.inference import model_ref, predictions_dataset
    from catdog.runtime import init_ray
    from catdog.scoring_plan import commit_part, make_plan, scoring_fingerprint
    from catdog.storage import Storage

    storage = Storage()
    checkpoint = str(work / "checkpoint")
    cfg = bench_config(work)
    t = {"imports_s": time.monotonic() - started}
    mark = time.monotonic()
    init_ray(cfg)
    t["ray_start_s"] = time.monotonic() - mark
    mark = time.monotonic()
    listing = synthetic_listing(tree, n)
    t["listing_build_s"] = time.monotonic() - mark
    mark = time.monotonic()
    models = [model_ref(storage, checkpoint)]
    fingerprint = scoring_fingerprint(storage, [checkpoint], False, cfg.predict.amp)
    plan = make_plan(storage, listing.select(["path", "size", "version", "id"]), str(out), fingerprint, full=False)
    t["plan_s"] = time.monotonic() - mark
    mark = time.monotonic()
    ds = predictions_dataset(cfg, storage, plan.to_score, models, False).map_batches(
        commit_part, fn_args=(storage, plan.parts_uri, fingerprint), batch_size=None, batch_format="pyarrow"
    )
    t["pipeline_build_s"] = time.monotonic() - mark
    mark = time.monotonic()
    next(iter(ds.iter_batches(batch_size=None, batch_format="pyarrow")))
    t["first_batch_after_plan_s"] = time.monotonic() - mark
    t["job_to_first_batch_s"] = time.monotonic() - started
    t["plan_total_s"] = t["listing_build_s"] + t["plan_s"] + t["pipeline_build_s"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB
    return {"files": n, "to_score": plan.to_score.num_rows, "driver_peak_rss_gib": rss, **t}


def table(rows: list[dict]) -> str:
    head = (
        "| files | scenario | to score | plan (listing+plan+pipeline) s | job → first scored batch s "
        "| Ray start s | driver peak RSS GiB |"
    )
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['files']:,} | {r['scenario']} | {r['to_score']:,} | {r['plan_total_s']:.1f} | "
            f"{r['job_to_first_batch_s']:.1f} | {r['ray_start_s']:.1f} | {r['driver_peak_rss_gib']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--note", default="", help="a line for the results file, e.g. 'quiet machine'")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # "N,scenario,workdir": run one measurement here
    args = parser.parse_args()
    if args.one:
        n, tree, out, work = args.one.split(",", 3)
        print(json.dumps(measure(int(n), tree, Path(out), Path(work))), flush=True)
        import ray

        ray.shutdown()  # the result is out: stop the pipeline's remaining tasks with this process's Ray
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="catdog-plan-") as work:
        for n in (int(s) for s in args.sizes.split(",")):
            for scenario in ("first", "nightly"):
                tree, out_dir = prepare(n, scenario, Path(work))
                env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}", "RAY_ADDRESS": ""}
                proc = subprocess.run(
                    [sys.executable, __file__, "--one", f"{n},{tree},{out_dir},{work}"],
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=1800,
                )
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return 1
                result = [line for line in proc.stdout.splitlines() if line.startswith('{"files"')]
                if not result:
                    print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                    return 1
                rows.append({"scenario": scenario, **json.loads(result[-1])})
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    from catdog.runtime import cpu_model

    # Which machine and when, as bench/run.py's table says it: make bench passes no --note.
    machine = f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, {cpu_model()}"
    note = f"{machine}; {args.note}" if args.note else machine
    (out / f"plan_scale-{stamp}.json").write_text(json.dumps({"note": note, "rows": rows}, indent=2) + "\n")
    (out / "plan_scale.md").write_text(f"{note}\n\n" + table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
