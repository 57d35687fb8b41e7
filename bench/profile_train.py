"""Where a Ray Train epoch's CPU goes: py-spy on the Train worker, the driver and Ray's own processes.

    python bench/profile_train.py [--arch resnet18] [--precision fp32|bf16] [--seconds 40] [--out DIR]

Runs the bench's ``catdog_train`` path (128 px, batch 32, 640 images an epoch, like ``make bench``)
and, once epoch 1 is over (steady state), samples for ``--seconds``:
- every Ray and catdog process's CPU time (psutil), so the table shows what share of the machine's
  cores the model gets and what Ray's control plane takes;
- the Train worker with ``py-spy record --nonblocking`` (every thread), its samples sorted into the
  training step's parts: forward, backward, optimizer, EMA, input conversion, collate, waiting for
  the next batch, Ray Data's batching thread.
Writes ``<out>/profile-<arch>-<precision>.md`` and the raw py-spy stacks beside it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]

# (part, substrings of a py-spy frame): a stack belongs to the first part with a frame containing one
# of its substrings, so the step's own parts come before the frameworks they call into.
PARTS = [
    ("waiting for the next batch", ("timed_batches",)),
    ("collate", ("Collate",)),
    ("input conversion (to_model_input)", ("to_model_input",)),
    ("EMA update", ("update (catdog/ema.py",)),
    ("optimizer step", ("step (torch/optim", "step (torch/amp")),
    ("backward", ("backward (torch/",)),
    ("forward", ("_call_impl (torch/nn",)),
    ("Ray Data batching / prefetch thread", ("ray/data",)),
    ("the actor's main thread (Ray's task loop)", ("main_loop (ray/_private/worker.py",)),
]


def part_of(stack: str) -> str:
    """The training step's part that a py-spy stack (frames joined by ';', outermost first) was in."""
    frames = stack.split(";")
    for part, needles in PARTS:
        if any(needle in frame for frame in frames for needle in needles):
            return part
    return "other: " + (frames[-1].split(" (")[0] if frames else "?")


def ray_processes() -> dict[int, str]:
    """pid -> a short name for every Ray daemon or worker process now alive."""
    found = {}
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if cmd.startswith("ray::") or any(k in cmd for k in ("raylet", "gcs_server", "dashboard", "log_monitor")):
            script = next((Path(arg).name for arg in proc.info["cmdline"] if arg.endswith(".py")), None)
            found[proc.info["pid"]] = (
                cmd.split(" ")[0][:60] if cmd.startswith("ray::") else script or Path(cmd.split()[0]).name
            )
    return found


def cpu_seconds(pids) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            out[pid] = times.user + times.system
        except psutil.Error:
            pass
    return out


def wait_for_epoch(root: Path, arch: str, epochs: int, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    metrics = root / "quick" / arch / "metrics.csv"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) > epochs:
            return
        time.sleep(0.5)
    sys.exit(f"training ended or timed out before epoch {epochs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--epochs", type=int, default=6, help="epochs in all; sampling starts after the first")
    parser.add_argument("--data", default=os.environ.get("CATDOG_DATA", str(REPO.parent / "shared/data/dogs-vs-cats")))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="catdog-profile-"))
    path_args = {"data": args.data, "n": 640, "size": 128, "batch": 32, "threads": 2, "arch": args.arch}
    path_args |= {"precision": args.precision, "repeats": args.epochs - 1, "ray_workers": 2, "root": str(root)}
    driver = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "paths.py"), "catdog_train", json.dumps(path_args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        processes, before, after, wall, stacks = sample(args, root, driver)
        driver.wait()
    finally:
        driver.kill()
    write_report(args, processes, before, after, wall, stacks)


def sample(args, root: Path, driver: subprocess.Popen) -> tuple[dict, dict, dict, float, Path]:
    """After epoch 1: every Ray process's CPU seconds over ``args.seconds``, and py-spy's stacks of the
    Train worker over the same span."""
    wait_for_epoch(root, args.arch, 1, driver)
    processes = {**ray_processes(), driver.pid: "driver (bench/paths.py)"}
    worker = next(pid for pid, name in processes.items() if name.startswith("ray::RayTrainWorker"))
    args.out.mkdir(parents=True, exist_ok=True)
    stacks = args.out / f"profile-{args.arch}-{args.precision}-worker.txt"
    before, start = cpu_seconds(processes), time.perf_counter()
    spy = [str(Path(sys.executable).parent / "py-spy"), "record", "--nonblocking", "--format", "raw", "--rate", "50"]
    subprocess.run(
        [*spy, "--duration", str(int(args.seconds)), "--pid", str(worker), "--output", str(stacks)], check=True
    )
    wall, after = time.perf_counter() - start, cpu_seconds(processes)
    return processes, before, after, wall, stacks


def write_report(args, processes: dict, before: dict, after: dict, wall: float, stacks: Path) -> None:
    used = {pid: after[pid] - before[pid] for pid in after if pid in before}
    by_name, startup = collections.Counter(), collections.Counter()
    for pid, seconds in used.items():
        by_name[processes[pid]] += seconds
    for pid, seconds in before.items():
        startup[processes[pid]] += seconds
    parts, total = collections.Counter(), 0
    for line in stacks.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        parts[part_of(stack)] += int(count)
        total += int(count)
    lines = [
        f"# Train worker profile: {args.arch}, {args.precision}, 128 px, batch 32 ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"`python bench/profile_train.py --arch {args.arch} --precision {args.precision} --seconds {args.seconds:g}`; "
        f"{psutil.cpu_count()} CPUs; sampled {wall:.1f} s of epochs 2+.",
        "",
        "| process | CPU s while sampled | share of the machine | CPU s before (start-up and epoch 1) |",
        "|---|---|---|---|",
    ]
    capacity = wall * psutil.cpu_count()
    for name, seconds in (by_name + startup).most_common():
        if seconds >= 0.05:
            share = by_name[name] / capacity
            lines.append(f"| {name} | {by_name[name]:.1f} | {share:.1%} | {startup[name]:.1f} |")
    lines.append(
        f"| all | {sum(by_name.values()):.1f} | {sum(by_name.values()) / capacity:.1%} | {sum(startup.values()):.1f} |"
    )
    lines += ["", "| Train worker, py-spy samples (all threads, active only) | share |", "|---|---|"]
    for part, count in parts.most_common(12):
        lines.append(f"| {part} | {count / max(total, 1):.1%} |")
    report = args.out / f"profile-{args.arch}-{args.precision}.md"
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
