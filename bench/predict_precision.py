"""The predict job as a user runs it, in each checkout side by side: what its precision choice costs.

    python bench/predict_precision.py --repo DIR [--repo DIR ...] [--arch resnet18 --size 128]
                                      [--images 5000] [--repeats 2] [--set KEY=VALUE ...]

Each repeat runs ``jobs/predict.py --config configs/local.yaml --full`` once per variant, alternating
(a variant per ``--repo``, and one per ``--set``: the first checkout with that override),
over the first ``--images`` test1 images with an untrained checkpoint of ``--arch`` at ``--size`` px
(the speed does not depend on the weights), each job in a fresh process with its own embedded Ray.
``predict.tta=false`` in every variant (one pass per image, as a plain loop scores).
Records each job's wall and CPU seconds (``lean_ray.timed``) and the precision its log names.
Writes ``<out>/predict_precision-<timestamp>.json`` and ``predict_precision.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from lean_ray import cpu_group, timed  # noqa: E402  (bench/ is not a package)


def checkpoint(folder: Path, arch: str, size: int) -> Path:
    import torch

    from catdog.models import META_FILE, MODEL_FILE, build_model

    folder.mkdir()
    torch.save(build_model(arch).state_dict(), folder / MODEL_FILE)
    (folder / META_FILE).write_text(json.dumps({"arch": arch, "image_size": size, "crop_fraction": 0.875}))
    return folder


def scored_in(output: str) -> str:
    """The predictor's console line about its precision (checkouts from before it was chosen have none)."""
    lines = [line for line in output.splitlines() if "scoring in " in line]
    return lines[-1].split("scoring in ", 1)[1] if lines else "(not logged)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(os.environ.get("CATDOG_DATA", REPO / "../shared/data/dogs-vs-cats"))
    parser.add_argument("--data", type=Path, default=default_data)
    parser.add_argument("--repo", action="append", type=Path, required=True, dest="repos")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--set", action="append", default=[], dest="sets", help="one more variant: the first --repo with this override"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    variants = {str(repo): (repo.resolve(), []) for repo in args.repos}
    variants |= {f"{args.repos[0]} {s}": (args.repos[0].resolve(), [s]) for s in args.sets}
    rows = {name: {"wall": [], "cpu": [], "precision": []} for name in variants}
    group = cpu_group()
    with tempfile.TemporaryDirectory(prefix="catdog-precision-") as tmp:
        work = Path(tmp)
        images = work / "test1"
        images.mkdir()
        for i in range(1, args.images + 1):
            (images / f"{i}.jpg").symlink_to((args.data / "test1" / f"{i}.jpg").resolve())
        model = checkpoint(work / "checkpoint", args.arch, args.size)
        for repeat in range(args.repeats):
            for index, (name, (repo, sets)) in enumerate(variants.items()):
                out = work / f"out-{index}-{repeat}"
                command = [sys.executable, "jobs/predict.py", "--config", "configs/local.yaml", "--full"]
                command += ["--model", str(model), "--input", str(images), "--output", str(out)]
                sets = [f"storage.root={work / 'runs'}", "predict.tta=false", *sets]
                command += [arg for s in sets for arg in ("--set", s)]
                wall, cpu, proc = timed(command, {}, group, repo)
                row = rows[name]
                row["wall"].append(round(wall, 1))
                row["cpu"].append(cpu and round(cpu, 1))
                row["precision"].append(scored_in(proc.stdout + proc.stderr))
                print(name, {k: v[-1] for k, v in row.items()}, flush=True)
    if group:
        group.rmdir()
    from catdog.runtime import cpu_model

    record = {"cpu": cpu_model(), "cores": os.cpu_count(), "args": {k: str(v) for k, v in vars(args).items()}}
    record["rows"] = rows
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"predict_precision-{stamp}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# The predict job's precision choice ({stamp})",
        "",
        f"{record['cpu']}, {record['cores']} cores. `python bench/predict_precision.py "
        + " ".join(f"--repo {r}" for r in args.repos)
        + f" --arch {args.arch} --size {args.size} --images {args.images} --repeats {args.repeats}"
        + "".join(f" --set {s}" for s in args.sets)
        + "`",
        "",
        "| variant | wall s (median) | images/s | CPU s (median) | runs (wall) | precision it logged |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        wall = statistics.median(row["wall"])
        cpus = [c for c in row["cpu"] if c is not None]
        cpu = f"{statistics.median(cpus):.1f}" if cpus else "n/a"
        lines.append(
            f"| {name} | {wall:.1f} | {args.images / wall:.0f} | {cpu} | {', '.join(map(str, row['wall']))} "
            f"| {'; '.join(sorted(set(row['precision'])))} |"
        )
    (args.out / "predict_precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
