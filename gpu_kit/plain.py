"""Plain PyTorch loops that catdog's Ray paths are timed against: the same model, batch, preprocessing,
precision and device, with a ``torch.utils.data.DataLoader`` instead of Ray Data / Ray Train.

Each returns images/s over the timed part only (after warm-up), so start-up costs stay out of it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from catdog.images import decode_image, label_from_path
from catdog.presets import EvalPreset, TrainPreset
from catdog.training import autocast, build_optimizer, grad_scaler, to_model_input


class DecodedFiles(torch.utils.data.Dataset):
    """Image files decoded with one of catdog's presets, as uint8 HWC tensors (and labels)."""

    def __init__(self, files: list[str], preset):
        self.files, self.preset = files, preset

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        image = torch.from_numpy(decode_image(Path(path).read_bytes(), self.preset))
        return image, label_from_path(path) or 0


def loader(files: list[str], preset, batch_size: int, workers: int, shuffle: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        DecodedFiles(files, preset),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        drop_last=False,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_train(
    files: list[str], arch: str, size: int, batch_size: int, epochs: int, device: torch.device, workers: int, amp: bool
) -> dict:
    """``epochs`` epochs of catdog's model, optimizer, train preset and autocast; the first epoch is
    warm-up (cuDNN autotuning, loader start), the rest are timed."""
    from catdog.models import build_model

    model = build_model(arch).to(device, memory_format=torch.channels_last).train()
    cfg = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05}
    optimizer, scaler = build_optimizer(model, arch, cfg), grad_scaler(device, amp)
    loss_fn = nn.CrossEntropyLoss()
    batches = loader(files, TrainPreset(size), batch_size, workers, shuffle=True)
    rates = []
    for _ in range(epochs):
        count, start = 0, time.perf_counter()
        for images, labels in batches:
            x, y = to_model_input(images, device), labels.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            count += len(y)
        sync(device)
        rates.append(count / (time.perf_counter() - start))
    timed = rates[1:] or rates
    return {"images_per_s": sum(timed) / len(timed), "epoch_images_per_s": rates}


@torch.inference_mode()
def plain_predict(
    files: list[str],
    model: nn.Module,
    size: int,
    crop_fraction: float,
    batch_size: int,
    device,
    workers: int,
    amp: bool,
) -> dict:
    """Score ``files`` with ``model`` (eval preset, softmax, host copy of the probabilities);
    timed from the first batch on, so the loader's start-up is left out."""
    model = model.to(device, memory_format=torch.channels_last).eval()
    batches = iter(loader(files, EvalPreset(size, crop_fraction), batch_size, workers, shuffle=False))
    first, _ = next(batches)
    with autocast(device, amp):
        model(to_model_input(first, device))  # warm-up
    sync(device)
    count, start = 0, time.perf_counter()
    for images, _ in batches:
        with autocast(device, amp):
            probs = torch.softmax(model(to_model_input(images, device)).float(), dim=1)[:, 1]
        probs.cpu()
        count += len(images)
    return {"images_per_s": count / max(time.perf_counter() - start, 1e-9), "images": count + len(first)}
