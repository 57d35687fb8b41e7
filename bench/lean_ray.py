"""Embedded-Ray settings, side by side: wall time of small train and predict jobs with each setting.

    python bench/lean_ray.py [--data DIR] [--repeats 3] [--set KEY=VALUE ...] [--out bench/results]

Each variant runs ``jobs/train.py`` (quick config, the small CNN, 1 epoch on 200 images) and
``jobs/predict.py`` (500 test1 images) in fresh processes, each starting its own embedded Ray; the
variants alternate, so a slow spell of the machine hits both.  The fixed cost measured here (Ray's
start, its helper processes, the first batch) is what small jobs and the test suite pay for every job.
Variants: ``baseline`` is the config as shipped; each ``--set`` adds one variant with that override.
Writes ``<out>/lean_ray-<timestamp>.json`` and ``<out>/lean_ray.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(command)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def job_commands(data: Path, work: Path, name: str, sets: list[str]) -> tuple[list[str], list[str]]:
    common = [f"storage.root={work}", f"run_name={name}", f"data.train={data / 'train'}", "data.limit=200"]
    common += ["models=[sequential_cnn]", "train.report=false", *sets]
    flags = [arg for s in common for arg in ("--set", s)]
    train = [sys.executable, "jobs/train.py", "--config", "configs/quick.yaml", *flags]
    predict = [sys.executable, "jobs/predict.py", "--config", "configs/quick.yaml", *flags]
    predict += ["--input", str(work / "test500"), "--output", str(work / f"{name}-out"), "--full"]
    return train, predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(os.environ.get("CATDOG_DATA", REPO / "../shared/data/dogs-vs-cats"))
    parser.add_argument("--data", type=Path, default=default_data)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], dest="variants", help="one variant per override")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    variants = {"baseline": [], **{v: [v] for v in args.variants}}
    times: dict[str, dict[str, list[float]]] = {v: {"train": [], "predict": []} for v in variants}
    with tempfile.TemporaryDirectory(prefix="catdog-lean-") as tmp:
        work = Path(tmp)
        (work / "test500").mkdir()
        for i in range(1, 501):
            (work / "test500" / f"{i}.jpg").symlink_to((args.data / "test1" / f"{i}.jpg").resolve())
        for repeat in range(args.repeats):
            for variant, sets in variants.items():
                train, predict = job_commands(args.data, work, f"{variant.replace('=', '-')}-{repeat}", sets)
                times[variant]["train"].append(timed(train))
                times[variant]["predict"].append(timed(predict))
                print(variant, {k: round(v[-1], 1) for k, v in times[variant].items()}, flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    from catdog.runtime import cpu_model

    record = {"cpu": cpu_model(), "cores": os.cpu_count(), "note": args.note, "times": times}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"lean_ray-{stamp}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# Embedded Ray settings: small jobs' wall time ({stamp})",
        "",
        f"{record['cpu']}, {record['cores']} cores; {args.note}".rstrip("; "),
        "",
        f"`python bench/lean_ray.py {' '.join('--set ' + v for v in args.variants)}`: median of {args.repeats} "
        "(train: quick config, small CNN, 1 epoch, 200 images; predict: 500 images), variants alternating",
        "",
        "| variant | train s | predict s | train / baseline | predict / baseline |",
        "|---|---|---|---|---|",
    ]
    base = {k: statistics.median(v) for k, v in times["baseline"].items()}
    for variant, runs in times.items():
        med = {k: statistics.median(v) for k, v in runs.items()}
        lines.append(
            f"| {variant} | {med['train']:.1f} | {med['predict']:.1f} | "
            f"{med['train'] / base['train']:.2f} | {med['predict'] / base['predict']:.2f} |"
        )
    (args.out / "lean_ray.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
