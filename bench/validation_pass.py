"""An epoch's validation of the raw weights and their EMA: one read of the split for both (what
``training.validate`` does since c92e057) against one read each (what it did before).

    python bench/validation_pass.py [--config configs/local.yaml] [--data DIR] [--size 128] [--repeats 2]

The validation split of the config (``configs/local.yaml``: 3,200 of the shared training images),
read by Ray Data through ``train_job.train_datasets`` (Ray sized by the config), scored in this
process with the config's ``train.torch_threads`` by a ResNet18 and a copy of it standing in for
the EMA (the same compute).  The two ways alternate, ``--repeats`` times each; prints seconds per
way and a Markdown line.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from catdog.config import load_config
from catdog.data import load_split
from catdog.models import build_model
from catdog.runtime import init_ray
from catdog.storage import Storage
from catdog.train_job import train_datasets
from catdog.training import evaluate, evaluate_models

sys.path.insert(0, str(Path(__file__).parent))
from precision import cpu_line  # noqa: E402  (bench/ is not a package)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/local.yaml")
    parser.add_argument("--data", default="../shared/data/dogs-vs-cats/train")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cfg = load_config(args.config)
    torch.set_num_threads(cfg.train.torch_threads or torch.get_num_threads())
    init_ray(cfg)
    storage = Storage.from_config(cfg.storage)
    split = load_split(storage, args.data, cfg.data.val_fraction, cfg.data.seed)
    val = train_datasets(cfg, split, storage, args.size)["val"]
    raw = build_model("resnet18", "scratch").to(memory_format=torch.channels_last)
    ema = copy.deepcopy(raw)
    loop = {"batch_size": cfg.train.batch_size, "amp": False}
    cpu = torch.device("cpu")
    ways = {
        "one read for both": lambda: evaluate_models([raw, ema], val, loop, cpu),
        "one read each": lambda: (evaluate(raw, val, loop, cpu), evaluate(ema, val, loop, cpu)),
    }
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, run in ways.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
            print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)
    one, each = (statistics.median(seconds[name]) for name in ways)
    cells = [f"{statistics.median(t):.1f} s ({min(t):.1f}-{max(t):.1f})" for t in seconds.values()]
    work = f"{len(split.val)} images at {args.size} px, fp32, {loop['batch_size'] * 2} per batch"
    print(f"| {cpu_line()} | {work} | {' | '.join(cells)} | {each / one:.2f}x |")


if __name__ == "__main__":
    main()
