"""Fault injection for tests, installed into every Ray worker by a ``worker_process_setup_hook``.

Product code knows nothing of it: the hook wraps ``catdog.training.train_one_epoch`` inside the
worker process.  A test arms a fault by writing a small JSON file into ``CATDOG_FAULTS_DIR``:

    exit.json {"min_step": 8, "after_batches": 2}: in the first epoch that starts at global step >= 8,
        the worker calls os._exit(1) after 2 batches (mid-epoch), once; "delay_s" waits first.

    upload_exit.json {"epoch": 2}: the worker dies inside ``ray.train.report`` while uploading epoch 2's
        checkpoint to storage: the other files arrive whole, ``model.pt`` half, and the report never returns.
        It fires only once the controller has recorded epoch 1's checkpoint (Ray Train V2 collects reports
        every 2 s, and an epoch can be shorter: a worker dying before that restarts from scratch).
    predict_exit.json {}: an inference actor dies on its next batch.

``stall_after_first_parquet_file`` is armed differently: a test runs a job's driver through it
(see tests/test_inference.py) to catch the driver mid-write of a new ``predictions/``.

Every patched Train worker also writes ``train-worker-<pid>.pid`` so tests can kill it from outside,
and appends the global step each ``train_one_epoch`` call starts at to ``train-steps.log``.

Each fault fires at most once: the firing worker renames the arm file to ``*.fired`` first.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import sys
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


def _patch_checkpoint_upload() -> None:
    """upload_exit.json {"epoch": N}: die half way through uploading epoch N's checkpoint to storage."""
    train_storage = sys.modules["ray.train.v2._internal.execution.storage"]

    original = train_storage.StorageContext.persist_current_checkpoint

    def persist_current_checkpoint(self, checkpoint, checkpoint_dir_name):
        pending = faults_dir() / "upload_exit.json"
        epoch = json.loads(pending.read_text())["epoch"] if pending.exists() else None
        if (
            epoch is not None
            and checkpoint_dir_name == f"epoch_{epoch:03d}"
            and _previous_checkpoint_recorded(self, epoch)
            and _take("upload_exit")
        ):
            destination = self.build_checkpoint_path_from_name(checkpoint_dir_name)
            self.storage_filesystem.create_dir(destination)
            for name in sorted(os.listdir(checkpoint.path)):
                data = Path(checkpoint.path, name).read_bytes()
                with self.storage_filesystem.open_output_stream(f"{destination}/{name}") as out:
                    out.write(data[: len(data) // 2] if name == "model.pt" else data)
            os._exit(1)  # the upload is cut short: the controller never hears of this checkpoint
        return original(self, checkpoint, checkpoint_dir_name)

    train_storage.StorageContext.persist_current_checkpoint = persist_current_checkpoint


def _previous_checkpoint_recorded(storage, epoch: int, timeout_s: float = 120) -> bool:
    """Wait until the controller's checkpoint manager lists epoch ``epoch - 1`` (if any)."""
    if epoch <= 1:
        return True
    wanted, deadline = f"epoch_{epoch - 1:03d}", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with storage.storage_filesystem.open_input_stream(storage.checkpoint_manager_snapshot_path) as handle:
                if wanted in checkpoint_names(handle.read()):
                    return True
        except OSError:
            pass  # not written yet
        time.sleep(0.2)
    raise RuntimeError(f"upload_exit: {wanted} was never recorded by the controller")


def checkpoint_names(snapshot: str | bytes) -> set[str]:
    """The checkpoints Ray Train's checkpoint manager has registered (what a restart resumes from),
    from the text of its ``checkpoint_manager_snapshot.json``; none from a snapshot caught half written."""
    try:
        return {result["checkpoint_dir_name"] for result in json.loads(snapshot)["checkpoint_results"]}
    except ValueError:
        return set()


def _patch_predictor(inference) -> None:
    """predict_exit.json {}: the first inference actor call after arming kills the actor process."""
    original = inference.Predictor.__call__

    def __call__(self, batch):
        if (faults_dir() / "predict_exit.json").exists() and _take("predict_exit"):
            os._exit(1)
        return original(self, batch)

    inference.Predictor.__call__ = __call__


def stall_after_first_parquet_file(marker: Path) -> None:
    """For the job run in this process (a driver, not a Ray worker): after the first Parquet file
    written to a path (Ray workers write predict's parts; the driver writes only the promoted
    ``predictions/``), write the path to ``marker`` and hang, so a test can kill the job right there."""
    import pyarrow.parquet as pq

    original = pq.write_table

    def write_table(table, where, *args, **kwargs):
        original(table, where, *args, **kwargs)
        if isinstance(where, str):
            marker.write_text(where)
            while True:
                time.sleep(60)

    pq.write_table = write_table


PATCHES = {
    "catdog.training": _patch_train_one_epoch,
    "ray.train.v2._internal.execution.storage": lambda module: _patch_checkpoint_upload(),
    "catdog.inference": _patch_predictor,
}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches each module of PATCHES right after it executes, in the processes that import it.

    The hook runs in every Ray worker, most of which (Ray Data tasks, split coordinators) never
    import torch: importing catdog.training there would cost each new worker process seconds of CPU."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        PATCHES[module.__name__](module)


def install() -> None:
    """The setup hook: patch catdog in this worker process (inert until a fault is armed), each
    module when the process first imports it."""
    if faults_dir() is None or any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        return
    for name, patch in PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
    sys.meta_path.insert(0, _PatchOnImport())
