"""Run the GPU check's steps, each under its own timeout, and write ``gpu-check.json`` and
``gpu-check.log`` into the output folder.  ``.gpu-kit/run.sh`` calls this; see README.md (GPU check).

    python -m gpu_kit.check OUTDIR --kit .gpu-kit [--cpu]

Steps: the versions, ``pytest -m gpu``, a time-budgeted smoke training of ResNet18 and
MobileNetV2 (EMA, temperature, ensemble weights), 3 timed
ResNet18 epochs against a plain PyTorch loop, and batch prediction against a plain DataLoader loop.
A step that overruns is killed (its whole process group) and reported; the next one still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gpu_kit.steps import RESULT_TAG

REPO = Path(__file__).resolve().parents[1]
STEP_NAMES = ("pytest_gpu", "train", "train_timing", "predict")
# GPU: one H100 or H200, about 8 minutes for everything.  CPU (run.sh --cpu, 2 cores): same steps, smaller work.
PROFILES = {
    "gpu": {
        # Sized on an H200 (bench/results/gpu-2026-11-26.md): each Ray Train run pays ~25 s to start
        # its worker and the first GPU actor ~14 s before its first batch, whatever the data size.
        "budget_s": 570,  # about 9.5 minutes with start-up and stopping a step that overran
        # train: a 3-minute time budget plus Ray's start and stop.
        "timeouts": {"pytest_gpu": 170, "train": 230, "train_timing": 100, "predict": 70},
        "args": {
            "device": "cuda",
            "size": 128,
            "batch": 64,
            "train_limit": None,
            "train_images": 3000,
            "train_budget_minutes": 3,
            "predict_images": 5000,
            "predict_batch": 256,
            "loader_workers": max(1, min(12, (os.cpu_count() or 2) - 2)),
        },
    },
    "cpu": {
        # train: a 1-minute time budget: still an epoch or more per architecture after ~45 s of fixed
        # cost each; the mechanics are the GPU's, and a longer budget only adds epochs to a CI test.
        # 32 px (ResNet18's early size 16): the same mechanics as any size, on less compute (the
        # whole run.sh --cpu took 6% fewer CPU seconds than at 64 px; the rest is start-up).
        "budget_s": 310,  # about 5 minutes
        "timeouts": {"pytest_gpu": 40, "train": 150, "train_timing": 70, "predict": 50},
        "args": {
            "device": "cpu",
            "size": 32,
            "batch": 32,
            "train_limit": 160,
            "train_images": 240,
            "train_budget_minutes": 1,
            "predict_images": 400,
            "predict_batch": 64,
            "loader_workers": 2,
        },
    },
}


def versions() -> dict:
    """Python, torch, torchvision, ray, pydantic, the GPU and the precision catdog picks on it."""
    import pydantic
    import ray
    import torch
    import torchvision

    from catdog.training import amp_dtype

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray.__version__,
        "pydantic": pydantic.VERSION,
        "cuda_available": torch.cuda.is_available(),
        "catdog_commit": git_commit(),
    }
    if torch.cuda.is_available():
        info.update(
            gpu=torch.cuda.get_device_name(0),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            cuda=torch.version.cuda,
            amp_dtype=str(amp_dtype(torch.device("cuda"), True)),
        )
    else:
        info.update(gpu=None, amp_dtype=str(amp_dtype(torch.device("cpu"), True)))
    return info


def git_commit() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def run_step(name: str, cmd: list[str], timeout_s: float, log, env: dict) -> dict:
    """Run one step in its own process group, teeing its output to the log; kill the group on timeout."""
    log.write(f"\n===== {name} (timeout {timeout_s:.0f}s): {' '.join(cmd[:4])} ...\n")
    log.flush()
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []

    def tee() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            log.write(line)
            sys.stdout.write(line)
        log.flush()

    reader = threading.Thread(target=tee, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:  # also when run.sh itself is stopped (SIGTERM): the step's group goes with it
        if proc.poll() is None:
            stop_group(proc)
    reader.join(timeout=10)
    if timed_out:
        log.write(f"\n===== {name}: timed out after {timeout_s:.0f}s; stopped\n")
    result = next((json.loads(line[len(RESULT_TAG) :]) for line in reversed(lines) if line.startswith(RESULT_TAG)), {})
    return {
        "name": name,
        "rc": proc.returncode,
        "timed_out": timed_out,
        "seconds": round(time.monotonic() - start, 1),
        "result": result,
        "tail": lines[-15:],
    }


def stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def pytest_files() -> list[str]:
    """Test files that hold ``gpu``-marked tests (collecting the rest would need dev-only packages)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())


def pytest_counts(tail: list[str]) -> dict:
    text = "\n".join(tail)
    return {
        k: int(m.group(1)) for k in ("passed", "failed", "skipped", "error") if (m := re.search(rf"(\d+) {k}", text))
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output folder: gpu-check.json and gpu-check.log")
    parser.add_argument("--kit", required=True, help="the kit folder (its data/ holds the images)")
    parser.add_argument("--cpu", action="store_true", help="this machine, no GPU: same steps, smaller work")
    parser.add_argument(
        "--work", help="keep runs, checkpoints and image links here (default: a temp folder, deleted at the end)"
    )
    parser.add_argument(
        "--timeout-scale",
        type=float,
        default=float(os.environ.get("CATDOG_KIT_TIMEOUT_SCALE", "1")),
        help="multiply every timeout and the budget (a busy shared machine; default 1, or CATDOG_KIT_TIMEOUT_SCALE)",
    )
    parser.add_argument(
        "--steps",
        type=lambda text: text.split(","),
        help=f"run only these steps, comma-separated (default: all of {', '.join(STEP_NAMES)})",
    )
    args = parser.parse_args()
    if unknown := set(args.steps or ()) - set(STEP_NAMES):
        parser.error(f"unknown step(s) {', '.join(sorted(unknown))}; the steps are {', '.join(STEP_NAMES)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds run_step, which stops its step
    start = time.monotonic()  # the budget counts from here: imports and versions included
    out, kit = Path(args.out).resolve(), Path(args.kit).resolve()
    out.mkdir(parents=True, exist_ok=True)
    profile = PROFILES["cpu" if args.cpu else "gpu"]
    # Runs, checkpoints and thousands of image links stay out of OUTDIR, which holds the two reports only.
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="catdog-gpu-check-"))
    step_args = {**profile["args"], "data": str(kit / "data"), "work": str(work)}
    env = {**os.environ, "CATDOG_DATA": str(kit / "data"), "PYTHONUNBUFFERED": "1"}
    report: dict = {
        "mode": "cpu" if args.cpu else "gpu",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "work": str(work),
    }
    report["versions"] = versions()
    steps = [
        (
            "pytest_gpu",
            [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "--durations=5", "-p", "no:cacheprovider"]
            + ["-p", "gpu_kit.instafail", *pytest_files()],
        )
    ]
    steps += [(name, [sys.executable, "-m", "gpu_kit.steps", name, json.dumps(step_args)]) for name in STEP_NAMES[1:]]
    steps = [(name, cmd) for name, cmd in steps if not args.steps or name in args.steps]
    results = []
    with open(out / "gpu-check.log", "w") as log:
        log.write(json.dumps(report, indent=2) + "\n")
        for name, cmd in steps:
            left = profile["budget_s"] * args.timeout_scale - (time.monotonic() - start)
            if left < 10:
                results.append({"name": name, "passed": False, "skipped": "no time left in the budget"})
                continue
            step = run_step(name, cmd, min(profile["timeouts"][name] * args.timeout_scale, left), log, env)
            if name == "pytest_gpu":
                step["result"] = pytest_counts(step["tail"])
                step["passed"] = step["rc"] == 0 and not step["timed_out"]
            else:
                step["passed"] = step["rc"] == 0 and not step["timed_out"] and bool(step["result"].get("passed"))
            results.append(step)
    report["steps"] = results
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.monotonic() - start, 1)
    by_name = {s["name"]: s.get("result", {}) for s in results}
    report["summary"] = {
        "passed": all(s["passed"] for s in results),
        "train_images_per_s": by_name.get("train_timing", {}).get("catdog_images_per_s"),
        "train_plain_images_per_s": by_name.get("train_timing", {}).get("plain_images_per_s"),
        "train_ratio": by_name.get("train_timing", {}).get("ratio"),
        "predict_images_per_s": by_name.get("predict", {}).get("catdog_images_per_s"),
        "predict_plain_images_per_s": by_name.get("predict", {}).get("plain_images_per_s"),
        "predict_ratio": by_name.get("predict", {}).get("ratio"),
    }
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(f"{s['name']:>13}: {'PASS' if s['passed'] else 'FAIL'} ({s.get('seconds', 0)}s)" for s in results))
    print(json.dumps(report["summary"]), flush=True)
    return 0 if report["summary"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
