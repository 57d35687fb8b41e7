"""The report draws a figure again only when its data changed: predict's refresh reads no validation image."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from conftest import REPO, write_image

from catdog.config import load_config
from catdog.models import META_FILE, MODEL_FILE, build_model
from catdog.predict_job import run_predict
from catdog.report import write_report
from catdog.storage import Storage

FIGURES = ("curves.png", "confusion.png", "wrong.png", "test_histogram.png")


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_predictions(folder: Path, columns: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), folder / "part-00000.parquet")


def fake_run(tmp_path: Path):
    """A trained run's folder as train leaves it (leaderboard, metrics, validation predictions of
    eight validation images, four of them wrong), and its config."""
    cfg = load_config(REPO / "configs" / "quick.yaml", [f"storage.root={tmp_path / 'runs'}"])
    run = Path(cfg.run_uri)
    write_csv(
        run / "leaderboard.csv",
        [{"arch": "sequential_cnn", "val_acc": 0.5, "val_log_loss": 0.7, "checkpoint": str(run / "ckpt")}],
    )
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 0.9 / e, "val_acc": 0.5 + e / 10} for e in (1, 2)]
    write_csv(run / "sequential_cnn" / "metrics.csv", history)
    paths = [str(write_image(tmp_path / "val" / f"{kind}.{i}.jpg", color=(40 * i, 90, 200))) for i in range(4)
             for kind in ("cat", "dog")]  # fmt: skip
    truth = [0 if "/cat." in p else 1 for p in paths]
    prob = [0.9 if i % 4 == 0 else (0.8 if t else 0.2) for i, t in enumerate(truth)]  # the cats 0 and 2: wrong
    write_predictions(
        run / "val_predictions",
        {
            "path": paths,
            "truth": pa.array(truth, pa.int8()),
            "prob_dog": pa.array(prob, pa.float32()),
            "label": pa.array([int(p >= 0.5) for p in prob], pa.int8()),
            "error": pa.nulls(len(paths), pa.string()),
            "model": ["sequential_cnn:ckpt"] * len(paths),
        },
    )
    return cfg, run, paths


def test_a_refresh_after_predict_reads_no_validation_image_and_draws_only_the_histogram(tmp_path):
    cfg, run, val_paths = fake_run(tmp_path)
    write_predictions(run / "predictions", {"prob_dog": pa.array([0.1, 0.7, 0.9], pa.float32())})
    write_report(cfg, Storage())  # train's report: draws every figure, reading the wrong images
    drawn = {name: (run / "report" / name).stat().st_mtime_ns for name in FIGURES}
    before = {name: (run / "report" / name).read_bytes() for name in FIGURES}
    for path in val_paths:  # the validation images are gone (another machine, a deleted folder)
        Path(path).unlink()
    write_predictions(run / "predictions", {"prob_dog": pa.array([0.2, 0.3, 0.4, 0.95], pa.float32())})

    page = Path(write_report(cfg, Storage())).read_text()

    for name in ("curves.png", "confusion.png", "wrong.png"):  # kept as they were, not drawn again
        assert (run / "report" / name).read_bytes() == before[name], name
        assert (run / "report" / name).stat().st_mtime_ns == drawn[name], name
    assert (run / "report" / "test_histogram.png").read_bytes() != before["test_histogram.png"]
    for name in FIGURES:
        assert f'alt="{name}" src="data:image/png;base64,' in page, name
    assert "id='wrong'" in page and "none wrong" not in page


def test_a_figure_is_drawn_again_when_its_data_changes_or_its_png_is_gone(tmp_path):
    cfg, run, val_paths = fake_run(tmp_path)
    write_report(cfg, Storage())
    before = {name: (run / "report" / name).read_bytes() for name in FIGURES[:3]}
    table = pq.read_table(run / "val_predictions")
    flipped = pa.array([1.0 - p for p in table["prob_dog"].to_pylist()], pa.float32())
    write_predictions(run / "val_predictions", table.set_column(2, "prob_dog", flipped).to_pydict())
    (run / "report" / "curves.png").unlink()

    write_report(cfg, Storage())

    assert (run / "report" / "wrong.png").read_bytes() != before["wrong.png"]  # other images, other titles
    assert (run / "report" / "curves.png").read_bytes() == before["curves.png"]  # drawn again, same data
    assert (run / "report" / "confusion.png").read_bytes() == before["confusion.png"]  # labels kept: same matrix


def test_predict_into_the_run_refreshes_its_report_with_the_validation_images_gone(tmp_path, ray_session):
    cfg, run, val_paths = fake_run(tmp_path)
    cfg = cfg.model_copy(update={"predict": cfg.predict.model_copy(update={"batch_size": 4})})
    write_report(cfg, Storage())  # as train leaves it
    wrong = (run / "report" / "wrong.png").read_bytes()
    for path in val_paths:
        Path(path).unlink()
    checkpoint = tmp_path / "checkpoint"  # an untrained Sequential CNN at 32 px
    checkpoint.mkdir()
    torch.save(build_model("sequential_cnn").state_dict(), checkpoint / MODEL_FILE)
    (checkpoint / META_FILE).write_text(json.dumps({"arch": "sequential_cnn", "image_size": 32}))
    images = [write_image(tmp_path / "test" / f"{i}.jpg", color=(30 * i, 60, 90)) for i in range(1, 7)]

    submission = run_predict(cfg, str(checkpoint), str(images[0].parent))

    assert Path(submission) == run / "submission.csv" and len(Path(submission).read_text().splitlines()) == 7
    page = (run / "report.html").read_text()
    assert 'alt="test_histogram.png"' in page and "run predict first" not in page
    assert (run / "report" / "wrong.png").read_bytes() == wrong
