"""A job as a user runs it, in each checkout side by side: what its precision choice costs.

    python bench/job_precision.py --repo DIR [--repo DIR ...] [--job predict|train] [--arch resnet18]
                                  [--size 128] [--images 5000] [--epochs 2] [--repeats 2] [--set KEY=VALUE ...]

Each repeat runs the job with ``configs/local.yaml`` once per variant, alternating (a variant per
``--repo``, and one per ``--set``: the first checkout with that override), each in a fresh process
with its own embedded Ray:
- ``predict``: ``jobs/predict.py --full`` over the first ``--images`` test1 images with an untrained
  checkpoint of ``--arch`` at ``--size`` px (the speed does not depend on the weights), without flip
  TTA (one pass per image, as a plain loop scores);
- ``train``: ``jobs/train.py`` on ``--arch`` at ``--size`` px for ``--epochs`` fixed epochs (no time
  budget, no EMA, no report) over ``--images`` labelled train images (a fifth of them validation).
Records each job's wall and CPU seconds (``lean_ray.timed``) and the precision line it printed.
Writes ``<out>/job_precision-<job>-<timestamp>.json`` and ``job_precision-<job>.md``.
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


def precision_line(output: str, job: str) -> str:
    """The job's console line about its precision (checkouts from before it was chosen have none)."""
    said = "scoring in " if job == "predict" else "training in "
    lines = [line for line in output.splitlines() if said in line]
    return lines[-1].split(said, 1)[1] if lines else "(not logged)"


def job_command(args, work: Path, out: Path, model: Path | None) -> list[str]:
    common = [f"storage.root={work / 'runs'}"]
    if args.job == "predict":
        command = [sys.executable, "jobs/predict.py", "--config", "configs/local.yaml", "--full"]
        command += ["--model", str(model), "--input", str(work / "test1"), "--output", str(out)]
        sets = [*common, "predict.tta=false"]
    else:
        command = [sys.executable, "jobs/train.py", "--config", "configs/local.yaml"]
        sets = [*common, f"run_name={out.name}", f"data.train={args.data / 'train'}", f"data.limit={args.images}"]
        sets += [f"models=[{{arch: {args.arch}, image_size: {args.size}}}]", "train.time_budget_minutes=null"]
        sets += [f"train.epochs={args.epochs}", "train.ema_decay=null", "train.report=false"]
    return command + [arg for s in sets for arg in ("--set", s)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(os.environ.get("CATDOG_DATA", REPO / "../shared/data/dogs-vs-cats"))
    parser.add_argument("--data", type=Path, default=default_data)
    parser.add_argument("--repo", action="append", type=Path, required=True, dest="repos")
    parser.add_argument("--job", choices=["predict", "train"], default="predict")
    parser.add_argument("--epochs", type=int, default=2, help="train: fixed epochs")
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
    with tempfile.TemporaryDirectory(prefix="catdog-job-precision-") as tmp:
        work = Path(tmp)
        model = None
        if args.job == "predict":
            (work / "test1").mkdir()
            for i in range(1, args.images + 1):
                (work / "test1" / f"{i}.jpg").symlink_to((args.data / "test1" / f"{i}.jpg").resolve())
            model = checkpoint(work / "checkpoint", args.arch, args.size)
        for repeat in range(args.repeats):
            for index, (name, (repo, sets)) in enumerate(variants.items()):
                command = job_command(args, work, work / f"out-{index}-{repeat}", model)
                command += [arg for s in sets for arg in ("--set", s)]
                wall, cpu, proc = timed(command, {}, group, repo)
                row = rows[name]
                row["wall"].append(round(wall, 1))
                row["cpu"].append(cpu and round(cpu, 1))
                row["precision"].append(precision_line(proc.stdout + proc.stderr, args.job))
                print(name, {k: v[-1] for k, v in row.items()}, flush=True)
    if group:
        group.rmdir()
    from catdog.runtime import cpu_model

    record = {"cpu": cpu_model(), "cores": os.cpu_count(), "args": {k: str(v) for k, v in vars(args).items()}}
    record["rows"] = rows
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"job_precision-{args.job}-{stamp}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# The {args.job} job's precision choice ({stamp})",
        "",
        f"{record['cpu']}, {record['cores']} cores. `python bench/job_precision.py --job {args.job} "
        + " ".join(f"--repo {r}" for r in args.repos)
        + f" --arch {args.arch} --size {args.size} --images {args.images} --epochs {args.epochs}"
        + f" --repeats {args.repeats}"
        + "".join(f" --set {s}" for s in args.sets)
        + "`",
        "",
        "| variant | wall s (median) | CPU s (median) | runs (wall) | precision it logged |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        wall = statistics.median(row["wall"])
        cpus = [c for c in row["cpu"] if c is not None]
        cpu = f"{statistics.median(cpus):.1f}" if cpus else "n/a"
        lines.append(
            f"| {name} | {wall:.1f} | {cpu} | {', '.join(map(str, row['wall']))} "
            f"| {'; '.join(sorted(set(row['precision'])))} |"
        )
    (args.out / f"job_precision-{args.job}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
