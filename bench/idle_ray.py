"""What an idle embedded Ray costs: CPU seconds per minute, per process, after a small Ray Data pass.

    python bench/idle_ray.py [--window 60] [--dashboard]
    env RAY_task_events_report_interval_ms=0 python bench/idle_ray.py     # a Ray setting, compared

Starts Ray as the jobs and the test session do (``catdog.runtime.start_local_ray``, 4 logical CPUs),
runs one tiny Ray Data pass (so Ray Data's helper actors exist, as in a job), waits 10 s, then reads
every process's CPU time (psutil) twice, ``--window`` seconds apart.  The machine should be otherwise
idle: the total is the whole machine's busy time over the window (``/proc/stat``).
"""

from __future__ import annotations

import argparse
import time

import psutil
from process_cpu import busy_seconds, title  # bench/ is this script's folder, so on sys.path


def process_seconds() -> dict[int, tuple[str, float]]:
    """pid → (title, user + system CPU seconds so far) of every process now running."""
    out = {}
    for p in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
        if p.info["cpu_times"] is not None:
            out[p.info["pid"]] = (title(p), p.info["cpu_times"].user + p.info["cpu_times"].system)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--dashboard", action="store_true", help="start Ray's dashboard (a train job's Ray has it)")
    args = parser.parse_args()
    import ray.data

    from catdog.runtime import start_local_ray

    start_local_ray(num_cpus=4, include_dashboard=args.dashboard)
    ray.data.range(1000).map_batches(lambda batch: batch).materialize()
    time.sleep(10)
    before, busy = process_seconds(), busy_seconds()
    time.sleep(args.window)
    after, busy = process_seconds(), busy_seconds() - busy
    per_minute = 60 / args.window
    used = sorted(((after[p][1] - before[p][1], after[p][0]) for p in after if p in before), reverse=True)
    print(f"machine busy: {busy * per_minute:.2f} CPU-s per minute ({args.window:.0f} s window)")
    for seconds, command in used[:15]:
        print(f"{seconds * per_minute:6.2f}  {command}")
    ray.shutdown()


if __name__ == "__main__":
    main()
