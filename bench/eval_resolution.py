"""A trained checkpoint's validation accuracy and log loss at other test-time image sizes and crops.

    python bench/eval_resolution.py RUN_DIR [--sizes 128 144 160] [--crops 0.875 1.0] [--flip] [--out FILE]

A model trained on random-resized crops sees objects larger than a centre crop of the same size
shows them, so it may score better when fed larger images than it trained at ("train at a lower
resolution, test at a higher one"; Touvron et al., FixRes, 2019).  This measures it on the run's own
validation split (never ``test1``), for the run's best checkpoint (``best.json``): each size and
crop fraction with the checkpoint's temperature, and with a temperature fitted again at that size
(on the same split, so that column is slightly optimistic, alike for every row).  ``--flip`` adds
rows with flip TTA as predict does it (each view's calibrated p(dog), averaged).  Compute only, in
this process (2 torch threads, decode in 2 threads); no Ray.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from catdog.calibration import TEMPERATURES, clipped_log_loss, pick_temperature
from catdog.checkpoints import load_model
from catdog.config import load_config
from catdog.data import decode_batch, load_split
from catdog.presets import EvalPreset
from catdog.runtime import cpu_model
from catdog.storage import Storage
from catdog.training import to_model_input

sys.path.insert(0, str(Path(__file__).parent))
from precision import cpu_line  # noqa: E402  (bench/ is not a package)

BATCH = 128


def margins(model: torch.nn.Module, storage: Storage, rows: list[dict], preset: EvalPreset) -> torch.Tensor:
    """logit(dog) - logit(cat) of every row, decoded (catdog's decode_batch) and normalised as predict does: (2, rows),
    the image and its horizontal flip."""
    out = []
    for start in range(0, len(rows), BATCH):
        paths = np.array([row["path"] for row in rows[start : start + BATCH]], dtype=object)
        images = decode_batch({"path": paths}, storage, {"image": preset}, threads=2)["image"]
        x = to_model_input(torch.from_numpy(images), torch.device("cpu"))
        with torch.inference_mode():
            views = [model(view).float() for view in (x, torch.flip(x, dims=[3]))]
        out.append(torch.stack([logits[:, 1] - logits[:, 0] for logits in views]))
    return torch.cat(out, dim=1).double()


def scores(margin: torch.Tensor, labels: np.ndarray, temperature: float) -> dict:
    """Accuracy and log loss of the views' mean p(dog) at ``temperature``, and at the best one."""

    def probs(t: float) -> np.ndarray:
        return torch.sigmoid(margin / t).mean(dim=0).numpy()

    losses = [clipped_log_loss(probs(t), labels) * len(labels) for t in TEMPERATURES]
    fitted, fitted_loss = pick_temperature(TEMPERATURES, losses, len(labels))
    return {
        "accuracy": float(((probs(temperature) >= 0.5) == labels).mean()),
        "log_loss": clipped_log_loss(probs(temperature), labels),
        "refit_temperature": fitted,
        "refit_log_loss": fitted_loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a train run's folder (config.yaml, best.json)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 144, 160])
    parser.add_argument("--crops", type=float, nargs="+", default=[0.875, 1.0])
    parser.add_argument("--flip", action="store_true", help="also score with flip TTA")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    storage = Storage()
    cfg = load_config(args.run / "config.yaml")
    checkpoint = json.loads((args.run / "best.json").read_text())["checkpoint"]
    model, meta = load_model(storage, checkpoint)
    model = model.to(memory_format=torch.channels_last)
    temperature = meta.get("temperature", 1.0)
    rows = load_split(storage, cfg.data.train, cfg.data.val_fraction, cfg.data.seed, cfg.data.limit).val
    labels = np.array([row["label"] for row in rows], dtype=np.float64)
    lines = [
        f"{checkpoint}: {meta['arch']} trained at {meta['image_size']} px (crop {meta.get('crop_fraction')}), "
        f"temperature {temperature:.3f}; {len(rows)} validation images; {cpu_model()}, {cpu_line()}",
        "",
        "| test size | crop | flip TTA | accuracy | log loss (its temperature) | refitted temperature "
        "| log loss (refitted) | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for crop in args.crops:
        for size in args.sizes:
            started = time.perf_counter()
            both = margins(model, storage, rows, EvalPreset(size, crop))
            seconds = time.perf_counter() - started
            for flip in (False, True) if args.flip else (False,):
                s = scores(both if flip else both[:1], labels, temperature)
                lines.append(
                    f"| {size} | {crop} | {'yes' if flip else 'no'} | {s['accuracy']:.4f} | {s['log_loss']:.4f} "
                    f"| {s['refit_temperature']:.3f} | {s['refit_log_loss']:.4f} | {seconds:.0f} |"
                )
                print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
