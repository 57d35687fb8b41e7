"""Side-by-side benchmarks: each catdog path beside its plain baseline, same files, threads, batch size.

    python bench/run.py [--smoke] [--full] [--data DIR] [--repeats N] [--groups ingest,train,predict]
                        [--archs resnet18,...] [--paths catdog_folder,...] [--no-scaling]
                        [--set predict.fold_batchnorm=false ...]

Prints a table and writes bench/results/<timestamp>.json and bench/results/latest.md.  Every
figure is the median of several runs (``--repeats``, else the mode's count per group), with the
spread (min-max).  Each measurement runs in a fresh subprocess so that peak RSS and warm caches
of one path do not leak into the next; a training run times each epoch after the first as a run.
``--set`` overrides catdog's config in the catdog train and predict rows (one lever's A/B); the
results then go to a file named for the overrides, never to ``latest.md``.
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
# Sizes and runs per group.  The default fits about 10-15 minutes on a 2-core machine: the two
# reference architectures, predict over the 5,000 test1 images once per path (its steady state is the
# median of three chunks of a second pass), and the 1-worker scaling rows for ingest and ResNet18.
SIZES = {
    "smoke": {
        "ingest": 128,
        "train": 64,
        "predict": 96,
        "train_archs": ("sequential_cnn",),
        "predict_archs": ("mobilenet_v2",),
        "scaling_archs": ("mobilenet_v2",),
        "precisions": ("fp32",),
        "repeats": {"ingest": 1, "train": 1, "predict": 1},
    },
    "default": {
        "ingest": 4000,
        "train": 640,
        "predict": 5000,
        "train_archs": ("resnet18", "mobilenet_v2"),
        "predict_archs": ("resnet18", "mobilenet_v2"),
        "scaling_archs": ("resnet18",),
        # The end-to-end target is over >= 20,000 images, where the job's fixed start-up is amortised.
        "predict_large": (20000, ("resnet18",)),
        "precisions": ("fp32", "bf16"),
        "repeats": {"ingest": 3, "train": 3, "predict": 1},
    },
    "full": {
        "ingest": 16000,
        "train": 2560,
        "predict": 20000,
        "train_archs": ALL,
        "predict_archs": ALL,
        "scaling_archs": ALL,
        "precisions": ("fp32", "bf16"),
        "repeats": {"ingest": 3, "train": 3, "predict": 3},
    },
}


# Paths that time several runs in one process (one Ray start-up): they take ``repeats`` and return ``runs``.
IN_PROCESS_REPEATS = {"catdog_train"}
# Paths that load a catdog config: --set reaches these.
CATDOG_CONFIG_PATHS = {"catdog_train", "catdog_predict"}


def measure_runs(name: str, args: dict, repeats: int) -> list[dict]:
    if name not in IN_PROCESS_REPEATS:
        return [measure(name, args) for _ in range(repeats)]
    result = measure(name, {**args, "repeats": repeats})
    return [{**run, "rss_mb": result.get("rss_mb", 0.0)} for run in result["runs"]]


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
        "steady_images_per_s": (
            statistics.median(rate for r in runs for rate in r["steady_rates"]) if "steady_rates" in runs[0] else None
        ),
        "peak_rss_mb": max(r.get("rss_mb", 0.0) for r in runs),
        "images": runs[0]["images"],
        "runs": len(runs),
    }


def plan(
    sizes: dict, data: Path, workers: list[int], groups: set[str], precisions: tuple[str, ...]
) -> list[tuple[str, str, dict]]:
    """(group, path name, arguments) for every row of the table.  Train and predict rows come once per
    precision, catdog's and the plain loop's side by side; the scaling rows only in the first."""
    common = {"data": str(data), "size": 128, "batch": 32, "threads": 2}
    rows = []
    ingest = {**common, "n": sizes["ingest"]}
    for name in ("pillow_single", "dataloader_2", "ray_read_images", "catdog_folder", "catdog_shards"):
        rows.append(("ingest", name, ingest))
    for w in workers[1:]:
        rows.append(("ingest", "catdog_folder", {**ingest, "ray_workers": w}))
    large_n, large_archs = sizes.get("predict_large", (0, ()))
    for precision in precisions:
        model = {**common, "precision": precision}
        for arch in sizes["train_archs"]:
            for name in ("plain_train", "catdog_train"):
                rows.append(("train", name, {**model, "n": sizes["train"], "arch": arch}))
        for arch in sizes["predict_archs"]:
            for n in (sizes["predict"], large_n) if arch in large_archs else (sizes["predict"],):
                for name in ("plain_predict", "catdog_predict"):
                    rows.append(("predict", name, {**model, "n": n, "arch": arch}))
            scaling = workers[1:] if arch in sizes["scaling_archs"] and precision == precisions[0] else ()
            for w in scaling:
                rows.append(
                    ("predict", "catdog_predict", {**model, "n": sizes["predict"], "arch": arch, "ray_workers": w})
                )
    return [(group, name, dict(args)) for group, name, args in rows if group in groups]


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        f"# Benchmark results ({meta['when']}, {meta['machine']})",
        "",
        f"Mode: {meta['mode']}; precisions {', '.join(meta['precisions'])} (the same on both sides of a ratio)"
        f"{'; catdog overrides ' + ', '.join(meta['sets']) if meta.get('sets') else ''}. "
        "Every figure is the median of the row's runs (min-max). Train runs are "
        "epochs 2+ of one training run; predict's steady state is the median of three chunks of a second pass.",
        "",
        "| group | path | arch | precision | ray workers | images | runs | images/s | spread | steady images/s "
        "| startup s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["summary"]
        lines.append(
            f"| {r['group']} | {r['path']} | {r['args'].get('arch', '')} | {r['args'].get('precision', '')} "
            f"| {r['args'].get('ray_workers', '')} "
            f"| {s['images']} | {s['runs']} | {s['images_per_s']:.0f} | {s['min']:.0f}-{s['max']:.0f} "
            f"| {'' if s.get('steady_images_per_s') is None else round(s['steady_images_per_s'])} "
            f"| {s['startup_s']:.1f} | {s['peak_rss_mb']:.0f} |"
        )
    lines += ["", "## Ratios", ""] + [f"- {k}: {v:.2f}" for k, v in ratios(results).items()]
    return "\n".join(lines) + "\n"


def ratios(results: list[dict]) -> dict:
    """The issue's targets, as catdog / baseline (and 2 / 1 Ray workers for scaling), per precision
    and, for predict, per input size."""
    summary = {}
    for r in results:
        a = r["args"]
        summary[(r["path"], a.get("arch"), a.get("precision"), a["n"], a.get("ray_workers", 2))] = r["summary"]

    def rate(path, arch, precision, n, workers=2, key="images_per_s"):
        found = summary.get((path, arch, precision, n, workers))
        return found and found.get(key)

    n = next((r["args"]["n"] for r in results if r["group"] == "ingest"), None)

    def ingest(path, workers=2):
        return rate(path, None, None, n, workers)

    pairs = {
        "ingest: catdog folder / stock read_images": (ingest("catdog_folder"), ingest("ray_read_images")),
        "ingest: catdog folder / plain DataLoader": (ingest("catdog_folder"), ingest("dataloader_2")),
        "ingest: catdog shards / plain DataLoader": (ingest("catdog_shards"), ingest("dataloader_2")),
        "ingest scaling: catdog folder, 2 / 1 Ray workers": (ingest("catdog_folder"), ingest("catdog_folder", 1)),
    }
    models = sorted(
        {
            (r["group"], r["args"]["arch"], r["args"]["precision"], r["args"]["n"])
            for r in results
            if r["group"] != "ingest"
        },
        key=lambda m: (m[0] != "train", m[2] != "fp32", m[1], m[3]),
    )
    for group, arch, precision, n in models:
        name = f"{group} {arch} {precision}"
        if group == "train":
            pairs[f"{name}: Ray Train 1 worker / plain loop"] = (
                rate("catdog_train", arch, precision, n),
                rate("plain_train", arch, precision, n),
            )
            continue
        plain = rate("plain_predict", arch, precision, n)
        pairs[f"{name}: catdog steady state / plain loop, {n:,} images"] = (
            rate("catdog_predict", arch, precision, n, key="steady_images_per_s"),
            plain,
        )
        pairs[f"{name}: catdog end to end / plain loop, {n:,} images"] = (
            rate("catdog_predict", arch, precision, n),
            plain,
        )
        pairs[f"{name}: predict scaling, 2 / 1 predictor actors, end to end, {n:,} images"] = (
            rate("catdog_predict", arch, precision, n),
            rate("catdog_predict", arch, precision, n, 1),
        )
    return {name: a / b for name, (a, b) in pairs.items() if a and b}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny inputs, one run each (used by the tests)")
    parser.add_argument("--full", action="store_true", help="larger inputs")
    parser.add_argument("--data", default=os.environ.get("CATDOG_DATA", str(REPO.parent / "shared/data/dogs-vs-cats")))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--archs", default=None, help="comma-separated subset of the train/predict architectures")
    parser.add_argument(
        "--groups", default="ingest,train,predict", help="comma-separated subset of ingest,train,predict"
    )
    parser.add_argument("--paths", default=None, help="comma-separated subset of the paths (rows), e.g. catdog_train")
    parser.add_argument("--no-scaling", action="store_true", help="leave out the 1-worker scaling rows")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="catdog config override for the catdog rows"
    )
    args = parser.parse_args()
    if not all(Path(args.data, folder).is_dir() for folder in ("train", "test1")):
        parser.error(f"--data {args.data}: no train/ and test1/ folders there (pass --data or set CATDOG_DATA)")
    from catdog.runtime import cpu_model
    from catdog.training import cpu_has_fast_bf16

    mode = "smoke" if args.smoke else "full" if args.full else "default"
    workers = [2] if args.no_scaling else [2, 1]
    results = []
    groups = set(args.groups.split(","))
    sizes = dict(SIZES[mode])
    if args.archs:
        keep = args.archs.split(",")
        for key in ("train_archs", "predict_archs"):
            sizes[key] = tuple(a for a in sizes[key] if a in keep)
    # bf16 rows only where catdog runs bf16 at all (AMX or AVX512-BF16; elsewhere its amp is fp32)
    precisions = tuple(p for p in sizes["precisions"] if p == "fp32" or cpu_has_fast_bf16())
    if precisions != sizes["precisions"]:
        print("bf16 rows left out: this CPU has neither AMX nor AVX512-BF16, so catdog trains fp32", flush=True)
    rows = plan(sizes, Path(args.data), workers, groups, precisions)
    if args.paths:
        rows = [row for row in rows if row[1] in args.paths.split(",")]
    for group, name, path_args in rows:
        path_args.setdefault("ray_workers", 2)
        if args.set and name in CATDOG_CONFIG_PATHS:
            path_args["sets"] = args.set
        runs = measure_runs(name, path_args, args.repeats or sizes["repeats"][group])
        results.append({"group": group, "path": name, "args": path_args, "summary": summarise(runs), "runs": runs})
        s = results[-1]["summary"]
        steady = s["steady_images_per_s"]
        print(
            f"{group:8s} {name:16s} {path_args.get('arch', ''):15s} {path_args.get('precision', ''):4s} "
            f"n={path_args['n']} w={path_args['ray_workers']} "
            f"{'' if steady is None else f'steady {steady:.0f} img/s '}"
            f"{s['images_per_s']:8.0f} img/s ({s['min']:.0f}-{s['max']:.0f}) startup {s['startup_s']:.1f}s "
            f"rss {s['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    meta = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "mode": mode,
        "repeats": {group: args.repeats or n for group, n in sizes["repeats"].items()},
        "machine": f"{os.cpu_count()} CPUs, {os.uname().machine}, {cpu_model()}",
        "precisions": list(precisions),
        "groups": sorted(groups),
        "sets": args.set,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2)
    )
    table = markdown(results, meta)
    name = {"smoke": "smoke", "default": "latest", "full": "latest-full"}[mode]
    if groups != {"ingest", "train", "predict"}:
        name += "-" + "-".join(sorted(groups))
    if args.archs:
        name += "-" + "-".join(args.archs.split(","))
    if args.paths or args.no_scaling:
        name += "-partial"
    if args.set:
        name += "-set-" + "-".join(item.replace("=", "-") for item in args.set)
    (out / f"{name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
