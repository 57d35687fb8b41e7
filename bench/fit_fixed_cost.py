"""What one Ray Train run costs before and after its training function: ``TorchTrainer.fit()`` of a
function that reports once and trains nothing, on an embedded Ray that is already up.

    python bench/fit_fixed_cost.py [--fits 3] [NAME=VALUE ...]

The ``NAME=VALUE`` pairs go into the environment before Ray starts (Ray Train settings without a
config key, such as ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``; Ray Train passes its own to the
controller).  Prints one JSON line: Ray's start and each fit's seconds.  Every test that trains, and
every architecture of a train job, pays one such fit; wrap the command in ``bench/process_cpu.py``
to see which of Train's processes use the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def report_once(config: dict) -> None:
    import ray.train

    ray.train.report({"reported": 1})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fits", type=int, default=3)
    parser.add_argument("env", nargs="*", metavar="NAME=VALUE")
    args = parser.parse_args()
    for pair in args.env:
        name, value = pair.split("=", 1)
        os.environ[name] = value
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - started
    fits = []
    with tempfile.TemporaryDirectory() as storage:
        for i in range(args.fits):
            started = time.perf_counter()
            run = RunConfig(name=f"fit{i}", storage_path=storage)
            TorchTrainer(report_once, scaling_config=ScalingConfig(num_workers=1), run_config=run).fit()
            fits.append(round(time.perf_counter() - started, 2))
    print(json.dumps({"env": args.env, "ray_start_s": round(ray_start, 2), "fit_s": fits}))


if __name__ == "__main__":
    main()
