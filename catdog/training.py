"""Ray Train data-parallel training: the per-worker loop and the small functions it wires together.

``train_loop_per_worker`` runs on every Train worker.  It sees data only through
``ray.train.get_dataset_shard`` and keeps every piece of state it needs to resume in the
checkpoint it reports each epoch (weights, optimizer, step, metric history).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import tempfile
import time
import warnings

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.data.collate_fn import NumpyBatchCollateFn
from torch import nn

from catdog.checkpoints import load_checkpoint, metrics_csv, save_checkpoint
from catdog.console import duration, emit, worker_logging
from catdog.models import build_model, split_parameters
from catdog.presets import MEAN, STD
from catdog.storage import Storage, join

logger = logging.getLogger(__name__)

CLIP = (0.005, 0.995)  # Kaggle Redux: one confident mistake must not explode log loss


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay towards 0 (one-cycle shape); a pure function of step,
    so a resumed run, or one whose epoch count changed, needs no scheduler state."""
    if total_steps <= 0:
        return 1.0
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, arch: str, cfg: dict) -> torch.optim.Optimizer:
    """Two parameter groups, backbone and head, so fine-tuning can use discriminative rates."""
    backbone, head = split_parameters(model, arch)
    groups = [{"params": backbone, "name": "backbone"}, {"params": head, "name": "head"}]
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"], nesterov=True
        )
    return torch.optim.AdamW(groups, lr=cfg["lr"], weight_decay=cfg["weight_decay"])


def set_learning_rates(optimizer: torch.optim.Optimizer, cfg: dict, step: int, total_steps: int, frozen: bool) -> float:
    """Set each group's rate for this step; a frozen backbone gets rate 0 (weights stay put)."""
    factor = lr_factor(step, total_steps, int(cfg["warmup_fraction"] * total_steps))
    backbone_mult = 0.0 if frozen else (cfg["backbone_lr_mult"] if cfg["fine_tune"] else 1.0)
    for group in optimizer.param_groups:
        group["lr"] = cfg["lr"] * factor * (backbone_mult if group["name"] == "backbone" else 1.0)
    return cfg["lr"] * factor


def to_model_input(
    images: torch.Tensor,
    device: torch.device,
    size: int | None = None,
    mean: tuple[float, ...] = MEAN,
    std: tuple[float, ...] = STD,
) -> torch.Tensor:
    """uint8 NHWC → normalised float NCHW (channels_last in memory), downscaled to ``size`` if given."""
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    if size is not None and size != x.shape[-1]:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def input_size_for_epoch(epoch: int, cfg: dict) -> int:
    """Progressive resizing: ``early_image_size`` for the first ``early_epochs``, then ``image_size``."""
    if cfg.get("early_epochs") and epoch <= cfg["early_epochs"]:
        return cfg["early_image_size"]
    return cfg["image_size"]


class Collate(NumpyBatchCollateFn):
    """Zero-copy numpy → torch.  ``valid`` marks rows that decoded; paths stay a list."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        with warnings.catch_warnings():  # Arrow buffers are read-only; we only ever read them
            warnings.simplefilter("ignore", UserWarning)
            image = torch.from_numpy(np.ascontiguousarray(batch["image"]))
        errors = batch.get("error")
        valid = np.ones(len(image), dtype=bool) if errors is None else np.array([not e for e in errors])
        return {
            "image": image,
            "label": torch.from_numpy(batch["label"].astype(np.int64)),
            "valid": torch.from_numpy(valid),
            "path": list(batch["path"]),
        }


def unreadable_paths(batch: dict) -> list[str]:
    return [path for path, ok in zip(batch["path"], batch["valid"].tolist()) if not ok]


@functools.cache  # asked on every batch; the answer never changes
def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: oneDNN runs bf16 convolutions natively (ResNet18 trains ~2x faster on
    a 2-core Sapphire Rapids). Elsewhere bf16 is emulated and slower than fp32."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # private helpers: a future torch may move them
        return False


def autocast(device: torch.device, enabled: bool):
    """Mixed precision where the hardware has it: bf16 (or fp16) on GPU, bf16 on CPUs with native bf16."""
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled and device.type == "cpu" and cpu_has_fast_bf16())


def set_backbone_frozen(model: nn.Module, arch: str, frozen: bool) -> None:
    """While frozen, backbone BatchNorm layers keep their running statistics."""
    model.train()
    if frozen:
        head_ids = {id(p) for p in split_parameters(model, arch)[1]}
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                id(p) in head_ids for p in module.parameters()
            ):
                module.eval()


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    shard,
    cfg: dict,
    *,
    step: int,
    total_steps: int,
    frozen: bool,
    device: torch.device,
    input_size: int | None = None,
    seen: list | None = None,
    progress=None,
) -> dict:
    """One pass over this worker's shard. Returns plain numbers (and the next global step).

    Rows that failed to decode stay in the batch with weight 0, so every DDP rank still takes
    the same number of steps; their paths are returned in ``unreadable``."""
    set_backbone_frozen(model, cfg["arch"], frozen)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"], reduction="none")
    scaler = torch.amp.GradScaler(
        "cuda", enabled=device.type == "cuda" and cfg["amp"] and not torch.cuda.is_bf16_supported()
    )
    loss_sum, images, lr, start, unreadable = 0.0, 0, 0.0, time.perf_counter(), []
    batches = shard.iter_torch_batches(
        batch_size=cfg["batch_size"],
        collate_fn=Collate(),
        prefetch_batches=2,
        local_shuffle_buffer_size=cfg["batch_size"] * 8,
        pin_memory=device.type == "cuda",
    )
    waits: list[float] = []
    for batch in timed_batches(batches, waits):
        lr = set_learning_rates(optimizer, cfg, step, total_steps, frozen)
        x, y = to_model_input(batch["image"], device, input_size), batch["label"].to(device, non_blocking=True)
        weight = batch["valid"].to(device, non_blocking=True).float()
        with autocast(device, cfg["amp"]):
            logits = model(x)
        loss = (loss_fn(logits.float(), y) * weight).sum() / weight.sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        n_valid = int(batch["valid"].sum())
        loss_sum += float(loss.detach()) * n_valid
        images += n_valid
        step += 1
        unreadable += unreadable_paths(batch)
        if seen is not None:
            seen.extend(p for p, ok in zip(batch["path"], batch["valid"].tolist()) if ok)
        if progress is not None:
            progress.update(1)
    seconds = time.perf_counter() - start
    totals = all_reduce_sum([loss_sum, images], device)
    return {
        "train_loss": totals[0] / max(totals[1], 1),
        "train_images": int(totals[1]),
        "train_seconds": seconds,
        # Time the step waited for its batch: the first one (pipeline start) and the rest (data-bound).
        "first_batch_seconds": waits[0] if waits else 0.0,
        "data_wait_seconds": sum(waits[1:]),
        "images_per_s": totals[1] / max(seconds, 1e-9),
        "train_image_size": input_size or cfg["image_size"],
        "lr": lr,
        "step": step,
        "unreadable": unreadable,
    }


def timed_batches(batches, waits: list[float]):
    """Yield from ``batches``, appending to ``waits`` how long each batch took to arrive."""
    iterator = iter(batches)
    while True:
        start = time.perf_counter()
        batch = next(iterator, None)
        if batch is None:
            return
        waits.append(time.perf_counter() - start)
        yield batch


def gather_lists(items: list) -> list:
    """Concatenate every rank's list (rank 0 writes it)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(items)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


@torch.inference_mode()
def evaluate(model: nn.Module, shard, cfg: dict, device: torch.device) -> dict:
    """Validation loss, accuracy and clipped log loss over every rank's share of the val set."""
    net = getattr(model, "module", model)  # no DDP collectives: ranks may see unequal val shares
    net.eval()
    totals, unreadable = [0.0, 0.0, 0.0, 0], []  # loss, correct, log loss, images
    for batch in shard.iter_torch_batches(batch_size=cfg["batch_size"] * 2, collate_fn=Collate(), prefetch_batches=2):
        unreadable += unreadable_paths(batch)
        valid = batch["valid"]
        if not valid.any():
            continue
        x, y = to_model_input(batch["image"][valid], device), batch["label"][valid].to(device)
        with autocast(device, cfg["amp"]):
            logits = net(x).float()
        prob_dog = torch.softmax(logits, dim=1)[:, 1].clamp(*CLIP)
        totals[0] += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        totals[1] += float((logits.argmax(1) == y).sum())
        totals[2] += float(nn.functional.binary_cross_entropy(prob_dog, y.float(), reduction="sum"))
        totals[3] += len(y)
    loss, correct, log_loss, n = all_reduce_sum(totals, device)
    n = max(n, 1)
    return {
        "val_loss": loss / n,
        "val_acc": correct / n,
        "val_log_loss": log_loss / n,
        "val_images": int(n),
        "unreadable": unreadable,
    }


def train_loop_per_worker(cfg: dict) -> None:
    """Entry point of every Train worker: resume if there is a checkpoint, then train epoch by epoch."""
    worker_logging()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    clock = {"started": time.time(), "epochs_before": 0}
    if cfg.get("torch_threads"):
        torch.set_num_threads(cfg["torch_threads"])
    device = ray.train.torch.get_device()
    storage: Storage = cfg["storage"]
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(folder)
    model = build_model(cfg["arch"], "scratch" if state else cfg["init"], storage=storage)
    if state:
        model.load_state_dict(state["model"])
    model = model.to(device, memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    optimizer = build_optimizer(model, cfg["arch"], cfg)
    history: list[dict] = state["meta"]["history"] if state else []
    step = state["train_state"]["step"] if state else 0
    if state:
        optimizer.load_state_dict(state["train_state"]["optimizer"])
    steps_per_epoch = math.ceil(cfg["n_train"] // world / cfg["batch_size"])
    total_steps = steps_per_epoch * cfg["epochs"]
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    clock["epochs_before"] = len(history)
    for epoch in range(len(history) + 1, cfg["epochs"] + 1):
        frozen = epoch <= cfg["freeze_backbone_epochs"]
        progress = epoch_progress_bar(cfg, epoch, steps_per_epoch) if rank == 0 else None
        stats = train_one_epoch(
            model,
            optimizer,
            train_shard,
            cfg,
            step=step,
            total_steps=total_steps,
            frozen=frozen,
            device=device,
            input_size=input_size_for_epoch(epoch, cfg),
            progress=progress,
        )
        if progress is not None:
            progress.close()
        step = stats.pop("step")
        val = evaluate(model, val_shard, cfg, device)
        unreadable = sorted(gather_lists(stats.pop("unreadable") + val.pop("unreadable")))
        metrics = {"epoch": epoch, **stats, **val, "unreadable_images": len(unreadable)}
        history.append(metrics)
        if rank == 0 and unreadable:
            emit(
                f"warning: {cfg['arch']}: skipped {len(unreadable)} unreadable images; "
                f"list: {cfg['arch_uri']}/unreadable.txt",
                err=True,
            )
            cfg["storage"].write_text(join(cfg["arch_uri"], "unreadable.txt"), "\n".join(unreadable) + "\n")
        report_epoch(model, optimizer, cfg, metrics, history, step, rank)
        if rank == 0:
            emit(epoch_line(cfg, metrics, clock))


def epoch_progress_bar(cfg: dict, epoch: int, steps: int):
    """A live bar on the driver's terminal (Ray's tqdm_ray relays it); None when the driver's
    console is not a TTY, so pipes and log files get no redraws."""
    if not cfg.get("progress_bar"):
        return None
    from ray.experimental.tqdm_ray import tqdm

    return tqdm(total=steps, desc=f"{cfg['arch']} epoch {epoch}/{cfg['epochs']}", unit="step")


def epoch_line(cfg: dict, metrics: dict, clock: dict) -> str:
    """One console line per epoch, with the time left for this architecture and for the run
    (from the pace of the epochs this worker trained; later architectures at this run's pace)."""
    now, run = time.time(), cfg["run_clock"]
    epoch, epochs = metrics["epoch"], cfg["epochs"]
    arch_pace = (now - clock["started"]) / max(epoch - clock["epochs_before"], 1)
    arch_left = arch_pace * (epochs - epoch)
    run_done = run["epochs_done"] + epoch - clock["epochs_before"]
    run_left = arch_left + (now - run["started"]) / max(run_done, 1) * run["epochs_after"]
    return (
        f"{cfg['arch']} epoch {epoch}/{epochs}: train_loss {metrics['train_loss']:.4f} "
        f"val_acc {metrics['val_acc']:.4f} val_log_loss {metrics['val_log_loss']:.4f} "
        f"{metrics['images_per_s']:.0f} img/s | elapsed {duration(now - run['arch_started'])} "
        f"ETA {duration(arch_left)} ({cfg['arch']}) {duration(run_left)} (run)"
    )


def report_epoch(model, optimizer, cfg: dict, metrics: dict, history: list[dict], step: int, rank: int) -> None:
    """Every rank reports; rank 0 also writes the checkpoint, refreshes ``metrics.csv`` and, once
    the checkpoint is stored, logs the epoch to MLflow (a restart never logs an epoch twice)."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="catdog-ckpt-") as folder:
        save_checkpoint(folder, model, optimizer, cfg=cfg, epoch=metrics["epoch"], step=step, history=history)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=f"epoch_{metrics['epoch']:03d}",
        )
    cfg["storage"].write_text(join(cfg["arch_uri"], "metrics.csv"), metrics_csv(history))
    if cfg.get("mlflow"):
        from catdog.tracking import log_epoch

        log_epoch(cfg["mlflow"], metrics)


def write_json(storage: Storage, uri: str, payload: dict) -> None:
    storage.write_text(uri, json.dumps(payload, indent=2, sort_keys=True) + "\n")
