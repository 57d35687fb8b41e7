"""Side-by-side benchmarks: each catdog path beside its plain baseline, same files, threads, batch size.

    python bench/run.py [--smoke] [--full] [--data DIR] [--repeats N]

Prints a table and writes bench/results/<timestamp>.json and bench/results/latest.md.  Every
figure is the median of ``--repeats`` runs, with the spread (min-max).  Each measurement runs in
a fresh subprocess so that peak RSS and warm caches of one path do not leak into the next.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

ALL = ("resnet18", "mobilenet_v2", "sequential_cnn")
SIZES = {
    "smoke": {
        "ingest": 128,
        "train": 64,
        "predict": 96,
        "train_archs": ("sequential_cnn",),
        "predict_archs": ("mobilenet_v2",),
    },
    "default": {
        "ingest": 4000,
        "train": 640,
        "predict": 5000,
        "train_archs": ALL,
        "predict_archs": ("resnet18", "mobilenet_v2"),
    },
    "full": {
        "ingest": 16000,
        "train": 2560,
        "predict": 20000,
        "train_archs": ALL,
        "predict_archs": ("resnet18", "mobilenet_v2"),
    },
}


def measure(name: str, args: dict) -> dict:
    """Run one path in a subprocess; it prints one JSON line with images, seconds, startup, rss."""
    proc = subprocess.run(
        [sys.executable, str(HERE / "paths.py"), name, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=REPO,
        env={**os.environ, "RAY_DEDUP_LOGS": "0"},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def summarise(runs: list[dict]) -> dict:
    rates = [r["images"] / r["seconds"] for r in runs]
    return {
        "images_per_s": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "startup_s": statistics.median(r.get("startup", 0.0) for r in runs),
        "peak_rss_mb": max(r.get("rss_mb", 0.0) for r in runs),
        "images": runs[0]["images"],
        "runs": len(runs),
    }


def plan(sizes: dict, data: Path, workers: list[int]) -> list[tuple[str, str, dict]]:
    """(group, path name, arguments) for every row of the table."""
    common = {"data": str(data), "size": 128, "batch": 32, "threads": 2}
    rows = []
    for name in ("pillow_single", "dataloader_2", "ray_read_images", "catdog_folder"):
        rows.append(("ingest", name, {**common, "n": sizes["ingest"]}))
    for w in workers[1:]:
        rows.append(("ingest", "catdog_folder", {**common, "n": sizes["ingest"], "ray_workers": w}))
    for arch in sizes["train_archs"]:
        rows.append(("train", "plain_train", {**common, "n": sizes["train"], "arch": arch}))
        rows.append(("train", "catdog_train", {**common, "n": sizes["train"], "arch": arch}))
    for arch in sizes["predict_archs"]:
        rows.append(("predict", "plain_predict", {**common, "n": sizes["predict"], "arch": arch}))
        rows.append(("predict", "catdog_predict", {**common, "n": sizes["predict"], "arch": arch}))
    return rows


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        f"# Benchmark results ({meta['when']}, {meta['machine']})",
        "",
        f"Mode: {meta['mode']}; every figure is the median of {meta['repeats']} runs (min-max).",
        "",
        "| group | path | arch | ray workers | images | images/s | spread | startup s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["summary"]
        lines.append(
            f"| {r['group']} | {r['path']} | {r['args'].get('arch', '')} | {r['args'].get('ray_workers', '')} "
            f"| {s['images']} | {s['images_per_s']:.0f} | {s['min']:.0f}-{s['max']:.0f} "
            f"| {s['startup_s']:.1f} | {s['peak_rss_mb']:.0f} |"
        )
    lines += ["", "## Ratios", ""] + [f"- {k}: {v:.2f}" for k, v in ratios(results).items()]
    return "\n".join(lines) + "\n"


def ratios(results: list[dict]) -> dict:
    rate = {
        (r["path"], r["args"].get("arch"), r["args"].get("ray_workers", 2)): r["summary"]["images_per_s"]
        for r in results
    }
    out = {}
    if ("catdog_folder", None, 2) in rate:
        out["ingest: catdog / stock read_images"] = (
            rate[("catdog_folder", None, 2)] / rate[("ray_read_images", None, 2)]
        )
        out["ingest: catdog / plain DataLoader"] = rate[("catdog_folder", None, 2)] / rate[("dataloader_2", None, 2)]
    for arch in ("resnet18", "mobilenet_v2", "sequential_cnn"):
        if ("catdog_train", arch, 2) in rate:
            out[f"train {arch}: Ray Train 1 worker / plain loop"] = (
                rate[("catdog_train", arch, 2)] / rate[("plain_train", arch, 2)]
            )
        if ("catdog_predict", arch, 2) in rate:
            out[f"predict {arch}: catdog end to end / plain loop"] = (
                rate[("catdog_predict", arch, 2)] / rate[("plain_predict", arch, 2)]
            )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny inputs, one run each (used by the tests)")
    parser.add_argument("--full", action="store_true", help="larger inputs")
    parser.add_argument("--data", default=os.environ.get("CATDOG_DATA", str(REPO.parent / "shared/data/dogs-vs-cats")))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    mode = "smoke" if args.smoke else "full" if args.full else "default"
    repeats = args.repeats or (1 if args.smoke else 3)
    workers = [2] if args.smoke else [2, 1]
    results = []
    for group, name, path_args in plan(SIZES[mode], Path(args.data), workers):
        path_args.setdefault("ray_workers", 2)
        runs = [measure(name, path_args) for _ in range(repeats)]
        results.append({"group": group, "path": name, "args": path_args, "summary": summarise(runs), "runs": runs})
        s = results[-1]["summary"]
        print(
            f"{group:8s} {name:16s} {path_args.get('arch', ''):15s} w={path_args['ray_workers']} "
            f"{s['images_per_s']:8.0f} img/s ({s['min']:.0f}-{s['max']:.0f}) startup {s['startup_s']:.1f}s "
            f"rss {s['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    meta = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "mode": mode,
        "repeats": repeats,
        "machine": f"{os.cpu_count()} CPUs, {os.uname().machine}",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2)
    )
    table = markdown(results, meta)
    (out / ("smoke.md" if args.smoke else "latest.md")).write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
