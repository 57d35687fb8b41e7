"""CPU seconds by process kind while one command runs: where a job's (or the test suite's) CPU goes.

    python bench/process_cpu.py [--top 25] [--interval 0.5] -- COMMAND [ARGS ...]

Polls every process on the machine that started after this script did (Ray's daemons and workers
included, which a job starts outside its own process tree) and keeps the last CPU time seen of
each; a process that lives shorter than one poll interval is missed.  Prints, per process title
(``ray::TrainController``, ``ray::RayTrainWorker``, a job's command line, ...), how many there were
and their CPU seconds, then the total and the machine-wide busy CPU seconds from ``/proc/stat``
(which also counts what this script's polling costs, a few percent of a core).  Run it on an
otherwise quiet machine: every new process counts, whoever started it.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import time

import psutil


def busy_seconds() -> float:
    """Machine-wide non-idle CPU seconds since boot."""
    with open("/proc/stat") as handle:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, handle.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / 100


def title(process: psutil.Process) -> str:
    words = process.info["cmdline"] or [process.info["name"] or "?"]
    return " ".join(words).strip()[:80]  # Ray pads its workers' titles with spaces


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    me, since = psutil.Process().pid, time.time() - 1
    busy, start = busy_seconds(), time.monotonic()
    proc = subprocess.Popen(command)
    last: dict[int, tuple[str, float]] = {}
    while proc.poll() is None:
        for p in psutil.process_iter(["pid", "name", "cmdline", "cpu_times", "create_time"]):
            if p.pid == me or p.info["create_time"] is None or p.info["create_time"] < since:
                continue
            times = p.info["cpu_times"]
            if times is not None:
                last[p.pid] = (title(p), times.user + times.system)
        time.sleep(args.interval)
    wall, busy = time.monotonic() - start, busy_seconds() - busy
    kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for name, cpu in last.values():
        kinds[name][0] += 1
        kinds[name][1] += cpu
    print(f"\n{'CPU s':>8} {'count':>5}  process")
    for name, (count, cpu) in sorted(kinds.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(f"{cpu:8.1f} {count:5d}  {name}")
    seen = sum(cpu for _, cpu in kinds.values())
    print(f"{seen:8.1f} {len(last):5d}  all processes seen; machine busy {busy:.1f} CPU-s in {wall:.1f} s wall")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
