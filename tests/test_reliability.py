"""Reliability: worker, checkpoint-write, driver and inference-actor deaths; bad images everywhere."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, copy_images, epochs_of, jpeg_bytes, quick_overrides, set_args
from faults import arm, checkpoint_names
from PIL import Image

from catdog import training
from catdog.config import load_config
from catdog.data import load_split
from catdog.predict_job import run_predict
from catdog.storage import Storage
from catdog.train_job import run_training

pytestmark = pytest.mark.slow


def cfg_for(data: Path, root: Path, run_name: str, **extra):
    return load_config(
        REPO / "configs" / "quick.yaml",
        quick_overrides(data, root, run_name, **{"models": "[sequential_cnn]", **extra}),
    )


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def recorded_checkpoints(arch: Path) -> set[str]:
    """The checkpoints Ray Train's checkpoint manager has registered (what a restart resumes from)."""
    try:
        return checkpoint_names((arch / "checkpoint_manager_snapshot.json").read_text())
    except FileNotFoundError:  # not written yet
        return set()


def step_starts(faults_dir: Path) -> list[int]:
    """The global step each train_one_epoch call started at, in order (written by tests/faults.py)."""
    log = faults_dir / "train-steps.log"
    return [int(line) for line in log.read_text().split()] if log.exists() else []


def steps_per_epoch(cfg, workers: int = 1) -> int:
    n_train = len(load_split(Storage(), cfg.data.train, cfg.data.val_fraction, cfg.data.seed, cfg.data.limit).train)
    return math.ceil(n_train // workers / cfg.train.batch_size)


def test_sigkilled_worker_with_two_workers_resumes_and_logs_each_epoch_once(
    small_real_data, tmp_path, faults_dir, ray_session
):
    cfg = cfg_for(
        small_real_data, tmp_path, "sigkill", **{"train.epochs": 3, "train.num_workers": 2, "train.max_failures": 2}
    )
    arch = tmp_path / "sigkill" / "sequential_cnn"
    per_epoch = steps_per_epoch(cfg, workers=2)
    errors: list[BaseException] = []
    runner = threading.Thread(target=lambda: _capture(errors, run_training, cfg))
    runner.start()
    # Kill only once the controller has registered epoch 1's checkpoint and both workers are in epoch 2:
    # then the only right resume point is epoch 2's first step, and a restart from scratch would show.
    wait_for(
        lambda: "epoch_001" in recorded_checkpoints(arch) and step_starts(faults_dir).count(per_epoch) == 2,
        900,
        "epoch_001 registered and both workers in epoch 2",
    )
    victims = [int(p.read_text()) for p in faults_dir.glob("train-worker-*.pid") if alive(int(p.read_text()))]
    assert len(victims) == 2, victims
    os.kill(victims[0], signal.SIGKILL)
    runner.join(timeout=600)
    assert not runner.is_alive() and not errors, errors
    assert epochs_of(arch / "metrics.csv") == [1, 2, 3]
    restarted = {int(p.read_text()) for p in faults_dir.glob("train-worker-*.pid")} - set(victims)
    assert restarted, "no new Train worker was started after the kill"
    # Two workers per epoch: epochs 1 and 2, then both restarted workers at epoch 2's first step, then epoch 3.
    assert step_starts(faults_dir) == [0, 0, per_epoch, per_epoch, per_epoch, per_epoch, 2 * per_epoch, 2 * per_epoch]
    assert json.loads((tmp_path / "sigkill" / "best.json").read_text())["arch"] == "sequential_cnn"


def _capture(errors: list, fn, *args):
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 - re-raised by the test through `errors`
        errors.append(exc)


def test_death_while_uploading_a_checkpoint_never_resumes_from_the_partial_one(
    small_real_data, tmp_path, faults_dir, ray_session
):
    # Keep every checkpoint: with the default 2, whether epoch_002 survives epoch 3 depends on its val score.
    # 32 px: cheaper epochs; the fault fires inside the upload, whatever an epoch takes.
    sets = {"train.epochs": 3, "train.max_failures": 1, "train.keep_checkpoints": 3, "data.image_size": 32}
    sets["train.amp"] = True  # each worker start picks its precision again (meta.json says what it took)
    cfg = cfg_for(small_real_data, tmp_path, "ckpt-kill", **sets)
    per_epoch = steps_per_epoch(cfg)
    arm(faults_dir, "upload_exit", epoch=2)
    run_training(cfg)
    assert (faults_dir / "upload_exit.fired").exists(), "the fault never fired"
    arch = tmp_path / "ckpt-kill" / "sequential_cnn"
    assert epochs_of(arch / "metrics.csv") == [1, 2, 3]
    # Resumed at epoch 2's first step from epoch_001, not from the half-uploaded epoch_002 (nor from scratch).
    assert step_starts(faults_dir) == [0, per_epoch, per_epoch, 2 * per_epoch]
    folders = sorted(arch.glob("epoch_*"))
    assert [f.name for f in folders][-1] == "epoch_003" and "epoch_002" in {f.name for f in folders}
    for folder in folders:
        meta = json.loads((folder / "meta.json").read_text())
        torch.load(folder / "model.pt", weights_only=True)  # whole: the retried upload replaced the half file
        assert [h["epoch"] for h in meta["history"]] == list(range(1, meta["epoch"] + 1))
        if training.cpu_has_fast_bf16():
            assert meta["amp"] is (meta["bf16_speedup"] >= training.BF16_MIN_SPEEDUP)
        else:
            assert meta["amp"] is False and "bf16_speedup" not in meta


def test_sigkilled_driver_resumes_and_skips_finished_architectures(small_real_data, tmp_path, ray_session, caplog):
    overrides = quick_overrides(
        small_real_data,
        tmp_path,
        "driver",
        # 120 images at 32 px: the resume logic is what is tested, not the model
        **{"models": "[sequential_cnn,mobilenet_v2]", "train.epochs": 2, "data.limit": 120, "data.image_size": 32},
    )
    args = [sys.executable, str(REPO / "jobs" / "train.py"), "--config", str(REPO / "configs" / "quick.yaml")]
    args += set_args(overrides)
    run = tmp_path / "driver"
    log = tmp_path / "first-run.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # metrics.csv appears when the worker reports; the controller registers the checkpoint up to
        # a poll later.  Only a registered checkpoint is a resume point.
        wait_for(
            lambda: "epoch_001" in recorded_checkpoints(run / "mobilenet_v2") or proc.poll() is not None,
            900,
            "mobilenet_v2 epoch_001",
        )
        assert proc.poll() is None, f"the first run ended before it was killed:\n{log.read_text()[-3000:]}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    finished = (run / "sequential_cnn" / "result.json").read_text()
    finished_stamp = (run / "sequential_cnn" / "result.json").stat().st_mtime_ns
    first_epoch = (run / "mobilenet_v2" / "metrics.csv").read_text().splitlines()[:2]
    epoch1_stamp = (run / "mobilenet_v2" / "epoch_001" / "model.pt").stat().st_mtime_ns
    assert not (run / "best.json").exists()
    # The rerun in this process and the session Ray (what resumes is the run folder): one job start fewer.
    with caplog.at_level(logging.INFO, logger="catdog"):
        best_uri = run_training(load_config(REPO / "configs" / "quick.yaml", overrides))
    assert best_uri == str(run / "best.json")
    assert (run / "sequential_cnn" / "result.json").read_text() == finished
    assert (run / "sequential_cnn" / "result.json").stat().st_mtime_ns == finished_stamp
    assert "sequential_cnn: already trained" in caplog.text
    metrics = (run / "mobilenet_v2" / "metrics.csv").read_text().splitlines()
    assert metrics[:2] == first_epoch and epochs_of(run / "mobilenet_v2" / "metrics.csv") == [1, 2]
    assert (run / "mobilenet_v2" / "epoch_001" / "model.pt").stat().st_mtime_ns == epoch1_stamp  # not retrained
    best = json.loads((run / "best.json").read_text())
    assert best["arch"] in ("sequential_cnn", "mobilenet_v2")


def test_inference_actor_death_is_retried_without_duplicates_or_gaps(quick_run, data_dir, tmp_path, faults_dir):
    cfg, best_uri = quick_run
    images = copy_images(data_dir / "test1", tmp_path / "test1", [f"{i}.jpg" for i in range(1, 601)])
    arm(faults_dir, "predict_exit")
    run_predict(cfg, best_uri, str(images), str(tmp_path / "out"))
    assert (faults_dir / "predict_exit.fired").exists(), "the inference actor was never killed"
    ids = pq.read_table(tmp_path / "out" / "predictions", columns=["id"]).column("id").to_pylist()
    assert len(ids) == 600 and sorted(ids) == list(range(1, 601))
    with open(tmp_path / "out" / "submission.csv", newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    assert [int(r[0]) for r in rows] == list(range(1, 601))


def save(image: Image.Image, path: Path, fmt: str, **kw) -> None:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    path.write_bytes(out.getvalue())


@pytest.fixture
def nasty_train_folder(small_real_data, tmp_path) -> Path:
    """Real images plus every kind of file a real labelled folder may hold."""
    folder = copy_images(
        small_real_data / "train", tmp_path / "nasty", [f"{kind}.{i}.jpg" for kind in ("cat", "dog") for i in range(40)]
    )
    photo = Image.open(small_real_data / "train" / "dog.100.jpg").convert("RGB")
    (folder / "cat.900.jpg").write_bytes(jpeg_bytes()[:120])  # truncated
    (folder / "dog.901.jpg").write_bytes(b"")  # zero bytes
    (folder / "dog.902.jpg").write_text("<!doctype html><title>Not Found</title>")
    save(photo, folder / "cat.903.jpg", "PNG")  # PNG bytes under .jpg
    save(photo.convert("L"), folder / "dog.904.jpg", "JPEG")
    save(photo.convert("CMYK"), folder / "cat.905.jpg", "JPEG")
    save(photo.convert("P"), folder / "dog.906.png", "PNG")
    save(photo.convert("RGBA"), folder / "cat.907.png", "PNG")
    save(Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257), folder / "dog.908.png", "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    save(photo, folder / "cat.909.jpg", "JPEG", exif=exif.tobytes())
    save(Image.new("RGB", (1, 1), (90, 60, 30)), folder / "dog.910.jpg", "JPEG")
    save(photo.resize((6000, 4500)), folder / "cat.911.jpg", "JPEG", quality=70)
    save(photo, folder / "DOG.912.JPG", "JPEG")
    save(photo, folder / "cat.913 with space.jpg", "JPEG")
    save(photo, folder / "dog.914.ñandú.jpg", "JPEG")
    save(photo, folder / "readme.jpg", "JPEG")
    save(photo, folder / "bird.7.jpg", "JPEG")
    return folder


def test_training_on_a_folder_full_of_bad_files(nasty_train_folder, tmp_path, ray_session, caplog):
    cfg = load_config(
        REPO / "configs" / "quick.yaml",
        [
            f"data.train={nasty_train_folder}",
            f"storage.root={tmp_path}/runs",
            "run_name=nasty",
            "models=[sequential_cnn]",
            "data.limit=null",
            "data.val_fraction=0.25",
            "train.report=false",
        ],
    )
    run_training(cfg)
    arch = tmp_path / "runs" / "nasty" / "sequential_cnn"
    listed = (arch / "unreadable.txt").read_text().splitlines()
    assert sorted(Path(p).name for p in listed) == ["cat.900.jpg", "dog.901.jpg", "dog.902.jpg"]
    with open(arch / "metrics.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert int(row["unreadable_images"]) == 3
    # 80 real images + 12 odd but decodable ones; the 3 broken files and 2 unlabelled names are not used.
    assert int(row["train_images"]) + int(row["val_images"]) == 92
    assert "readme.jpg" in caplog.text and "bird.7.jpg" in caplog.text


def test_more_worker_deaths_than_max_failures_fail_the_run_without_a_result(
    small_real_data, tmp_path, faults_dir, ray_session
):
    from ray.train import TrainingFailedError

    # It dies in its first batch: one epoch at 32 px is all the set-up that needs.
    sets = {"train.epochs": 1, "train.max_failures": 0, "data.image_size": 32}
    cfg = cfg_for(small_real_data, tmp_path, "deaths", **sets)
    arm(faults_dir, "exit", min_step=0, after_batches=1)  # one death, none allowed
    with pytest.raises(TrainingFailedError):
        run_training(cfg)
    assert (faults_dir / "exit.fired").exists(), "the fault never fired"
    assert step_starts(faults_dir) == [0], "training went on after a death that max_failures=0 does not allow"
    run = tmp_path / "deaths"
    assert not (run / "sequential_cnn" / "result.json").exists() and not (run / "best.json").exists()
    assert not list((run / "sequential_cnn").glob("epoch_*"))
