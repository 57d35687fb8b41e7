"""Batch inference and evaluation: Parquet schema, Kaggle CSV, bad files, TTA, ensemble, metrics."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, jpeg_bytes
from test_scoring_plan import previous_result, seed_previous_result

import catdog.inference
from catdog.inference import Predictor
from catdog.predict_job import run_evaluate, run_predict
from catdog.scoring_plan import PREDICTION_SCHEMA
from catdog.storage import Storage

pytestmark = pytest.mark.slow


def read_submission(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def read_predictions(folder: Path) -> pa.Table:
    return pq.read_table(folder)


@pytest.fixture(scope="module")
def messy_test_folder(tmp_path_factory, small_real_data) -> Path:
    """Real test images plus every kind of bad file a test folder may hold."""
    folder = tmp_path_factory.mktemp("messy") / "test1"
    shutil.copytree(small_real_data / "test1", folder)
    (folder / "9001.jpg").write_bytes(jpeg_bytes()[:120])  # truncated
    (folder / "9002.jpg").write_bytes(b"")  # zero bytes
    (folder / "9003.jpg").write_text("<html><body>404</body></html>")  # HTML named .jpg
    (folder / "9004.JPG").write_bytes((small_real_data / "test1" / "1.jpg").read_bytes())  # upper-case extension
    (folder / "notes.txt").write_text("ignore me")
    (folder / ".9005.jpg").write_bytes(jpeg_bytes())  # hidden
    return folder


@pytest.fixture(scope="module")
def predicted(quick_run, messy_test_folder, tmp_path_factory):
    cfg, best_uri = quick_run
    out = tmp_path_factory.mktemp("predict")
    submission = run_predict(cfg, input_uri=str(messy_test_folder), output_uri=str(out))
    return cfg, out, Path(submission)


def test_predictions_parquet_has_the_exact_schema_and_one_row_per_file(predicted, messy_test_folder):
    cfg, out, _ = predicted
    table = read_predictions(out / "predictions")
    assert table.schema.equals(PREDICTION_SCHEMA)
    files = sorted(
        p.name
        for p in messy_test_folder.iterdir()
        if not p.name.startswith(".") and p.suffix.lower() in (".jpg", ".jpeg", ".png")
    )
    assert sorted(Path(p).name for p in table.column("path").to_pylist()) == files
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 124
    errors = {row["id"]: row for row in table.to_pylist() if row["error"] is not None}
    assert set(errors) == {9001, 9002, 9003}
    assert all(row["prob_dog"] is None and row["label"] is None for row in errors.values())
    good = [row for row in table.to_pylist() if row["error"] is None]
    assert all(
        0 <= row["prob_dog"] <= 1 and row["label"] == int(row["prob_dog"] >= cfg.predict.threshold) for row in good
    )
    best = json.loads((Path(cfg.run_uri) / "best.json").read_text())
    assert {row["model"] for row in good} == {f"{best['arch']}:{Path(best['checkpoint']).name}"}


def test_submission_is_exactly_the_kaggle_format(predicted):
    cfg, out, submission = predicted
    assert submission == out / "submission.csv"
    text = submission.read_text()
    assert '"' not in text and text.startswith("id,label\n") and text.endswith("\n")
    header, rows = read_submission(submission)
    assert header == ["id", "label"]
    ids = [int(r[0]) for r in rows]
    assert ids == sorted(ids) and len(ids) == len(set(ids)) == 124
    labels = {int(r[0]): int(r[1]) for r in rows}
    assert set(labels.values()) <= {0, 1}
    parquet = {row["id"]: row for row in read_predictions(out / "predictions").to_pylist()}
    for id_, label in labels.items():
        expected = cfg.predict.unreadable_label if parquet[id_]["error"] else parquet[id_]["label"]
        assert label == expected


def test_rerun_overwrites_instead_of_appending(predicted, quick_run, messy_test_folder):
    cfg, out, submission = predicted
    before = submission.read_text()
    run_predict(cfg, input_uri=str(messy_test_folder), output_uri=str(out))
    assert submission.read_text() == before
    assert read_predictions(out / "predictions").num_rows == 124
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_proba_writes_clipped_probabilities(quick_run, messy_test_folder, tmp_path):
    cfg, _ = quick_run
    submission = Path(run_predict(cfg, input_uri=str(messy_test_folder), output_uri=str(tmp_path), proba=True))
    header, rows = read_submission(submission)
    probs = {int(r[0]): float(r[1]) for r in rows}
    assert header == ["id", "label"] and len(probs) == 124
    assert all(0.005 <= p <= 0.995 for p in probs.values())
    raw = {r["id"]: r["prob_dog"] for r in read_predictions(tmp_path / "predictions").to_pylist()}
    readable = [i for i in probs if raw[i] is not None]
    assert len(readable) == 121
    assert all(math.isclose(probs[i], min(max(raw[i], 0.005), 0.995), abs_tol=1e-6) for i in readable)
    # unreadable_label 1 ("dog"), clipped like every other probability
    assert [probs[i] for i in (9001, 9002, 9003)] == [0.995] * 3


def four_test_images(small_real_data, *refs) -> dict:
    """A decoded batch in the shape the predictor gets from Ray Data: a column per model's preset."""
    from catdog.images import decode_image

    paths = sorted((small_real_data / "test1").glob("*.jpg"))[:4]
    return {
        **{ref.column: np.stack([decode_image(p.read_bytes(), ref.preset) for p in paths]) for ref in refs},
        "error": np.array([None] * 4, dtype=object),
        "id": np.array([int(p.stem) for p in paths]),
        "path": np.array([str(p) for p in paths], dtype=object),
    }


def best_model_ref(quick_run):
    from catdog.inference import model_ref

    _, best_uri = quick_run
    return model_ref(Storage(), json.loads(Path(best_uri).read_text())["checkpoint"])


def test_predictor_uses_the_configured_threads_and_scores_a_batch(quick_run, small_real_data):
    import torch

    ref = best_model_ref(quick_run)
    before = torch.get_num_threads()
    try:
        predictor = Predictor(Storage(), [ref], 0.5, tta=False, use_gpu=False, torch_threads=1)
        assert torch.get_num_threads() == 1
        table = predictor(four_test_images(small_real_data, ref))
    finally:
        torch.set_num_threads(before)
    probs = table.column("prob_dog").to_pylist()
    assert table.num_rows == 4 and all(0.0 <= p <= 1.0 for p in probs)
    assert table.column("label").to_pylist() == [int(p >= 0.5) for p in probs]


def test_predictor_normalises_with_the_checkpoint_own_mean_and_std(quick_run, small_real_data, tmp_path):
    import torch

    from catdog.checkpoints import load_model
    from catdog.inference import model_ref
    from catdog.models import build_model
    from catdog.training import to_model_input

    cfg, _ = quick_run
    # Not the best model: whichever wins, a fresh MobileNetV2 scores every image alike (its outputs
    # do not depend on the input at init), while a fresh ResNet18's do.
    resnet = json.loads((Path(cfg.run_uri) / "resnet18" / "result.json").read_text())["checkpoint"]
    ref = model_ref(Storage(), resnet)
    assert ref.arch == "resnet18"
    assert (ref.mean, ref.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    copy = tmp_path / "epoch_copy"
    shutil.copytree(ref.checkpoint, copy)
    torch.manual_seed(0)
    torch.save(build_model(ref.arch, "scratch").state_dict(), copy / "model.pt")
    meta = json.loads((copy / "meta.json").read_text())
    # far from ImageNet's, so that the two normalisations give clearly different scores
    meta["mean"], meta["std"] = [1.0, 1.0, 1.0], [0.05, 0.05, 0.05]
    (copy / "meta.json").write_text(json.dumps(meta))
    other = model_ref(Storage(), str(copy))
    assert (other.mean, other.std) == ((1.0, 1.0, 1.0), (0.05, 0.05, 0.05))
    batch = four_test_images(small_real_data, ref)
    changed = Predictor(Storage(), [other], 0.5, tta=False, use_gpu=False)(batch).column("prob_dog").to_numpy()
    model, _ = load_model(Storage(), str(copy))
    with torch.inference_mode():
        images = torch.from_numpy(batch[ref.column])
        by_hand = {
            norm: torch.softmax(
                model(to_model_input(images, torch.device("cpu"), mean=m, std=s)) / other.temperature, 1
            )[:, 1].numpy()
            for norm, (m, s) in {"stored": (other.mean, other.std), "imagenet": (ref.mean, ref.std)}.items()
        }
    np.testing.assert_allclose(changed, by_hand["stored"], atol=1e-6)
    assert np.abs(changed - by_hand["imagenet"]).max() > 1e-3


def test_tta_changes_probabilities_but_not_the_schema(quick_run, small_real_data, tmp_path):
    cfg, _ = quick_run
    # ResNet18's global pooling sees the flip; a barely trained model may be near constant.
    model = json.loads((Path(cfg.run_uri) / "resnet18" / "result.json").read_text())["checkpoint"]
    # 16 images show the flip's effect as well as all 120 would, for less scoring in each of 3 runs.
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((small_real_data / "test1").glob("*.jpg"))[:16]:
        shutil.copy(path, images / path.name)
    run_predict(cfg, model, str(images), str(tmp_path / "plain"))
    run_predict(cfg, model, str(images), str(tmp_path / "tta"), tta=True)
    plain, tta = (
        read_predictions(tmp_path / "plain" / "predictions"),
        read_predictions(tmp_path / "tta" / "predictions"),
    )
    assert tta.schema.equals(PREDICTION_SCHEMA)
    a = dict(zip(plain.column("id").to_pylist(), plain.column("prob_dog").to_pylist()))
    b = dict(zip(tta.column("id").to_pylist(), tta.column("prob_dog").to_pylist()))
    assert a.keys() == b.keys()
    assert any(abs(a[i] - b[i]) > 1e-6 for i in a)
    assert tta.column("model")[0].as_py().endswith("+tta")
    # predict.tta (what configs/local.yaml sets) is the default when the call or command says nothing.
    by_config = cfg.model_copy(update={"predict": cfg.predict.model_copy(update={"tta": True})})
    run_predict(by_config, model, str(images), str(tmp_path / "by-config"))
    table = read_predictions(tmp_path / "by-config" / "predictions")
    assert dict(zip(table.column("id").to_pylist(), table.column("prob_dog").to_pylist())) == b
    assert table.column("model")[0].as_py().endswith("+tta")


@pytest.mark.parametrize("job", ["predict", "evaluate"])
def test_tta_flags_leave_the_choice_to_the_config_unless_given(job):
    """No flag leaves ``tta`` unset (``predict.tta`` decides in the job); ``--tta`` / ``--no-tta`` override it."""
    from catdog.cli import JOBS, job_parser

    _, add_arguments, _, _ = JOBS[job]
    parser = job_parser(job)
    add_arguments(parser)

    def tta(*flags: str) -> bool | None:
        return parser.parse_args(["--config", "c.yaml", *flags]).tta

    assert (tta(), tta("--tta"), tta("--no-tta")) == (None, True, False)


def test_ensemble_applies_the_weights_fitted_on_validation(quick_run, small_real_data, tmp_path):
    cfg, _ = quick_run
    run_predict(cfg, input_uri=str(small_real_data / "test1"), output_uri=str(tmp_path), ensemble=True)
    table = read_predictions(tmp_path / "predictions")
    assert table.num_rows == 120 and table.schema.equals(PREDICTION_SCHEMA)
    from catdog.inference import model_ref

    weights = json.loads((Path(cfg.run_uri) / "val_study.json").read_text())["ensemble"]["weights"]
    board = [line.split(",")[-1] for line in (Path(cfg.run_uri) / "leaderboard.csv").read_text().splitlines()[1:]]
    assert sorted(weights) == sorted(board) and sum(weights.values()) == pytest.approx(1.0)
    used = [uri for uri in board if weights[uri] > 0]  # members that never helped on validation are left out
    model = table.column("model")[0].as_py()
    assert sorted(model.split("+")) == sorted(model_ref(Storage(), uri).name for uri in used)
    # Each probability is the weighted mean of the members' own calibrated ones: score a few images
    # with each member alone.
    refs = [model_ref(Storage(), uri) for uri in used]
    assert not cfg.predict.amp
    batch = four_test_images(small_real_data, *refs)  # each at the test size its study chose
    members = [Predictor(Storage(), [ref], 0.5, tta=False, use_gpu=False).prob_dog(batch) for ref in refs]
    expected = np.array([weights[uri] for uri in used]) @ np.array(members)
    ensemble = {row["id"]: row["prob_dog"] for row in table.to_pylist()}
    np.testing.assert_allclose([ensemble[i] for i in batch["id"]], expected, atol=1e-5)


def test_predict_applies_the_temperature_and_no_calibrate_rescores_without_it(
    quick_run, small_real_data, tmp_path, capsys
):
    """The best checkpoint's temperature divides its logits; ``--no-calibrate`` into the same output
    changes the scoring fingerprint, so every image is scored again, with the model's own logits."""
    cfg, best_uri = quick_run
    best = Path(json.loads(Path(best_uri).read_text())["checkpoint"])
    meta = json.loads((best / "meta.json").read_text())
    assert meta["temperature"] == meta["metrics"]["temperature"] > 0
    copy = tmp_path / "checkpoint"
    shutil.copytree(best, copy)
    # The fitted temperature, unless training happened to land on 1.0 (then nothing would differ).
    temperature = meta["temperature"] if abs(meta["temperature"] - 1) > 0.05 else 2.0
    # Predict applies the validation study's temperature (test_time) where there is one.
    test_time = {**meta["test_time"], "temperature": temperature}
    (copy / "meta.json").write_text(json.dumps({**meta, "temperature": temperature, "test_time": test_time}))
    out, images = tmp_path / "out", str(small_real_data / "test1")
    probs = {}
    for calibrate in (True, False):
        run_predict(cfg, str(copy), images, str(out), calibrate=calibrate)
        assert "predict: scored 120, reused 0" in capsys.readouterr().out
        table = read_predictions(out / "predictions")
        probs[calibrate] = dict(zip(table.column("id").to_pylist(), table.column("prob_dog").to_pylist()))
    ids = sorted(probs[True])
    calibrated, raw = (np.array([probs[c][i] for i in ids], dtype=np.float64) for c in (True, False))
    keep = (np.minimum(raw, 1 - raw) > 1e-4) & (np.minimum(calibrated, 1 - calibrated) > 1e-4)  # float32 logits
    assert keep.sum() > 50

    def logit(p):
        return np.log(p / (1 - p))

    np.testing.assert_allclose(logit(calibrated[keep]) * temperature, logit(raw[keep]), rtol=1e-3, atol=1e-3)


def test_evaluate_production_path_on_labelled_images(quick_run, small_real_data, tmp_path):
    cfg, _ = quick_run
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    for name in [f"{kind}.{i}.jpg" for kind in ("cat", "dog") for i in range(30)]:
        shutil.copy(small_real_data / "train" / name, labelled / name)
    (labelled / "cat.999.jpg").write_bytes(b"")  # unreadable, labelled
    (labelled / "readme.jpg").write_bytes(jpeg_bytes())  # no label: skipped
    metrics = json.loads(Path(run_evaluate(cfg, str(labelled), output_uri=str(tmp_path / "out"))).read_text())
    assert metrics["n_images"] == 60 and metrics["n_unreadable"] == 1
    confusion = np.array(metrics["confusion"])
    assert confusion.shape == (2, 2) and confusion.sum() == 60 and confusion.sum(axis=1).tolist() == [30, 30]
    assert metrics["accuracy"] == pytest.approx(np.trace(confusion) / 60)
    assert 0 < metrics["log_loss"] < 10 and metrics["input"] == str(labelled)


class StubPredictor(Predictor):
    """Known probabilities keyed by file name, so the metrics can be checked by hand."""

    PROBS = {
        "cat.1.jpg": 0.1,
        "cat.2.jpg": 0.3,
        "cat.3.jpg": 0.8,
        "dog.1.jpg": 0.9,
        "dog.2.jpg": 0.6,
        "dog.3.jpg": 0.2,
        "dog.4.jpg": 1.0,
    }

    def __init__(self, storage, models, threshold, tta, use_gpu, torch_threads=None, amp=False, measure_amp=False,
                 margins=False, fold_batchnorm=False):  # fmt: skip
        self.threshold, self.tta, self.name, self.models, self.margins = threshold, tta, "stub", [], margins
        self.weights = np.ones(1, dtype=np.float32)
        self.temperatures = torch.ones(1, 1, 1)

    def member_margins(self, batch):
        probs = torch.tensor([self.PROBS[Path(p).name] for p in batch["path"]], dtype=torch.float64)
        return torch.logit(probs).float()[None, None, :]  # (1 model, 1 view, rows): sigmoid gives them back


def test_evaluate_metrics_by_hand_with_a_stub_predictor(quick_run, tmp_path, monkeypatch):
    cfg, _ = quick_run
    folder = tmp_path / "hand"
    folder.mkdir()
    for name in StubPredictor.PROBS:
        (folder / name).write_bytes(jpeg_bytes())
    monkeypatch.setattr(catdog.inference, "Predictor", StubPredictor)
    metrics = json.loads(Path(run_evaluate(cfg, str(folder), output_uri=str(tmp_path / "out"))).read_text())
    # cats: 0.1 ok, 0.3 ok, 0.8 wrong; dogs: 0.9 ok, 0.6 ok, 0.2 wrong, 1.0 ok (clipped to 0.995)
    assert metrics["confusion"] == [[2, 1], [1, 3]]
    assert metrics["accuracy"] == pytest.approx(5 / 7)
    expected = (
        -(
            math.log(0.9)
            + math.log(0.7)
            + math.log(0.2)
            + math.log(0.9)
            + math.log(0.6)
            + math.log(0.2)
            + math.log(0.995)
        )
        / 7
    )
    assert metrics["log_loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["n_images"] == 7 and metrics["n_unreadable"] == 0 and metrics["model"] == "stub"


def test_failed_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    storage = Storage()
    target = tmp_path / "submission.csv"
    storage.write_text(str(target), "id,label\n1,0\n")

    class Boom(Exception):
        pass

    real = storage.resolve

    def failing_resolve(uri):
        fs, path = real(uri)

        class HalfWriter:
            def __getattr__(self, name):
                return getattr(fs, name)

            def open_output_stream(self, p):
                stream = fs.open_output_stream(p)

                class Stream:
                    def __enter__(self):
                        return self

                    def __exit__(self, *exc):
                        stream.close()

                    def write(self, data):
                        stream.write(data[: len(data) // 2])
                        raise Boom()

                return Stream()

        return HalfWriter(), path

    monkeypatch.setattr(Storage, "resolve", lambda self, uri: failing_resolve(uri))
    with pytest.raises(Boom):
        storage.write_text(str(target), "id,label\n1,1\n2,1\n3,0\n")
    assert target.read_text() == "id,label\n1,0\n"


# Runs a job script with tests/faults.py's driver stall armed: argv is MARKER SCRIPT ARGS...
STALLED_DRIVER = (
    "import runpy, sys; from pathlib import Path; import faults; "
    "faults.stall_after_first_parquet_file(Path(sys.argv[1])); sys.argv = sys.argv[2:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def test_predict_job_killed_while_promoting_leaves_the_previous_complete_submission(
    quick_run, small_real_data, tmp_path
):
    """SIGKILL the predict job once the promotion of the new result has written its first file: the
    previous submission.csv and predictions/ are left exactly as they were, never a partial or a
    mixed one.  (Killed while scoring: test_scoring_plan's killed predict.)"""
    cfg, best_uri = quick_run
    out = tmp_path / "out"
    seeded = seed_previous_result(out)
    config = tmp_path / "cfg.yaml"
    config.write_text(cfg.to_yaml())
    log = tmp_path / "predict.log"
    stalled = tmp_path / "promoting.marker"
    images = small_real_data / "test1"
    args = ["--config", str(config), "--model", best_uri, "--input", str(images), "--output", str(out)]
    command = [sys.executable, "-c", STALLED_DRIVER, str(stalled), str(REPO / "jobs" / "predict.py"), *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    with open(log, "wb") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while not stalled.exists():  # the driver wrote the new result's first file and hangs there
            assert proc.poll() is None, f"predict ended before it was killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not promoting within 300 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert previous_result(out) == seeded


def test_submission_keeps_one_row_per_id_and_warns_about_repeats_and_unreadable(tmp_path, caplog):
    from catdog.config import CatdogConfig
    from catdog.inference import submission_csv

    rows = [  # id, path, prob_dog, label, error
        (2, "in/b/2.jpg", 0.9, 1, None),
        (1, "in/1.png", 0.2, 0, None),
        (1, "in/1.jpg", 0.7, 1, None),  # same id as 1.png; "1.jpg" sorts first and wins
        (10, "in/10.jpg", None, None, "cannot identify image file"),
        (2, "in/a/2.jpg", 0.001, 0, None),  # same name in another folder; a/ wins
        (1, "in/z/1.jpg", None, None, "image file is truncated"),  # a losing repeat: not counted unreadable
        (None, "in/readme.jpg", 0.5, 1, None),  # no numeric id: left out
    ]
    folder = tmp_path / "predictions"
    folder.mkdir()
    columns = list(zip(*rows))
    table = pa.table(
        {
            "id": pa.array(columns[0], pa.int64()),
            "path": pa.array(columns[1], pa.string()),
            "prob_dog": pa.array(columns[2], pa.float32()),
            "label": pa.array(columns[3], pa.int8()),
            "model": pa.array(["m"] * len(rows), pa.string()),
            "error": pa.array(columns[4], pa.string()),
            **{column: pa.nulls(len(rows)) for column in ("size", "version", "scoring")},
        },
        schema=PREDICTION_SCHEMA,
    )
    pq.write_table(table, folder / "part-0.parquet")
    cfg = CatdogConfig()
    with caplog.at_level("WARNING"):
        labels, unreadable = submission_csv(Storage(), str(folder), cfg, proba=False)
    assert labels == "id,label\n1,1\n2,0\n10,1\n"
    assert unreadable == [10]
    assert "2 ids appear in more than one file name" in caplog.text and ": 1, 2" in caplog.text
    assert "1 files have no numeric id" in caplog.text and "readme.jpg" in caplog.text
    probs, _ = submission_csv(Storage(), str(folder), cfg, proba=True)
    assert probs == "id,label\n1,0.700000\n2,0.005000\n10,0.995000\n"
