"""Fault injection for tests, installed into every Ray worker by a ``worker_process_setup_hook``.

Product code knows nothing of it: the hook wraps ``catdog.training.train_one_epoch`` inside the
worker process.  A test arms a fault by writing a small JSON file into ``CATDOG_FAULTS_DIR``:

    exit.json {"min_step": 8, "after_batches": 2}: in the first epoch that starts at global step >= 8,
        the worker calls os._exit(1) after 2 batches (mid-epoch), once; "delay_s" waits first.

    ckpt_exit.json {"epoch": 2}: the worker dies while writing epoch 2's checkpoint files.
    predict_exit.json {}: an inference actor dies on its next batch.

Every patched Train worker also writes ``train-worker-<pid>.pid`` so tests can kill it from outside,
and appends the global step each ``train_one_epoch`` call starts at to ``train-steps.log``.

Each fault fires at most once: the firing worker renames the arm file to ``*.fired`` first.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def faults_dir() -> Path | None:
    value = os.environ.get("CATDOG_FAULTS_DIR")
    return Path(value) if value else None


def arm(folder: Path, name: str, **spec) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def _take(name: str) -> dict | None:
    folder = faults_dir()
    if folder is None:
        return None
    path = folder / f"{name}.json"
    try:
        os.rename(path, folder / f"{name}.fired")  # atomic: only one worker wins
    except OSError:
        return None
    return json.loads((folder / f"{name}.fired").read_text())


class _ExitingShard:
    def __init__(self, shard, after_batches: int, delay_s: float):
        self.shard, self.after, self.delay_s = shard, after_batches, delay_s

    def iter_torch_batches(self, **kwargs):
        for index, batch in enumerate(self.shard.iter_torch_batches(**kwargs)):
            if index == self.after:
                # The Train controller learns of a reported checkpoint when it next polls the
                # workers; a death before that restarts from the checkpoint before it.
                time.sleep(self.delay_s)
                os._exit(1)
            yield batch


def _patch_train_one_epoch(training) -> None:
    original = training.train_one_epoch

    def train_one_epoch(model, optimizer, shard, cfg, **kwargs):
        folder = faults_dir()
        (folder / f"train-worker-{os.getpid()}.pid").write_text(str(os.getpid()))
        with open(folder / "train-steps.log", "a") as log:
            log.write(f"{kwargs['step']}\n")
        pending = folder / "exit.json"
        if pending.exists():
            spec = json.loads(pending.read_text())
            if kwargs["step"] >= spec.get("min_step", 0) and _take("exit"):
                shard = _ExitingShard(shard, spec.get("after_batches", 1), spec.get("delay_s", 0))
        return original(model, optimizer, shard, cfg, **kwargs)

    training.train_one_epoch = train_one_epoch


def _patch_save_checkpoint(training) -> None:
    """ckpt_exit.json {"epoch": N}: die half way through writing epoch N's checkpoint files."""
    original = training.save_checkpoint

    def save_checkpoint(folder, model, optimizer, **kwargs):
        pending = faults_dir() / "ckpt_exit.json"
        if pending.exists() and kwargs["epoch"] == json.loads(pending.read_text())["epoch"] and _take("ckpt_exit"):
            meta = original(folder, model, optimizer, **kwargs)
            with open(os.path.join(folder, "model.pt"), "r+b") as handle:
                handle.truncate(100)  # the weights file is half written when the process dies
            os._exit(1)
            return meta
        return original(folder, model, optimizer, **kwargs)

    training.save_checkpoint = save_checkpoint


def _patch_predictor(inference) -> None:
    """predict_exit.json {}: the first inference actor call after arming kills the actor process."""
    original = inference.Predictor.__call__

    def __call__(self, batch):
        if (faults_dir() / "predict_exit.json").exists() and _take("predict_exit"):
            os._exit(1)
        return original(self, batch)

    inference.Predictor.__call__ = __call__


def install() -> None:
    """The setup hook: patch catdog in this worker process (inert until a fault is armed)."""
    if faults_dir() is None:
        return
    import catdog.inference as inference
    import catdog.training as training

    if getattr(training, "_faults_installed", False):
        return
    training._faults_installed = True
    _patch_train_one_epoch(training)
    _patch_save_checkpoint(training)
    _patch_predictor(inference)
