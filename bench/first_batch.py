"""Where the training block shuffle sits: its first batch and whole pass, side by side.

    python bench/first_batch.py [--data DIR] [--images 6000] [--size 96] [--repeats 2]

``after``: the old training dataset, blocks shuffled after the decode (an all-to-all step that waits
for the whole pass's decode); ``before``: what ``train_datasets`` builds now
(``image_dataset(shuffle_blocks=True)``: blocks of paths shuffled, then a streaming decode).  One
process, one embedded Ray (4 logical CPUs, as configs/local.yaml), the two alternated.
Prints one line per pass.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_pass(ds) -> tuple[float, float, int]:
    start, first, rows = time.perf_counter(), None, 0
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        first = time.perf_counter() - start if first is None else first
        rows += len(batch["label"])
    return first, time.perf_counter() - start, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "dogs-vs-cats"))
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import ray

    from catdog.data import image_dataset
    from catdog.images import label_from_path, list_images
    from catdog.presets import TrainPreset
    from catdog.storage import Storage

    storage = Storage()
    paths = list_images(storage, str(Path(args.data) / "train"))[: args.images]
    rows = [{"path": p, "label": label_from_path(p)} for p in paths]
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    for repeat in range(args.repeats):
        for where in ("after", "before"):
            ds = image_dataset(storage, rows, TrainPreset(args.size), batch_size=128, shuffle_blocks=where == "before")
            ds = ds.randomize_block_order() if where == "after" else ds
            first, seconds, n = one_pass(ds)
            print(f"repeat {repeat} shuffle {where} decode: first batch {first:.2f} s, {n} rows in {seconds:.2f} s")


if __name__ == "__main__":
    main()
