"""Self-describing checkpoints: weights + training state + ``meta.json``.

``meta.json`` carries what predict needs to rebuild the model from the checkpoint alone
(architecture, image size, normalisation, class map) plus the epoch, metrics, metric history
and the config hash.  Everything loads with ``weights_only=True``.
"""

from __future__ import annotations

import csv
import io
import json
import os

import torch
from torch import nn

from catdog.ema import ModelEma
from catdog.images import CLASS_NAMES
from catdog.models import META_FILE, MODEL_FILE, build_model, load_weights_file
from catdog.presets import MEAN, STD, EvalPreset
from catdog.storage import Storage, join

TRAIN_STATE_FILE = "train_state.pt"
METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_acc",
    "val_log_loss",
    "val_log_loss_calibrated",
    "temperature",
    "weights",
    "val_acc_raw",
    "val_log_loss_raw",
    "val_acc_ema",
    "val_log_loss_ema",
    "images_per_s",
    "train_image_size",
    "train_seconds",
    "epoch_seconds",
    "first_batch_seconds",
    "data_wait_seconds",
    "train_images",
    "val_images",
    "unreadable_images",
    "lr",
)


class CheckpointError(Exception):
    """A checkpoint that cannot be used, phrased as one line."""


def save_checkpoint(
    folder: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    cfg: dict,
    epoch: int,
    step: int,
    history: list[dict],
    scaler: torch.amp.GradScaler | None = None,
    ema: ModelEma | None = None,
) -> dict:
    """Write a checkpoint into ``folder`` and return its metadata (``temperature``: the epoch's
    fitted temperature, 1.0 when its metrics have none).  ``train_state.pt`` holds what
    resuming needs beyond the weights: optimizer, step, and the fp16 loss scaler's state
    (empty when the run does not scale: bf16 or fp32).

    With an EMA, ``model.pt`` holds the weights the epoch chose (``weights`` in ``meta.json``), so
    predict needs nothing else; ``train_state.pt`` holds the rest, each set of weights stored once:
    ``ema`` (its update count, and its weights unless they are ``model.pt``'s) and, when the EMA
    was chosen, ``raw_model``."""
    net = getattr(model, "module", model)
    chosen_ema = ema is not None and history[-1].get("weights") == "ema"
    meta = {
        "arch": cfg["arch"],
        "image_size": cfg["image_size"],
        "crop_fraction": EvalPreset(cfg["image_size"]).crop_fraction,
        "mean": list(MEAN),
        "std": list(STD),
        "class_map": {str(i): name for i, name in enumerate(CLASS_NAMES)},
        "epoch": epoch,
        "metrics": history[-1],
        # Divides the logits at predict time (catdog.calibration); fitted on this epoch's validation pass.
        "temperature": history[-1].get("temperature", 1.0),
        "history": history,
        "config_hash": cfg["config_hash"],
        # The settings that shaped this model (train_job.run_fingerprint); none for ad-hoc checkpoints.
        "fingerprint": cfg.get("fingerprint", {}),
        "run_name": cfg["run_name"],
    }
    if "amp" in cfg:  # autocast as trained: a CPU run with amp keeps it only where bf16 measured faster
        meta["amp"] = cfg["amp"]
    if cfg.get("bf16_speedup") is not None:
        meta["bf16_speedup"] = round(cfg["bf16_speedup"], 3)
    if cfg.get("budget"):  # a time-budgeted run's plan as it stands (re-planned from the real pace); a resume keeps it
        meta["plan"] = {"epochs": cfg["epochs"], "early_epochs": cfg["early_epochs"], "amp": cfg["amp"]}
    torch.save((ema.module if chosen_ema else net).state_dict(), os.path.join(folder, MODEL_FILE))
    train_state = {
        "optimizer": optimizer.state_dict(),
        "step": step,
        "epoch": epoch,
        "scaler": scaler.state_dict() if scaler is not None else {},
    }
    if ema is not None:
        meta["weights"] = "ema" if chosen_ema else "raw"
        train_state["ema"] = {"updates": ema.updates} if chosen_ema else ema.state_dict()
        if chosen_ema:
            train_state["raw_model"] = net.state_dict()
    torch.save(train_state, os.path.join(folder, TRAIN_STATE_FILE))
    with open(os.path.join(folder, META_FILE), "w") as handle:
        json.dump(meta, handle, indent=2)
    return meta


def load_checkpoint(folder: str) -> dict:
    """Everything a resumed worker needs: the trained (raw) ``model`` state, ``train_state``, ``meta``
    and ``ema`` (``{"model", "updates"}``, None without one)."""
    with open(os.path.join(folder, META_FILE)) as handle:
        meta = json.load(handle)
    weights = torch.load(os.path.join(folder, MODEL_FILE), map_location="cpu", weights_only=True)
    train_state = torch.load(os.path.join(folder, TRAIN_STATE_FILE), map_location="cpu", weights_only=True)
    ema = train_state.pop("ema", None)
    if ema is not None and "model" not in ema:  # the EMA was chosen: its weights are model.pt
        ema = {"model": weights, "updates": ema["updates"]}
    return {"meta": meta, "model": train_state.pop("raw_model", weights), "train_state": train_state, "ema": ema}


def read_meta(storage: Storage, checkpoint_uri: str) -> dict:
    try:
        return json.loads(storage.read_text(join(checkpoint_uri, META_FILE)))
    except FileNotFoundError:
        raise CheckpointError(f"{checkpoint_uri}: not a catdog checkpoint (no {META_FILE})") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint_uri}: cannot read {META_FILE} ({exc})") from None


def record_test_time(storage: Storage, checkpoint_uri: str, test_time: dict) -> None:
    """Put the validation study's test-time size and temperatures into the checkpoint's ``meta.json``
    (``test_time``), where predict reads them.  Rewritten only when they changed: a new version of
    the file changes the scoring fingerprint, which makes an incremental predict score every image again."""
    meta = read_meta(storage, checkpoint_uri)
    if meta.get("test_time") != test_time:
        storage.write_text(join(checkpoint_uri, META_FILE), json.dumps({**meta, "test_time": test_time}, indent=2))


def load_model(storage: Storage, checkpoint_uri: str) -> tuple[nn.Module, dict]:
    """Rebuild a model in eval mode from a checkpoint's own metadata and weights."""
    meta = read_meta(storage, checkpoint_uri)
    model = build_model(meta["arch"], "scratch")
    try:
        model.load_state_dict(load_weights_file(storage, checkpoint_uri))
    except RuntimeError as exc:
        raise CheckpointError(
            f"{checkpoint_uri}: weights do not fit {meta['arch']} ({str(exc).splitlines()[0]})"
        ) from None
    return model.eval(), meta


def metrics_csv(history: list[dict]) -> str:
    """One row per epoch; a column only when some epoch has it (a run without an EMA gets no EMA columns)."""
    out = io.StringIO()
    columns = [column for column in METRIC_COLUMNS if any(column in row for row in history)]
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
    return out.getvalue()
