"""Fault injection for tests, installed into every Ray worker by a ``worker_process_setup_hook``.

Product code knows nothing of it: the hook wraps ``catdog.training.train_one_epoch`` inside the
worker process.  A test arms a fault by writing a small JSON file into ``CATDOG_FAULTS_DIR``:

    exit.json {"min_step": 8, "after_batches": 2}: in the first epoch that starts at global step >= 8,
        the worker calls os._exit(1) after 2 batches (mid-epoch), once.

Every patched Train worker also writes ``train-worker-<pid>.pid`` so tests can kill it from outside.

Each fault fires at most once: the firing worker renames the arm file to ``*.fired`` first.
"""

from __future__ import annotations

import json
import os
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
    def __init__(self, shard, after_batches: int):
        self.shard, self.after = shard, after_batches

    def iter_torch_batches(self, **kwargs):
        for index, batch in enumerate(self.shard.iter_torch_batches(**kwargs)):
            if index == self.after:
                os._exit(1)
            yield batch


def install() -> None:
    """The setup hook: patch ``train_one_epoch`` in this worker process."""
    if faults_dir() is None:
        return
    import catdog.training as training

    original = training.train_one_epoch
    if getattr(original, "_faults", False):
        return

    def train_one_epoch(model, optimizer, shard, cfg, **kwargs):
        folder = faults_dir()
        (folder / f"train-worker-{os.getpid()}.pid").write_text(str(os.getpid()))
        pending = folder / "exit.json"
        if pending.exists():
            spec = json.loads(pending.read_text())
            if kwargs["step"] >= spec.get("min_step", 0) and _take("exit"):
                shard = _ExitingShard(shard, spec.get("after_batches", 1))
        return original(model, optimizer, shard, cfg, **kwargs)

    train_one_epoch._faults = True
    training.train_one_epoch = train_one_epoch
