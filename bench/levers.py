"""Ingest levers, one at a time, on the same files: what each does to decoded images/s.

    python bench/levers.py [--data DIR] [--n 3000] [--size 128] [--repeats 3] [--smoke] [--only TEXT ...]

Single-process decoders first (the per-core ceiling), then catdog's Ray Data reader with one
setting changed per row.  The outcome of each lever is written up in bench/NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))


def files(data: str, n: int) -> list[str]:
    from paths import train_files

    return train_files(data, n)


def pillow(paths: list[str], size: int, draft: bool) -> int:
    for path in paths:
        image = Image.open(path)
        if draft:
            image.draft("RGB", (size, size))
        np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR))
    return len(paths)


def catdog_decode(paths: list[str], size: int) -> int:
    from catdog.images import decode_image
    from catdog.presets import EvalPreset

    preset = EvalPreset(size, crop_fraction=1.0)
    for path in paths:
        decode_image(Path(path).read_bytes(), preset)
    return len(paths)


def torchvision_decode(paths: list[str], size: int) -> int:
    import torch
    import torchvision.io as tvio
    import torchvision.transforms.v2.functional as F

    torch.set_num_threads(1)
    for path in paths:
        image = tvio.decode_jpeg(tvio.read_file(path), mode=tvio.ImageReadMode.RGB)
        F.resize(image, [size, size], antialias=True)
    return len(paths)


def ray_reader(paths: list[str], size: int, block: int, cpus: int, source: str, threads: int = 1) -> int:
    import ray

    from catdog.data import decode_batch, image_dataset
    from catdog.presets import EvalPreset
    from catdog.storage import Storage

    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    preset = EvalPreset(size, crop_fraction=1.0)

    def build(files):
        if source == "read_binary_files":  # Ray reads the bytes, one row per file, then we decode
            return (
                ray.data.read_binary_files(files, include_paths=True)
                .map_batches(lambda b: {"path": b["path"], "bytes": b["bytes"]}, batch_format="numpy")
                .map_batches(
                    decode_batch, fn_args=(Storage(), {"image": preset}), batch_size=block, batch_format="numpy"
                )
            )
        rows = [{"path": p, "label": 0} for p in files]
        return image_dataset(Storage(), rows, preset, batch_size=block, threads=threads)

    # As in bench/paths.py: a first pass starts the worker processes, then the timed pass.
    for _ in build(paths[: 2 * block]).iter_batches(batch_size=32, batch_format="numpy"):
        pass
    start, count = time.perf_counter(), 0
    for batch in build(paths).iter_batches(batch_size=32, batch_format="numpy"):
        count += len(batch["image"])
    return count, time.perf_counter() - start


LEVERS = {
    "pillow, no draft": lambda p, a: pillow(p, a.size, draft=False),
    "pillow + Image.draft": lambda p, a: pillow(p, a.size, draft=True),
    "catdog decode_image (draft, box resize)": lambda p, a: catdog_decode(p, a.size),
    "torchvision.io.decode_jpeg + resize": lambda p, a: torchvision_decode(p, a.size),
}
RAY_LEVERS = {
    "ray: read_binary_files + map_batches decode, 128/task": {"block": 128, "source": "read_binary_files"},
    "ray: catdog reader, 16 files/task": {"block": 16, "source": "catdog"},
    "ray: catdog reader, 64 files/task": {"block": 64, "source": "catdog"},
    "ray: catdog reader, 128 files/task": {"block": 128, "source": "catdog"},
    "ray: catdog reader, 512 files/task": {"block": 512, "source": "catdog"},
    "ray: catdog reader, 128 files/task, 2 decode threads": {"block": 128, "source": "catdog", "threads": 2},
    "ray: catdog reader, 512 files/task, 2 decode threads": {"block": 512, "source": "catdog", "threads": 2},
    "ray: catdog reader, 1024 files/task, 2 decode threads": {"block": 1024, "source": "catdog", "threads": 2},
}


def run_one(name: str, args: argparse.Namespace) -> float:
    """Each measurement in a fresh process: no warm Ray, no shared page-cache advantage beyond the OS."""
    code = (
        "import json, sys, time; sys.argv = sys.argv[:1]; "
        f"sys.path.insert(0, {str(HERE)!r}); import levers as L; import argparse; "
        f"a = argparse.Namespace(**{vars(args)!r}); p = L.files(a.data, a.n); name = {name!r}\n"
        "if name in L.LEVERS:\n"
        "    t = time.perf_counter(); n = L.LEVERS[name](p, a); s = time.perf_counter() - t\n"
        "else:\n"
        "    n, s = L.ray_reader(p, a.size, cpus=2, **L.RAY_LEVERS[name])\n"
        "print(json.dumps({'rate': n / s}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])["rate"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("CATDOG_DATA", str(REPO.parent / "shared/data/dogs-vs-cats")))
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="64 files, one run each (used by the tests)")
    parser.add_argument("--only", action="append", help="only levers whose name contains this text (repeatable)")
    args = parser.parse_args()
    if args.smoke:
        args.n, args.repeats = 64, 1
    print(f"| lever | images/s (median of {args.repeats}) | spread |\n|---|---|---|")
    for name in [n for n in (*LEVERS, *RAY_LEVERS) if not args.only or any(text in n for text in args.only)]:
        rates = [run_one(name, args) for _ in range(args.repeats)]
        print(f"| {name} | {statistics.median(rates):.0f} | {min(rates):.0f}-{max(rates):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
