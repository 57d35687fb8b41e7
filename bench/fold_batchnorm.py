"""What folding BatchNorm into the convolutions does to a scoring forward pass: each architecture at
each size, the model as trained against :func:`catdog.models.batchnorm_folded`, in the same process,
alternating, on random channels_last images under ``inference_mode`` (what a predictor actor runs).

    python bench/fold_batchnorm.py [--threads 2] [--batch 32] [--rounds 5] [--smoke]

Prints one line per (arch, size) with the median images/s of each and their ratio, and the largest
difference between the two models' logits (BatchNorm statistics set away from their initial values,
where a fold is nearly the identity).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from catdog.models import batchnorm_folded, build_model

CASES = [("resnet18", 128), ("resnet18", 64), ("mobilenet_v2", 128), ("mobilenet_v2", 64), ("sequential_cnn", 64)]


def images_per_s(model: torch.nn.Module, x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        model(x)
    return calls * len(x) / (time.perf_counter() - start)


def trained_like(arch: str) -> torch.nn.Module:
    model = build_model(arch).eval()
    generator = torch.Generator().manual_seed(0)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_(0, 0.5, generator=generator)
        bn.running_var.uniform_(0.2, 2.0, generator=generator)
    return model


@torch.inference_mode()
def compare(arch: str, size: int, batch: int, rounds: int) -> dict:
    model = trained_like(arch)
    folded = batchnorm_folded(model)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    calls = max(2, round(8 * (128 / size) ** 2)) if arch != "sequential_cnn" else 20
    for net in (model, folded):
        net(x)  # warm-up: oneDNN picks its kernels on the first call
    eager, fused = [], []
    for _ in range(rounds):  # alternating, so that a slower minute of the machine hits both
        eager.append(images_per_s(model, x, calls))
        fused.append(images_per_s(folded, x, calls))
    diff = (model(x) - folded(x)).abs().max().item()
    return {"eager": statistics.median(eager), "folded": statistics.median(fused), "max_logit_diff": diff}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="one small case, one round (used by the tests)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [("sequential_cnn", 32)] if args.smoke else CASES
    rounds = 1 if args.smoke else args.rounds
    for arch, size in cases:
        r = compare(arch, size, args.batch, rounds)
        print(
            f"{arch:15s} {size:4d} px  as trained {r['eager']:7.1f} img/s  folded {r['folded']:7.1f} img/s  "
            f"{r['folded'] / r['eager']:.2f}x  max logit difference {r['max_logit_diff']:.1e}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
