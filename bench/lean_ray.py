"""Embedded-Ray settings, side by side: wall time of small train and predict jobs with each setting.

    python bench/lean_ray.py [--data DIR] [--repeats 3] [--set KEY=VALUE ...] [--env NAME=VALUE ...]
                             [--repo DIR ...] [--out bench/results]

Each variant runs ``jobs/train.py`` (quick config, the small CNN, 1 epoch on 200 images) and
``jobs/predict.py`` (500 test1 images) in fresh processes, each starting its own embedded Ray; the
variants alternate, so a slow spell of the machine hits both.  The fixed cost measured here (Ray's
start, its helper processes, the first batch) is what small jobs and the test suite pay for every job.
Variants: ``baseline`` is the config as shipped; each ``--set`` adds one variant with that config
override, each ``--env`` one with that environment variable (Ray and Ray Train settings that have no
config key; Ray's processes inherit the job's environment).  Besides wall time it records the CPU
seconds of each job's whole process tree (Ray's daemons and workers included) where a cpuacct
cgroup can be made (root on cgroup v1): CPU seconds move less than wall time when the machine is
busy, and Ray's helper processes show there first.
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


CGROUP = Path("/sys/fs/cgroup/cpuacct")


def cpu_group() -> Path | None:
    """A cpuacct cgroup (v1) for the measured jobs, or None where this machine does not allow one."""
    group = CGROUP / f"catdog-lean-ray-{os.getpid()}"
    try:
        group.mkdir()
    except OSError:
        return None
    return group


def timed(
    command: list[str], env: dict[str, str], group: Path | None, repo: Path
) -> tuple[float, float | None, subprocess.CompletedProcess]:
    """Wall seconds and CPU seconds (None without a cgroup) of ``command`` and every process it
    starts, and the finished process (its output captured)."""
    enter = f"echo $$ > {group / 'tasks'}; " if group else ""
    used = int((group / "cpuacct.usage").read_text()) if group else 0
    start = time.perf_counter()
    shell = ["bash", "-c", enter + 'exec "$@"', "job", *command]
    env = {**os.environ, "PYTHONPATH": str(repo), **env}  # Ray's workers import catdog from the same checkout
    proc = subprocess.run(shell, cwd=repo, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(command)}\n{proc.stderr[-3000:]}")
    return wall, ((int((group / "cpuacct.usage").read_text()) - used) / 1e9 if group else None), proc


def job_commands(data: Path, work: Path, name: str, sets: list[str]) -> tuple[list[str], list[str]]:
    common = [f"storage.root={work}", f"run_name={name}", f"data.train={data / 'train'}", "data.limit=200"]
    common += ["models=[sequential_cnn]", "train.report=false", *sets]
    flags = [arg for s in common for arg in ("--set", s)]
    train = [sys.executable, "jobs/train.py", "--config", "configs/quick.yaml", *flags]
    predict = [sys.executable, "jobs/predict.py", "--config", "configs/quick.yaml", *flags]
    predict += ["--input", str(work / "test500"), "--output", str(work / f"{name}-out"), "--full"]
    return train, predict


def measure(args, variants: dict, times: dict, group: Path | None) -> None:
    """Run every variant's train and predict jobs ``args.repeats`` times, variants alternating."""
    with tempfile.TemporaryDirectory(prefix="catdog-lean-") as tmp:
        work = Path(tmp)
        (work / "test500").mkdir()
        for i in range(1, 501):
            (work / "test500" / f"{i}.jpg").symlink_to((args.data / "test1" / f"{i}.jpg").resolve())
        for repeat in range(args.repeats):
            for variant, (sets, env, repo) in variants.items():
                name = f"v{list(variants).index(variant)}-{repeat}"
                for job, command in zip(("train", "predict"), job_commands(args.data, work, name, sets)):
                    wall, cpu, _ = timed(command, env, group, repo)
                    times[variant][job].append(wall)
                    times[variant][f"{job}_cpu"].append(cpu)
                print(variant, {k: v[-1] and round(v[-1], 1) for k, v in times[variant].items()}, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(os.environ.get("CATDOG_DATA", REPO / "../shared/data/dogs-vs-cats"))
    parser.add_argument("--data", type=Path, default=default_data)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], dest="variants", help="one variant per override")
    parser.add_argument(
        "--env", action="append", default=[], dest="envs", help="one variant per 'NAME=VALUE [NAME=VALUE ...]'"
    )
    parser.add_argument(
        "--repo", action="append", default=[], type=Path, dest="repos", help="one variant per other checkout"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    variants = {"baseline": ([], {}, REPO), **{v: ([v], {}, REPO) for v in args.variants}}
    variants |= {v: ([], dict(pair.split("=", 1) for pair in v.split()), REPO) for v in args.envs}
    variants |= {f"repo {repo}": ([], {}, repo.resolve()) for repo in args.repos}
    times = {v: {"train": [], "predict": [], "train_cpu": [], "predict_cpu": []} for v in variants}
    group = cpu_group()
    try:
        measure(args, variants, times, group)
    finally:
        if group:
            try:
                group.rmdir()  # empty once every job's processes have exited
            except OSError as exc:  # a Ray process not yet reaped keeps it: the figures still count
                print(f"note: could not remove the cgroup {group}: {exc}", file=sys.stderr)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    from catdog.runtime import cpu_model

    record = {"cpu": cpu_model(), "cores": os.cpu_count(), "note": args.note, "times": times}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"lean_ray-{stamp}.json").write_text(json.dumps(record, indent=2) + "\n")
    options = [f"--set {v}" for v in args.variants] + [f"--env {v}" for v in args.envs]
    options += [f"--repo {repo}" for repo in args.repos]
    lines = [
        f"# Embedded Ray settings: small jobs' wall time ({stamp})",
        "",
        f"{record['cpu']}, {record['cores']} cores; {args.note}".rstrip("; "),
        "",
        f"`python bench/lean_ray.py {' '.join(options)}`: median of {args.repeats} "
        "(train: quick config, small CNN, 1 epoch, 200 images; predict: 500 images), variants alternating",
        "",
        "| variant | train s | predict s | train / baseline | predict / baseline | train CPU s | predict CPU s "
        "| train CPU / baseline | predict CPU / baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def medians(variant: str) -> dict:
        return {k: statistics.median(v) if None not in v else None for k, v in times[variant].items()}

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}" if a and b else "-"

    base = medians("baseline")
    for variant in times:
        med = medians(variant)
        cells = [f"{med[k]:.1f}" if med[k] else "-" for k in ("train", "predict", "train_cpu", "predict_cpu")]
        lines.append(
            f"| {variant} | {cells[0]} | {cells[1]} | {ratio(med['train'], base['train'])} "
            f"| {ratio(med['predict'], base['predict'])} | {cells[2]} | {cells[3]} "
            f"| {ratio(med['train_cpu'], base['train_cpu'])} | {ratio(med['predict_cpu'], base['predict_cpu'])} |"
        )
    (args.out / "lean_ray.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
