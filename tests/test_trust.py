"""Trust at scale: a storage fault never becomes a wrong label, and the numbers a run reports describe
the model it checkpoints.  (That a rerun never reuses stale models: test_training's rerun test.)

Trainings and predicts run in-process in the session Ray (``ray_session``); a job subprocess
(``jobs/*.py`` with its own embedded Ray, some 25-35 CPU seconds of start-up) only where a test
checks what the job itself does: its exit code and its one ``error:`` line.  The S3 tests run
against ``moto_server`` through a fault-injecting proxy, with the dummy credentials of test_s3."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, copy_images, jpeg_bytes, quick_overrides, set_args, write_image
from s3proxy import FaultyS3Proxy

from catdog import storage as storage_module
from catdog.calibration import TEMPERATURES, log_loss_sums, pick_temperature
from catdog.checkpoints import load_model
from catdog.config import load_config, split_overrides
from catdog.data import decode_batch, image_dataset, load_split
from catdog.images import decode_image, list_images
from catdog.predict_job import run_predict
from catdog.presets import EvalPreset
from catdog.runtime import ResourceError
from catdog.storage import ReadError, Storage, read_failure_in, read_with_retries
from catdog.train_job import run_training
from catdog.training import CLIP, build_optimizer, to_model_input, train_one_epoch

STORAGE = Storage()


def tiny_cfg(data: Path, root: Path, run_name: str, **extra):
    """One small Sequential CNN: 96 real images at 32 px, one epoch, fp32 (exact comparisons)."""
    sets = {"models": "[sequential_cnn]", "data.limit": 96, "data.image_size": 32, "train.amp": False, **extra}
    return load_config(REPO / "configs" / "quick.yaml", quick_overrides(data, root, run_name, **sets))


def read_metrics(arch: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO((arch / "metrics.csv").read_text())))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


# -- small pieces, no Ray ----------------------------------------------------------------------------


def test_make_set_values_split_on_spaces_outside_brackets_and_quotes():
    assert split_overrides("models=[resnet18, mobilenet_v2]  train.epochs=2 run_name='a b' x={a: 1, b: 2}") == [
        "models=[resnet18, mobilenet_v2]",
        "train.epochs=2",
        "run_name='a b'",
        "x={a: 1, b: 2}",
    ]
    assert split_overrides("") == []


def test_reads_are_retried_and_a_lasting_failure_names_the_object(monkeypatch):
    monkeypatch.setattr(storage_module, "READ_BACKOFF_S", 0.0)
    attempts = []

    def flaky() -> bytes:
        attempts.append(1)
        if len(attempts) < 3:
            raise OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.")
        return b"ok"

    assert read_with_retries("s3://b/cat.1.jpg", flaky) == b"ok" and len(attempts) == 3

    def always_slow() -> bytes:
        raise OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.")

    with pytest.raises(ReadError) as info:
        read_with_retries("s3://b/cat.2.jpg", always_slow)
    assert str(info.value).startswith("s3://b/cat.2.jpg: Please reduce your request rate.")
    # Deep inside whatever Ray wraps it in, the driver still finds the object and says it in one line.
    wrapped = RuntimeError(f"Training failed due to worker errors:\nTraceback ...\nReadError: {info.value}\n...")
    found = read_failure_in(wrapped)
    assert found is not None and "\n" not in str(found) and "s3://b/cat.2.jpg" in str(found)
    assert read_failure_in(RuntimeError("something else")) is None
    # Names with spaces, as the error itself and inside a Ray traceback: the whole name, never its tail.
    for uri in ("s3://b/my cats/cat 2.jpg", "/data/test set/7.jpg"):
        failure = ReadError(f"{uri}: listed but gone (read failed after 5 attempt(s))")
        for exc in (failure, RuntimeError(f"ray::ReadFiles() (pid=1)\n  File x\ncatdog.storage.ReadError: {failure}")):
            found = read_failure_in(exc)
            assert found is not None and f"despite retries: {uri}: listed but gone;" in str(found), found


def test_a_file_that_cannot_be_read_fails_the_batch_and_bytes_that_do_not_decode_become_an_error_row(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(storage_module, "READ_BACKOFF_S", 0.0)
    good = write_image(tmp_path / "cat.1.jpg")
    corrupt = tmp_path / "cat.2.jpg"
    corrupt.write_bytes(jpeg_bytes()[:100])
    gone = tmp_path / "dog.3.jpg"  # listed, then deleted before the task read it
    presets = {"image": EvalPreset(16)}
    batch = {"path": np.array([str(good), str(corrupt)], dtype=object), "label": np.zeros(2)}
    out = decode_batch(batch, STORAGE, presets)
    assert [bool(e) for e in out["error"]] == [False, True]
    batch = {"path": np.array([str(good), str(corrupt), str(gone)], dtype=object), "label": np.zeros(3)}
    with pytest.raises(ReadError, match=re.escape(f"{gone}: listed but gone (read failed after 5 attempt(s))")):
        decode_batch(batch, STORAGE, presets, threads=2)


# -- the training loop -----------------------------------------------------------------------------


@pytest.mark.slow
def test_an_undecodable_file_leaves_batchnorm_statistics_as_the_batch_without_it(tmp_path, ray_session):
    from catdog.models import build_model

    folder = tmp_path / "train"
    for i in range(6):
        write_image(folder / f"cat.{i}.jpg", color=(200, 30 + 20 * i, 40), size=(40, 40))
        write_image(folder / f"dog.{i}.jpg", color=(30, 40 + 20 * i, 200), size=(40, 40))
    paths = list_images(STORAGE, str(folder))
    rows = [{"path": p, "label": int("dog" in Path(p).name)} for p in paths]
    (folder / "cat.99.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with_bad = [*rows, {"path": str(folder / "cat.99.jpg"), "label": 0}]
    cfg = {
        "arch": "sequential_cnn",
        "batch_size": 16,  # every row in one step
        "label_smoothing": 0.0,
        "amp": False,
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 0.0,
        "warmup_fraction": 0.0,
        "fine_tune": False,
        "backbone_lr_mult": 1.0,
        "image_size": 32,
    }

    def running_stats(dataset_rows: list[dict]) -> dict:
        torch.manual_seed(0)
        model = build_model("sequential_cnn")
        stats = train_one_epoch(
            model,
            build_optimizer(model, "sequential_cnn", cfg),
            image_dataset(STORAGE, dataset_rows, EvalPreset(32), batch_size=16),
            cfg,
            step=0,
            total_steps=1,
            frozen=False,
            device=torch.device("cpu"),
        )
        assert stats["train_images"] == 12 and stats["step"] == 1  # one step over the whole batch
        return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}

    clean, dirty = running_stats(rows), running_stats(with_bad)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in clean.items() if "mean" in k)  # they did move
    # Equal up to float summation order (the batch is shuffled); a zero image counted by BatchNorm
    # would move the first layer's running mean by about 1/13 of its value.
    for key in clean:
        gap = float((dirty[key] - clean[key]).abs().max())
        assert torch.allclose(dirty[key], clean[key], rtol=1e-4, atol=1e-5), f"{key}: max difference {gap}"


# One tiny training run read by the next tests.  A test that writes into it works on a copy.  Two
# Train workers for the test of what they report; the others read a checkpoint however many wrote it.
TINY_SETS = {"train.freeze_backbone_epochs": 1, "train.num_workers": 2, "data.limit": 160}


@pytest.fixture(scope="module")
def tiny_run(small_real_data, tmp_path_factory, ray_session) -> Path:
    """The run folder of tiny_cfg with TINY_SETS: two workers, and a backbone warm-up asked for (which
    a scratch model ignores)."""
    root = tmp_path_factory.mktemp("tiny")
    run_training(tiny_cfg(small_real_data, root, "tiny", **TINY_SETS))
    return root / "tiny"


@pytest.mark.slow
def test_a_scratch_model_never_freezes_its_backbone(tiny_run):
    after = torch.load(tiny_run / "sequential_cnn" / "epoch_001" / "model.pt", weights_only=True)
    # BatchNorm starts at weight 1, bias 0, running mean 0: epoch 1 moved the backbone's (layer 1 is its first BN).
    assert not torch.equal(after["1.weight"], torch.ones_like(after["1.weight"]))
    assert not torch.equal(after["1.running_mean"], torch.zeros_like(after["1.running_mean"]))


@pytest.mark.slow
def test_two_workers_report_the_accuracy_of_the_checkpoint_they_write(tiny_run):
    cfg = load_config(tiny_run / "config.yaml")  # the settings the run trained with
    assert cfg.train.num_workers == 2
    arch = tiny_run / "sequential_cnn"
    reported = read_metrics(arch)[0]
    model, meta = load_model(STORAGE, str(arch / "epoch_001"))
    split = load_split(STORAGE, cfg.data.train, cfg.data.val_fraction, cfg.data.seed, cfg.data.limit)
    preset = EvalPreset(meta["image_size"])
    images = torch.from_numpy(np.stack([decode_image(Path(r["path"]).read_bytes(), preset) for r in split.val]))
    labels = torch.tensor([r["label"] for r in split.val])
    with torch.inference_mode():
        logits = model(to_model_input(images, torch.device("cpu"))).float()
    prob_dog = torch.softmax(logits, dim=1)[:, 1].clamp(*CLIP)
    accuracy = float((logits.argmax(1) == labels).float().mean())
    log_loss = float(torch.nn.functional.binary_cross_entropy(prob_dog, labels.float()))
    assert int(reported["val_images"]) == len(split.val)
    assert float(reported["val_acc"]) == pytest.approx(accuracy, abs=1e-6)
    assert float(reported["val_log_loss"]) == pytest.approx(log_loss, rel=1e-4)
    # The temperature: fitted from both ranks' all-reduced sums, as if from every val image at once.
    sums = log_loss_sums(logits[:, 1] - logits[:, 0], labels, torch.tensor(TEMPERATURES))
    temperature, calibrated = pick_temperature(TEMPERATURES, sums.tolist(), len(labels))
    assert float(reported["temperature"]) == pytest.approx(temperature, abs=1e-6)
    assert float(reported["val_log_loss_calibrated"]) == pytest.approx(calibrated, rel=1e-4)
    assert meta["temperature"] == pytest.approx(temperature, abs=1e-9)


@pytest.mark.slow
def test_a_predict_section_that_can_never_be_placed_stops_training_before_it_starts(
    small_real_data, tmp_path, ray_session
):
    cfg = tiny_cfg(small_real_data, tmp_path, "unplaceable", **{"predict.concurrency": 9})
    with pytest.raises(ResourceError, match=r"^predict needs 9 CPUs \(predict.concurrency=9"):
        run_training(cfg)
    assert not (tmp_path / "unplaceable").exists()


# -- evaluate --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_scores_the_validation_split_and_counts_training_images_in_an_input(
    small_real_data, tiny_run, tmp_path, caplog
):
    from catdog.predict_job import run_evaluate

    shutil.copytree(tiny_run, tmp_path / "tiny")  # evaluate writes into the run
    cfg = tiny_cfg(small_real_data, tmp_path, "tiny", **TINY_SETS)
    split = load_split(STORAGE, cfg.data.train, cfg.data.val_fraction, cfg.data.seed, cfg.data.limit)
    metrics = json.loads(Path(run_evaluate(cfg)).read_text())
    assert metrics["split"] == "validation" and metrics["n_images"] == len(split.val)
    assert metrics["input"].startswith(f"validation split of {cfg.data.train}")
    val = {Path(r["path"]).name for r in split.val}
    scored = pq.read_table(tmp_path / "tiny" / "evaluate" / "predictions").column("path").to_pylist()
    assert {Path(p).name for p in scored} == val
    with caplog.at_level(logging.WARNING):
        metrics = json.loads(Path(run_evaluate(cfg, cfg.data.train)).read_text())
    # data.limit keeps that many of the 400 images; all but the validation fraction of them trained the model.
    trained = round(cfg.data.limit * (1 - cfg.data.val_fraction))
    assert metrics["split"] == "input" and metrics["train_overlap"] == len(split.train) == trained
    assert f"{len(split.train)} of its 400 labelled images are in the model's training split" in caplog.text
    assert not (tiny_run / "evaluate").exists()  # the shared run was only read


# -- storage faults through a proxy in front of moto_server ------------------------------------------


@pytest.fixture(scope="module")
def faulty_s3(tmp_path_factory, small_real_data):
    """moto_server with 120 training images (60 cats, 60 dogs) and 20 test images."""
    from test_s3 import MotoServer

    server = MotoServer(tmp_path_factory.mktemp("moto-faults") / "moto_server.log")
    name = server.bucket("catdog-faults")
    staging = tmp_path_factory.mktemp("faults-data")
    names = [f"{kind}.{i}.jpg" for kind in ("cat", "dog") for i in range(60)]
    copy_images(small_real_data / "train", staging / "train", names)
    copy_images(small_real_data / "test1", staging / "test1", [f"{i}.jpg" for i in range(1, 21)])
    pafs.copy_files(
        str(staging), f"{name}/data", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=server.fs()
    )
    yield server, name
    server.stop()


def fault_sets(endpoint: str, name: str) -> list[str]:
    sets = {
        "storage.endpoint_url": endpoint,
        "storage.root": f"s3://{name}/runs",
        "run_name": "faulty",
        "data.train": f"s3://{name}/data/train",
        "data.test": f"s3://{name}/data/test1",
        "data.limit": "null",
        "data.image_size": 32,
        "models": "[sequential_cnn]",
        "train.amp": "false",
        "train.report": "false",  # nothing here reads the validation study or the report
    }
    return [f"{k}={v}" for k, v in sets.items()]


def fault_job(job: str, endpoint: str, name: str, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    from test_s3 import job_env

    args = [sys.executable, str(REPO / "jobs" / f"{job}.py"), "--config", str(REPO / "configs" / "quick.yaml")]
    args += [*set_args(fault_sets(endpoint, name)), *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=cwd, env=job_env())


def s3_text(server, key: str) -> str:
    with server.fs().open_input_stream(key) as stream:
        return stream.read().decode()


@pytest.fixture(scope="module")
def survived_slowdowns(faulty_s3, ray_session):
    """Train and predict (in-process, in the session Ray) through a proxy that answers 503 SlowDown
    to 20% of object GETs."""
    from test_s3 import s3_credentials

    server, name = faulty_s3
    with s3_credentials(), FaultyS3Proxy(server.port, slowdown=0.2, seed=14) as proxy:
        cfg = load_config(REPO / "configs" / "quick.yaml", fault_sets(proxy.endpoint, name))
        train = run_training(cfg)
        predict = run_predict(cfg)
    return {"train": train, "predict": predict, "faults": proxy.faults["503 SlowDown"], "gets": proxy.object_gets}


@pytest.mark.slow
def test_train_and_predict_use_every_image_through_20_percent_slowdowns(faulty_s3, survived_slowdowns):
    server, name = faulty_s3
    assert survived_slowdowns["train"] == f"s3://{name}/runs/faulty/best.json"
    assert survived_slowdowns["predict"] == f"s3://{name}/runs/faulty/submission.csv"
    print(
        f"\nsurvived {survived_slowdowns['faults']} injected 503 SlowDown answers "
        f"out of {survived_slowdowns['gets']} object GETs"
    )
    assert survived_slowdowns["faults"] >= 20
    epoch = next(csv.DictReader(io.StringIO(s3_text(server, f"{name}/runs/faulty/sequential_cnn/metrics.csv"))))
    assert int(epoch["train_images"]) + int(epoch["val_images"]) == 120
    assert int(epoch["unreadable_images"]) == 0
    assert s3_text(server, f"{name}/runs/faulty/sequential_cnn/unreadable.txt") == ""
    submission = s3_text(server, f"{name}/runs/faulty/submission.csv").splitlines()
    assert submission[0] == "id,label" and len(submission) == 21
    infos = server.fs().get_file_info(pafs.FileSelector(f"{name}/runs/faulty/predictions"))
    tables = [pq.read_table(server.fs().open_input_file(i.path)) for i in infos if i.path.endswith(".parquet")]
    errors = [e for t in tables for e in t.column("error").to_pylist()]
    assert len(errors) == 20 and not any(errors)


@pytest.mark.slow
def test_a_denied_test_image_fails_predict_naming_it_and_keeps_the_old_submission(
    faulty_s3, survived_slowdowns, tmp_path
):
    """predict as a job subprocess: its exit code and one error line."""
    server, name = faulty_s3
    assert survived_slowdowns["predict"] == f"s3://{name}/runs/faulty/submission.csv"
    before = s3_text(server, f"{name}/runs/faulty/submission.csv")
    denied = f"{name}/data/test1/7.jpg"
    with FaultyS3Proxy(server.port, denied={denied}) as proxy:
        # --full: an incremental rerun would reuse every earlier result and never read the denied key.
        proc = fault_job("predict", proxy.endpoint, name, tmp_path, "--full")
    lines = error_lines(proc.stderr)
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-4000:]
    assert f"s3://{denied}" in lines[0] and "access denied" in lines[0], lines[0]
    assert proxy.faults["403 AccessDenied"] >= 1
    assert s3_text(server, f"{name}/runs/faulty/submission.csv") == before
