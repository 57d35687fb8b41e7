"""Image preprocessing, defined once: a ``train`` and an ``eval`` preset (torchvision presets.py style).

Presets work on decoded PIL images and return uint8 HWC arrays, so the expensive part (decode,
crop, resize) runs in Ray Data's CPU tasks and the Train/predict workers only convert to float
and normalise.  Predict and evaluate import ``EvalPreset``; they never rebuild it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

# ImageNet statistics; stored in every checkpoint so predict never has to guess them.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EvalPreset:
    """Resize the shorter side to ``size / crop_fraction``, then take the centre ``size`` square."""

    size: int
    crop_fraction: float = 0.875

    @property
    def source_size(self) -> int:
        return math.ceil(self.size / self.crop_fraction)

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        width, height = image.size
        # Crop box in source pixels: the centre square whose side is crop_fraction of the short side.
        side = min(width, height) * self.crop_fraction
        left, top = (width - side) / 2, (height - side) / 2
        box = (left, top, left + side, top + side)
        resized = image.resize((self.size, self.size), Image.BILINEAR, box=box, reducing_gap=3.0)
        return np.asarray(resized, dtype=np.uint8)


@dataclass(frozen=True)
class TrainPreset:
    """Random resized crop + horizontal flip."""

    size: int
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5

    @property
    def source_size(self) -> int:
        return self.size

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = math.sqrt(target * aspect)
            h = math.sqrt(target / aspect)
            if w <= width and h <= height:
                left = rng.uniform(0, width - w)
                top = rng.uniform(0, height - h)
                return (left, top, left + w, top + h)
        side = min(width, height)  # fall back to a centre square, as torchvision does
        return ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        rng = rng or np.random.default_rng()
        box = self.crop_box(*image.size, rng)
        out = image.resize((self.size, self.size), Image.BILINEAR, box=box, reducing_gap=3.0)
        if rng.random() < self.hflip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(out, dtype=np.uint8)
