"""bf16 autocast against fp32 on this CPU, side by side: a training step and an inference pass.

    python bench/precision.py [--archs resnet18 mobilenet_v2 sequential_cnn] [--repeats 3] [--out FILE]
                              [--size PX] [--passes train inference] [--inference-batch 128]

Whether bf16 pays depends on the CPU, not only on its flags: AMX doubles ResNet18's training speed,
while a Xeon exposing AVX512-BF16 without AMX trained it slower in bf16 than in fp32.  This is why a
budgeted run times both before it plans (``catdog.training.measure_speed``).  Each row: 2 threads,
channels_last, random images; a training step is forward, cross-entropy, backward and AdamW at batch
64; inference is a forward pass at batch ``--inference-batch`` (128) under ``inference_mode``.  Each
model at its ``SIZES`` entry unless ``--size`` sets one for all.  fp32 and bf16 alternate, each
timed after 2 warm-up calls; the median of ``--repeats`` runs is given.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from catdog.models import build_model

SIZES = {"resnet18": 128, "mobilenet_v2": 64, "sequential_cnn": 64}


def images_per_second(arch: str, size: int, bf16: bool, train: bool, inference_batch: int, calls: int = 5) -> float:
    model = build_model(arch, "scratch").to(memory_format=torch.channels_last).train(train)
    batch = 64 if train else inference_batch
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def call() -> None:
        if not train:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(x)
            return
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    call(), call()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return batch * calls / (time.perf_counter() - start)


def cpu_line() -> str:
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    model = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model\t")), "")
    has = [f for f in ("amx_tile", "amx_bf16", "avx512_bf16") if f" {f}" in flags]
    model_number = model.split(":")[-1].strip() or "?"
    return f"{platform.machine()}, model {model_number}, flags: {', '.join(has) or 'no bf16'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("--size", type=int, help="every model at this size (default: SIZES)")
    parser.add_argument("--passes", nargs="+", default=["train", "inference"], choices=["train", "inference"])
    parser.add_argument("--inference-batch", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(2)
    lines = [
        f"CPU: {cpu_line()}; torch {torch.__version__}, 2 threads; median of {args.repeats}, fp32 and bf16 alternated; "
        f"inference batch {args.inference_batch}.",
        "",
        "| model, px | pass | fp32 img/s | bf16 img/s | bf16 / fp32 |",
        "|---|---|---|---|---|",
    ]
    for arch in args.archs:
        size = args.size or SIZES[arch]
        for train in [p == "train" for p in args.passes]:
            runs = {False: [], True: []}
            for _ in range(args.repeats):
                for bf16 in (False, True):
                    runs[bf16].append(images_per_second(arch, size, bf16, train, args.inference_batch))
            fp32, bf16 = statistics.median(runs[False]), statistics.median(runs[True])
            kind = "train step" if train else "inference"
            row = f"| {arch}, {size} | {kind} | {fp32:.0f} | {bf16:.0f} | {bf16 / fp32:.2f} |"
            lines.append(row)
            print(row, flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
