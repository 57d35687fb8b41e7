"""Ray Train data-parallel training: the per-worker loop and the small functions it wires together.

``train_loop_per_worker`` runs on every Train worker.  It sees data only through
``ray.train.get_dataset_shard`` and keeps every piece of state it needs to resume in the
checkpoint it reports each epoch (weights, optimizer, step, metric history).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import math
import tempfile
import threading
import time
import warnings

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.data.collate_fn import NumpyBatchCollateFn
from torch import nn

from catdog import budget
from catdog.calibration import CLIP, TEMPERATURES, log_loss_sums, pick_temperature
from catdog.checkpoints import load_checkpoint, metrics_csv, save_checkpoint
from catdog.console import duration, emit, worker_logging
from catdog.ema import ModelEma
from catdog.models import build_model, split_parameters
from catdog.presets import MEAN, STD
from catdog.storage import Storage, join

logger = logging.getLogger(__name__)

# With an EMA, each epoch's metrics also carry these for both weight variants (val_acc_raw, val_acc_ema, ...).
COMPARED = ("val_acc", "val_log_loss")


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay towards 0 (one-cycle shape); a pure function of step,
    so a resumed run, or one whose epoch count changed, needs no scheduler state.

    Raising ``epochs`` on a run continues it from its last checkpoint (step and optimizer state)
    on the schedule of the new count, as if that count had been planned from step 0: the rate at
    the resumed step is the new plan's (after a finished run it jumps from near the end-of-schedule
    floor back up), then it decays to the floor at the new last step."""
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
    """Zero-copy numpy → torch.  ``valid`` marks rows that decoded.

    Every value of the batch is a tensor, so Ray's ``pin_memory`` pins it (its wrapper skips any
    batch holding a list) and the ``non_blocking`` copies to the GPU really are asynchronous.
    Paths stay beside the batch: ``paths(batch)`` returns them, by the batch's ``batch_id``."""

    def __init__(self):
        super().__init__()
        self._paths: dict[int, list[str]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # Ray collates in a thread pool

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        with warnings.catch_warnings():  # Arrow buffers are read-only; we only ever read them
            warnings.simplefilter("ignore", UserWarning)
            image = torch.from_numpy(np.ascontiguousarray(batch["image"]))
        errors = batch.get("error")
        valid = np.ones(len(image), dtype=bool) if errors is None else np.array([not e for e in errors])
        with self._lock:
            batch_id = next(self._ids)
            self._paths[batch_id] = list(batch["path"])
        return {
            "image": image,
            "label": torch.from_numpy(batch["label"].astype(np.int64)),
            "valid": torch.from_numpy(valid),
            "batch_id": torch.tensor(batch_id),
        }

    def paths(self, batch: dict[str, torch.Tensor]) -> list[str]:
        """The paths of ``batch``'s rows (once per batch: they are released here)."""
        with self._lock:
            return self._paths.pop(int(batch["batch_id"]))


def unreadable_paths(paths: list[str], batch: dict) -> list[str]:
    return [path for path, ok in zip(paths, batch["valid"].tolist()) if not ok]


@functools.cache  # asked on every batch; the answer never changes
def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: oneDNN runs bf16 convolutions natively (ResNet18 trains ~2x faster on
    a 2-core Sapphire Rapids). Elsewhere bf16 is emulated and slower than fp32."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # private helpers: a future torch may move them
        return False


@functools.cache  # asked on every batch; a process drives one GPU (Train worker, predictor actor)
def cuda_has_native_bf16() -> bool:
    """Ampere (compute capability 8.0) and later. ``is_bf16_supported()`` alone also says yes on
    7.x GPUs (T4, V100), where bf16 is only emulated: slow, or unsupported by some kernels."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast dtype where the hardware runs it natively: bf16 on Ampere+ GPUs and on CPUs
    with AMX / AVX512-BF16, fp16 on older GPUs (with a GradScaler); None means fp32."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_native_bf16() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, enabled: bool):
    """Mixed precision as :func:`amp_dtype` chooses it; a no-op context for fp32."""
    dtype = amp_dtype(device, enabled)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """Loss scaling is needed for fp16 only; a disabled scaler passes everything through."""
    return torch.amp.GradScaler("cuda", enabled=amp_dtype(device, enabled) == torch.float16)


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


@contextlib.contextmanager
def batchnorm_stats_frozen(model: nn.Module, frozen: bool):
    """While ``frozen``, BatchNorm layers normalise with batch statistics as usual but leave their
    running statistics as they are (momentum 0): a step that only keeps DDP ranks in lock-step."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if frozen else []
    saved = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(layers, saved):
            m.momentum = momentum


def valid_rows(batch: dict) -> tuple[torch.Tensor | slice, bool]:
    """The rows to train on: those that decoded (a plain slice, so no copy, when all did).  A batch
    without any keeps its first row (weight 0, BatchNorm statistics untouched) so that this rank
    still takes its step."""
    valid = batch["valid"]
    if valid.all():
        return slice(None), False
    if valid.any():
        return valid.nonzero().squeeze(1), False
    return torch.zeros(1, dtype=torch.long), True


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
    scaler: torch.amp.GradScaler | None = None,
    seen: list | None = None,
    progress=None,
    ema: ModelEma | None = None,
) -> dict:
    """One pass over this worker's shard. Returns plain numbers (and the next global step).

    Rows that failed to decode never enter the forward pass (they would skew BatchNorm's running
    statistics), but every DDP rank still takes the same number of steps; their paths are
    returned in ``unreadable``.  ``scaler`` lives as long as the run (its scale carries over
    epochs and checkpoints); the loss is summed on the device and read once, so no step waits
    for the GPU.  ``ema``, if given, is updated after every optimizer step."""
    set_backbone_frozen(model, cfg["arch"], frozen)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"], reduction="none")
    scaler = grad_scaler(device, cfg["amp"]) if scaler is None else scaler
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    images, lr, start, unreadable = 0, 0.0, time.perf_counter(), []
    collate = Collate()
    batches = iter_batches(shard, cfg["batch_size"], collate, device, local_shuffle_buffer_size=cfg["batch_size"] * 8)
    waits: list[float] = []
    for batch in timed_batches(batches, waits):
        paths = collate.paths(batch)
        lr = set_learning_rates(optimizer, cfg, step, total_steps, frozen)
        rows, placeholder = valid_rows(batch)
        x = to_model_input(batch["image"][rows], device, input_size)
        y = batch["label"][rows].to(device, non_blocking=True)
        with autocast(device, cfg["amp"]), batchnorm_stats_frozen(model, placeholder):
            logits = model(x)
        loss = loss_fn(logits.float(), y).mean() * (0.0 if placeholder else 1.0)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update(model)
        n_valid = int(batch["valid"].sum())  # a host tensor: no sync
        loss_sum += loss.detach() * n_valid
        images += n_valid
        step += 1
        unreadable += unreadable_paths(paths, batch)
        if seen is not None:
            seen.extend(p for p, ok in zip(paths, batch["valid"].tolist()) if ok)
        if progress is not None:
            progress.update(1)
    loss_total = float(loss_sum)  # the epoch's one wait for the device, before the clock stops
    seconds = time.perf_counter() - start
    totals = all_reduce_sum([loss_total, images], device)
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


def iter_batches(shard, batch_size: int, collate: Collate, device: torch.device, **options):
    """Batches of pinned host tensors (on a GPU worker).  ``device="cpu"`` keeps Ray from moving
    them itself: the loop copies the images with ``non_blocking`` and reads the ``valid`` mask on
    the host without waiting for the GPU."""
    return shard.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=collate,
        prefetch_batches=2,
        pin_memory=device.type == "cuda",
        device="cpu",
        **options,
    )


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


def multi_rank() -> bool:
    """Whether this process is one of several DDP ranks (the collectives below are no-ops otherwise)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_lists(items: list) -> list:
    """Concatenate every rank's list (rank 0 writes it)."""
    if not multi_rank():
        return list(items)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def sync_buffers_from_rank0(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.  Each rank's last training
    step updated them with its own batch; without this, ranks would validate slightly different
    models and the all-reduced metrics would describe none of them, least of all the checkpoint."""
    if not multi_rank():
        return
    for buffer in getattr(model, "module", model).buffers():
        dist.broadcast(buffer, src=0)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not multi_rank():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


@torch.inference_mode()
def evaluate(model: nn.Module, shard, cfg: dict, device: torch.device) -> dict:
    """Validation loss, accuracy and clipped log loss over every rank's share of the val set, and
    the temperature that minimises that log loss with the log loss it gives (``temperature``,
    ``val_log_loss_calibrated``; ``val_log_loss`` stays the model's own).  The temperature is
    fitted from per-temperature log-loss sums over a fixed grid, accumulated in this same pass and
    all-reduced with the other sums: no second pass, and no rank holds more than its batch."""
    return evaluate_models([model], shard, cfg, device)[0]


@torch.inference_mode()
def evaluate_models(models: list[nn.Module], shard, cfg: dict, device: torch.device) -> list[dict]:
    """:func:`evaluate` for several models in one pass over the shard: each batch is read and
    decoded once and scored by every model, so the raw weights and their EMA cost one read of the
    validation split, not two."""
    nets = [getattr(model, "module", model) for model in models]  # no DDP collectives: ranks may see unequal val shares
    for net in nets:
        net.eval()
    temperatures = torch.tensor(TEMPERATURES, dtype=torch.float64, device=device)
    # per model: loss, correct, log loss, then the log-loss sum at each temperature; summed on the
    # device and read once at the end; the image count on the host
    sums = torch.zeros(len(nets), 3 + len(TEMPERATURES), dtype=torch.float64, device=device)
    n_images, unreadable, collate = 0, [], Collate()
    for batch in iter_batches(shard, cfg["batch_size"] * 2, collate, device):
        unreadable += unreadable_paths(collate.paths(batch), batch)
        valid = batch["valid"]
        if not valid.any():
            continue
        images, labels = (
            (batch["image"], batch["label"]) if valid.all() else (batch["image"][valid], batch["label"][valid])
        )
        x, y = to_model_input(images, device), labels.to(device, non_blocking=True)
        for row, net in zip(sums, nets):
            with autocast(device, cfg["amp"]):
                logits = net(x).float()
            row += batch_sums(logits, y, temperatures)
        n_images += len(labels)
    *totals, n = all_reduce_sum([*sums.flatten().tolist(), n_images], device)
    width = sums.shape[1]
    return [validation_metrics(totals[i * width : (i + 1) * width], max(n, 1), unreadable) for i in range(len(nets))]


def batch_sums(logits: torch.Tensor, y: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """One batch's summed loss, correct count and clipped log loss, then its log-loss sum at each
    temperature, as one float64 row."""
    prob_dog = torch.softmax(logits, dim=1)[:, 1].clamp(*CLIP)
    metrics = torch.stack(
        [
            nn.functional.cross_entropy(logits, y, reduction="sum"),
            (logits.argmax(1) == y).sum(),
            nn.functional.binary_cross_entropy(prob_dog, y.float(), reduction="sum"),
        ]
    ).double()
    return torch.cat([metrics, log_loss_sums(logits[:, 1] - logits[:, 0], y, temperatures)])


def validation_metrics(totals: list[float], n: float, unreadable: list[str]) -> dict:
    """:func:`evaluate`'s dict from one model's all-reduced sums (see :func:`batch_sums`) over ``n`` images."""
    loss, correct, log_loss, *calibration = totals
    temperature, calibrated = pick_temperature(TEMPERATURES, calibration, n)
    return {
        "val_loss": loss / n,
        "val_acc": correct / n,
        "val_log_loss": log_loss / n,
        "val_log_loss_calibrated": calibrated,
        "temperature": temperature,
        "val_images": int(n),
        "unreadable": unreadable,
    }


def validate(model: nn.Module, ema: ModelEma | None, shard, cfg: dict, device: torch.device) -> dict:
    """The epoch's validation: the raw model's metrics, or with an EMA, those of the better of the two
    (:func:`pick_weights`), both scored in one pass over the shard.  Buffers first come from rank 0,
    so that every rank validates, and rank 0 checkpoints, one and the same model."""
    sync_buffers_from_rank0(model)
    if ema is None:
        return evaluate(model, shard, cfg, device)
    # DDP keeps the parameters, hence their average, identical; each rank's BatchNorm statistics differ.
    sync_buffers_from_rank0(ema.module)
    return pick_weights(*evaluate_models([model, ema.module], shard, cfg, device))


def validation_rank(metrics: dict) -> tuple[float, float]:
    """What "better on validation" means everywhere (weights, checkpoints, leaderboard): higher
    ``val_acc``, then lower ``val_log_loss``."""
    return (metrics["val_acc"], -metrics["val_log_loss"])


def pick_weights(raw: dict, ema: dict) -> dict:
    """The better of two validations of the same images: higher ``val_acc``, then lower ``val_log_loss``;
    the raw weights on a tie.  The chosen one's metrics, plus ``weights`` (which one) and both
    variants' accuracy and log loss under explicit names.  Every rank sees the same all-reduced
    metrics, so every rank chooses alike."""
    ema_wins = validation_rank(ema) > validation_rank(raw)
    return {
        **(ema if ema_wins else raw),
        "weights": "ema" if ema_wins else "raw",
        **{f"{key}_{name}": variant[key] for name, variant in (("raw", raw), ("ema", ema)) for key in COMPARED},
    }


def restore_or_start(cfg: dict, device: torch.device) -> tuple:
    """The model (on ``device``, DDP-wrapped), optimizer, grad scaler, EMA, epoch history and step:
    from the checkpoint Ray Train hands a restarted worker, else fresh.  A resumed budgeted run keeps
    the plan it was trained on (``cfg`` takes it from the checkpoint's meta)."""
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(folder)
    model = build_model(cfg["arch"], "scratch" if state else cfg["init"], storage=cfg["storage"])
    if state:
        model.load_state_dict(state["model"])
    model = ray.train.torch.prepare_model(model.to(device, memory_format=torch.channels_last))
    optimizer = build_optimizer(model, cfg["arch"], cfg)
    scaler = grad_scaler(device, cfg["amp"])  # one per run: its scale is learnt across epochs
    if state:
        optimizer.load_state_dict(state["train_state"]["optimizer"])
        restore_scaler(scaler, state["train_state"])
    ema = start_ema(model, cfg, state)
    if state and cfg.get("budget") and state["meta"].get("plan"):
        cfg.update(state["meta"]["plan"])
    history: list[dict] = state["meta"]["history"] if state else []
    return model, optimizer, scaler, ema, history, state["train_state"]["step"] if state else 0


def train_loop_per_worker(cfg: dict) -> None:
    """Entry point of every Train worker: resume if there is a checkpoint, then train epoch by epoch."""
    worker_logging()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.get("torch_threads"):
        torch.set_num_threads(cfg["torch_threads"])
    device = ray.train.torch.get_device()
    started = time.time()
    if cfg["amp"] and cfg.get("measure_amp") and not cfg.get("budget") and device.type == "cpu":
        # A budgeted run's plan measured it already.  The checkpoints' meta.json records the choice.
        cfg["amp"], cfg["bf16_speedup"] = pick_train_precision(cfg, device, rank)
    model, optimizer, scaler, ema, history, step = restore_or_start(cfg, device)
    clock = {"started": started, "epochs_before": len(history)}
    steps_per_epoch = math.ceil(cfg["n_train"] // world / cfg["batch_size"])
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    epoch = len(history)
    while epoch < cfg["epochs"]:
        epoch += 1
        epoch_started = time.time()
        frozen = cfg["fine_tune"] and epoch <= cfg["freeze_backbone_epochs"]  # a random backbone is never frozen
        progress = epoch_progress_bar(cfg, epoch, steps_per_epoch) if rank == 0 else None
        stats = train_one_epoch(
            model,
            optimizer,
            train_shard,
            cfg,
            step=step,
            total_steps=steps_per_epoch * cfg["epochs"],
            frozen=frozen,
            device=device,
            input_size=input_size_for_epoch(epoch, cfg),
            scaler=scaler,
            progress=progress,
            ema=ema,
        )
        if progress is not None:
            progress.close()
        step = stats.pop("step")
        val = validate(model, ema, val_shard, cfg, device)
        unreadable = sorted(gather_lists(stats.pop("unreadable") + val.pop("unreadable")))
        metrics = {"epoch": epoch, **stats, **val, "unreadable_images": len(unreadable)}
        history.append(metrics)
        if rank == 0:
            write_unreadable(cfg, unreadable)
        metrics["epoch_seconds"] = time.time() - epoch_started
        changed = replan(cfg, history, device) if cfg.get("budget") else None
        report_epoch(model, optimizer, cfg, metrics, history, step, rank, scaler=scaler, ema=ema)
        if rank == 0:
            emit(epoch_line(cfg, metrics, clock))
            if changed:
                emit(changed)


def write_unreadable(cfg: dict, unreadable: list[str]) -> None:
    """The images this epoch could not decode: rewritten every epoch (empty when none), so it never
    shows an earlier epoch's list; a warning on the console when there are any."""
    if unreadable:
        emit(
            f"warning: {cfg['arch']}: skipped {len(unreadable)} unreadable images; "
            f"list: {cfg['arch_uri']}/unreadable.txt",
            err=True,
        )
    cfg["storage"].write_text(join(cfg["arch_uri"], "unreadable.txt"), "".join(p + "\n" for p in unreadable))


def replan(cfg: dict, history: list[dict], device: torch.device) -> str | None:
    """Re-size a budgeted run from the real pace after every epoch (``history[-1]``, its
    ``epoch_seconds`` set).  While it still trains at the early size, up or down: the recent pace
    (:func:`recent_pace`) re-predicts every size from the plan's predictions
    (:func:`budget.paced_epoch_seconds`).  Once at the final size, only ever fewer epochs, that
    size's seconds now its recent pace: the schedule's tail must not climb back.  One epoch's pace
    is not the run's: on a Xeon with AMX ResNet18's first 96 px epoch took 147 s and the next seven
    90-132 s, and a plan fixed after the first left 9 of its 35 minutes unused (bench/NOTES.md).
    Rank 0 decides for every rank; the plan rides in ``cfg`` (and so in each checkpoint).  Returns
    a line for the console when the plan changed."""
    plan, metrics = cfg["budget"], history[-1]
    size, epoch = metrics["train_image_size"], metrics["epoch"]
    shrink_only = epoch > 1 and epoch > cfg["early_epochs"]
    pace, paced_epochs = recent_pace(history, size)
    if shrink_only:
        epoch_s = {**plan_epoch_seconds(cfg), size: pace}
    else:
        epoch_s = budget.paced_epoch_seconds(plan_epoch_seconds(cfg, "predicted_epoch_seconds"), size, pace)
    plan["epoch_seconds"] = epoch_s
    left = (plan["deadline"] - time.time()) * budget.SAFETY
    done = (epoch, min(epoch, cfg["early_epochs"]))
    epochs, early = budget.fit_epochs(left, epoch_s, plan_sizes(cfg), plan["early_fraction"], done)
    # Never longer once at the final size; and one epoch more is within one pace's noise: growing by
    # it now and shrinking back an epoch later reshapes the schedule twice for nothing.
    if epochs > cfg["epochs"] and (shrink_only or epochs == cfg["epochs"] + 1):
        epochs, early = cfg["epochs"], cfg["early_epochs"]
    epochs, early = broadcast_from_rank0([epochs, early], device)
    before = (cfg["epochs"], cfg["early_epochs"])
    cfg.update(epochs=epochs, early_epochs=early)
    if (epochs, early) == before:
        return None
    early_text = f" ({early} at {plan_sizes(cfg)[0]} px)" if early else ""
    which = f"epoch {paced_epochs[0]}'s" if len(paced_epochs) == 1 else f"epochs {paced_epochs[0]}-{paced_epochs[-1]}'s"
    return f"{cfg['arch']}: time budget: re-planned to {epochs} epochs{early_text} from {which} pace ({pace:.0f} s)"


def recent_pace(history: list[dict], size: int) -> tuple[float, list[int]]:
    """Steady seconds of an epoch at ``size`` now, and the epochs it comes from: the mean of the last
    ``budget.PACE_EPOCHS`` at that size, leaving out the run's first epoch (a warm-up) once another is
    there.  Steady: without the first epoch's wait for its first batch (the pipeline's start)."""
    at_size = [m for m in history if m["train_image_size"] == size]
    recent = ([m for m in at_size if m["epoch"] > 1] or at_size)[-budget.PACE_EPOCHS :]
    steady = [m["epoch_seconds"] - (m["first_batch_seconds"] if m["epoch"] == 1 else 0.0) for m in recent]
    return sum(steady) / len(steady), [m["epoch"] for m in recent]


def broadcast_from_rank0(values: list[int], device: torch.device) -> list[int]:
    if not multi_rank():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=0)
    return [int(v) for v in tensor.tolist()]


# bf16 runs (trains or scores) only when it beats fp32 by this much: a near tie runs in fp32, the exact one.
BF16_MIN_SPEEDUP = 1.05
# Images per timed training step when a fixed-epoch run picks its precision (about 2.6 s for
# ResNet18 at 128 px on 2 cores, bench/results/train_precision-xeon-no-amx.md).
PRECISION_TRAIN_BATCH = 16


def measure_speed(arch: str, sizes: list[int], val_size: int, cfg: dict) -> dict:
    """This worker's seconds per image: a training step at each of ``sizes`` and a validation
    forward pass at ``val_size``, on random data (compute only), in the precision it will train in:
    with ``amp`` on a CPU with bf16 instructions, bf16 if it trains ``BF16_MIN_SPEEDUP`` faster at the
    largest size (``amp``: the choice; ``precision``: what it means here; ``bf16_speedup``: fp32
    over bf16 seconds per step, where both were timed).
    ``cfg``: batch_size, amp, torch_threads, use_gpu."""
    if cfg.get("torch_threads"):
        torch.set_num_threads(cfg["torch_threads"])
    device = torch.device("cuda" if cfg["use_gpu"] and torch.cuda.is_available() else "cpu")
    model = build_model(arch, "scratch").to(device, memory_format=torch.channels_last)
    train_step = training_step(model, device)
    batch = cfg["batch_size"]

    def images(n: int, size: int) -> torch.Tensor:
        return torch.randn(n, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)

    speed, amp, step_s = {}, cfg["amp"], {}
    if amp and device.type == "cpu" and cpu_has_fast_bf16():
        # The instructions alone do not make bf16 pay: on a Xeon that has AVX512-BF16 but no AMX,
        # ResNet18 trained 0.78x as fast in bf16 as in fp32 (bench/NOTES.md, "bf16 without AMX").
        x = images(batch, max(sizes))
        fp32_s, bf16_s = (timed_call(functools.partial(train_step, amp=a), x) for a in (False, True))
        amp = fp32_s / bf16_s >= BF16_MIN_SPEEDUP  # a near tie trains in fp32
        speed["bf16_speedup"] = round(fp32_s / bf16_s, 3)
        step_s[max(sizes)] = bf16_s if amp else fp32_s  # the chosen precision's time there: not timed again
    speed["amp"] = amp
    speed["precision"] = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype(device, amp)]
    step = functools.partial(train_step, amp=amp)
    for size in sizes:
        if size not in step_s:
            step_s[size] = timed_call(step, images(batch, size))
    speed["train"] = {size: step_s[size] / batch for size in sizes}
    model.eval()
    with torch.inference_mode(), autocast(device, amp):
        speed["val"] = timed_call(model, images(batch * 2, val_size)) / (batch * 2)
    return speed


def measure_speeds(jobs: list[tuple[str, list[int], int, dict]]) -> dict[str, dict]:
    """:func:`measure_speed` for each (arch, sizes, val_size, cfg), in one process (one torch import)."""
    return {arch: measure_speed(arch, sizes, val_size, cfg) for arch, sizes, val_size, cfg in jobs}


def bf16_speedup(run, x: torch.Tensor) -> float:
    """fp32 over bf16 seconds of ``run(x, amp=...)``: one warm-up call each, then both alternated
    twice, each precision's fastest call counting (a call that another process slowed, such as Ray's
    decode tasks starting beside it, must not decide)."""
    seconds = {False: [], True: []}
    for i, amp in enumerate((False, True, False, True)):
        call = functools.partial(run, amp=amp)
        seconds[amp].append(timed_call(call, x, warmup=int(i < 2), min_calls=1, min_seconds=0))
    return min(seconds[False]) / min(seconds[True])


def training_step(model: nn.Module, device: torch.device):
    """A timing-only training step on ``model`` (forward, loss, backward, AdamW): ``step(x, amp)``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(x: torch.Tensor, amp: bool) -> None:
        with autocast(device, amp):
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), torch.zeros(len(x), dtype=torch.long, device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def pick_train_precision(cfg: dict, device: torch.device, rank: int) -> tuple[bool, float | None]:
    """A fixed-epoch run with ``amp`` on a CPU: bf16 only where a training step of a throwaway copy
    of the architecture, at its largest size, runs at least ``BF16_MIN_SPEEDUP`` faster than in fp32
    (on a Xeon with AVX512-BF16 but no AMX every model trained slower in bf16; with AMX ResNet18
    twice as fast).  Rank 0's choice holds for every rank; rank 0 says which.  Returns the choice
    and this rank's ``bf16_speedup`` (None: not timed, the CPU has no bf16 instructions)."""
    speedup = None
    if cpu_has_fast_bf16():
        size = max(cfg["image_size"], cfg.get("early_image_size") or 0)
        model = build_model(cfg["arch"], "scratch").to(device, memory_format=torch.channels_last)
        x = torch.randn(PRECISION_TRAIN_BATCH, 3, size, size, device=device).contiguous(
            memory_format=torch.channels_last
        )
        speedup = bf16_speedup(training_step(model, device), x)
    (amp,) = broadcast_from_rank0([int(speedup is not None and speedup >= BF16_MIN_SPEEDUP)], device)
    if rank == 0 and speedup is not None:
        emit(
            f"{cfg['arch']}: training in {'bf16' if amp else 'fp32'}: bf16 ran {speedup:.2f}x as fast as fp32 "
            "on this CPU (train.amp=false: always fp32)"
        )
    return bool(amp), speedup


def timed_call(fn, x: torch.Tensor, warmup: int = 2, min_calls: int = 3, min_seconds: float = 1.0) -> float:
    """Mean seconds of ``fn(x)``: after ``warmup`` calls (oneDNN builds its kernels for each new
    shape on the first ones), at least ``min_calls`` calls and ``min_seconds``, at most 50 calls."""

    def sync() -> None:
        if x.is_cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn(x)
    sync()
    calls, start = 0, time.perf_counter()
    while calls < min_calls or (time.perf_counter() - start < min_seconds and calls < 50):
        fn(x)
        sync()
        calls += 1
    return (time.perf_counter() - start) / calls


def start_ema(model: nn.Module, cfg: dict, state: dict | None) -> ModelEma | None:
    """The run's weight average (None when ``ema_decay`` is off), resumed from the checkpoint's if it
    has one.  Built after the DDP wrap: every rank starts from rank 0's weights."""
    if not cfg.get("ema_decay"):
        return None
    ema = ModelEma(model, cfg["ema_decay"])
    if state and state.get("ema"):
        ema.load_state_dict(state["ema"])
    return ema


def restore_scaler(scaler: torch.amp.GradScaler, train_state: dict) -> None:
    """Resume the loss scale where it was.  A checkpoint from a run without fp16 (bf16, fp32)
    holds an empty state, and a disabled scaler ignores what it is given."""
    if train_state.get("scaler"):
        scaler.load_state_dict(train_state["scaler"])


def epoch_progress_bar(cfg: dict, epoch: int, steps: int):
    """A live bar on the driver's terminal (Ray's tqdm_ray relays it); None when the driver's
    console is not a TTY, so pipes and log files get no redraws."""
    if not cfg.get("progress_bar"):
        return None
    from ray.experimental.tqdm_ray import tqdm

    return tqdm(total=steps, desc=f"{cfg['arch']} epoch {epoch}/{cfg['epochs']}", unit="step")


def epoch_line(cfg: dict, metrics: dict, clock: dict) -> str:
    """One console line per epoch, with the time left for this architecture and for the run.
    Under a time budget, from the plan (its epoch seconds re-planned from the real pace; the run
    ends at the budget unless the plans after this architecture are predicted to run past it).
    Otherwise from the pace of the epochs this worker trained, later architectures at the run's."""
    now, run = time.time(), cfg["run_clock"]
    epoch, epochs = metrics["epoch"], cfg["epochs"]
    if cfg.get("budget"):
        arch_left = planned_seconds_left(cfg, epoch)
        run_left = max(run["budget_end"] - now, arch_left + run["seconds_after"])
    else:
        arch_pace = (now - clock["started"]) / max(epoch - clock["epochs_before"], 1)
        arch_left = arch_pace * (epochs - epoch)
        run_done = run["epochs_done"] + epoch - clock["epochs_before"]
        run_left = arch_left + (now - run["started"]) / max(run_done, 1) * run["epochs_after"]
    return (
        f"{cfg['arch']} epoch {epoch}/{epochs}: train_loss {metrics['train_loss']:.4f} "
        f"val_acc {metrics['val_acc']:.4f} val_log_loss {metrics['val_log_loss']:.4f}{weights_note(metrics)} "
        f"{metrics['images_per_s']:.0f} img/s | elapsed {duration(now - run['arch_started'])} "
        f"ETA {duration(arch_left)} ({cfg['arch']}) {duration(run_left)} (run)"
    )


def planned_seconds_left(cfg: dict, epoch: int) -> float:
    """The budget plan's seconds for the epochs after ``epoch``."""
    done = (epoch, min(epoch, cfg["early_epochs"]))
    return budget.plan_seconds(plan_epoch_seconds(cfg), plan_sizes(cfg), (cfg["epochs"], cfg["early_epochs"]), done)


def plan_epoch_seconds(cfg: dict, key: str = "epoch_seconds") -> dict[int, float]:
    """A budgeted loop config's seconds of one epoch by training size, as re-planned (``epoch_seconds``)
    or as first predicted (``predicted_epoch_seconds``); JSON made the sizes strings."""
    return {int(k): v for k, v in cfg["budget"][key].items()}


def plan_sizes(cfg: dict) -> tuple[int, int]:
    """(early, final) training sizes of a loop config; both the final size without progressive resizing."""
    return (cfg["early_image_size"] or cfg["image_size"], cfg["image_size"])


def weights_note(metrics: dict) -> str:
    """With an EMA: which weights the epoch kept, and the other variant's scores."""
    if "weights" not in metrics:
        return ""
    other = "raw" if metrics["weights"] == "ema" else "ema"
    return (
        f" ({metrics['weights']} weights; {other}: val_acc {metrics[f'val_acc_{other}']:.4f} "
        f"val_log_loss {metrics[f'val_log_loss_{other}']:.4f})"
    )


def report_epoch(
    model,
    optimizer,
    cfg: dict,
    metrics: dict,
    history: list[dict],
    step: int,
    rank: int,
    scaler: torch.amp.GradScaler | None = None,
    ema: ModelEma | None = None,
) -> None:
    """Every rank reports; rank 0 also writes the checkpoint, refreshes ``metrics.csv`` and, once
    the checkpoint is stored, logs the epoch to MLflow (a restart never logs an epoch twice)."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="catdog-ckpt-") as folder:
        save_checkpoint(
            folder,
            model,
            optimizer,
            cfg=cfg,
            epoch=metrics["epoch"],
            step=step,
            history=history,
            scaler=scaler,
            ema=ema,
        )
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
