"""The run report: every section, written by train and refreshed by predict; renders in Chromium."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import CHROMIUM

from catdog.predict_job import run_predict
from catdog.report import write_report
from catdog.storage import Storage

pytestmark = pytest.mark.slow

SECTIONS = ["leaderboard", "curves", "confusion", "wrong", "tta", "histogram", "throughput"]


@pytest.fixture(scope="module")
def report(quick_run, small_real_data, tmp_path_factory):
    """The report of a copy of the shared quick run (predict writes into the run folder; other tests
    read the original)."""
    cfg, _ = quick_run
    root = tmp_path_factory.mktemp("report-runs")
    shutil.copytree(cfg.run_uri, root / cfg.run_name)
    cfg = cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"root": str(root)})})
    predict_log, logger = LogLines(), logging.getLogger("catdog.predict_job")
    level = logger.level
    logger.addHandler(predict_log), logger.setLevel(logging.INFO)
    try:
        run_predict(cfg, input_uri=str(small_real_data / "test1"))  # into the run folder: adds the histogram
    finally:
        logger.removeHandler(predict_log), logger.setLevel(level)
    return Path(write_report(cfg, Storage())), cfg, predict_log.lines


class LogLines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_train_writes_the_validation_study(quick_run):
    cfg, _ = quick_run
    study = json.loads((Path(cfg.run_uri) / "val_study.json").read_text())
    assert set(study) == {"best", "best+tta", "ensemble", "ensemble+tta", "test_sizes"}
    variants = {k: v for k, v in study.items() if k != "test_sizes"}
    n_val = study["best"]["n_images"]
    assert n_val == 100 and all(v["n_images"] == n_val for v in variants.values())
    assert all(0 <= v["accuracy"] <= 1 and v["log_loss"] > 0 for v in variants.values())
    board = [line.split(",") for line in (Path(cfg.run_uri) / "leaderboard.csv").read_text().splitlines()[1:]]
    # Every model at 64 and 80 px (test_size_factors 1.0, 1.25), each with temperatures fitted there;
    # its checkpoint records the size with the lower log loss in predict's default mode (no TTA here).
    tried = {(fit["arch"], fit["image_size"]): fit for fit in study["test_sizes"]}
    assert set(tried) == {(row[0], size) for row in board for size in (64, 80)}
    for arch, *_, checkpoint in board:
        meta = json.loads((Path(checkpoint) / "meta.json").read_text())
        fits = [tried[arch, 64], tried[arch, 80]]
        chosen = min(fits, key=lambda fit: fit["plain"]["log_loss"])
        assert meta["test_time"]["image_size"] == chosen["image_size"]
        assert meta["test_time"]["temperature"] == chosen["plain"]["temperature"]
        assert meta["test_time"]["temperature_tta"] == chosen["tta"]["temperature"]
        if arch == board[0][0]:
            best, best_meta = chosen, meta
    # The best model's figures are at its chosen size, with its fitted temperature, which can only
    # lower the log loss; at the training size that refit matches training's own calibration.
    assert study["best"]["image_size"] == best["image_size"]
    assert study["best"]["log_loss"] == pytest.approx(best["plain"]["log_loss"], abs=1e-9)
    assert study["best"]["log_loss"] <= study["best"]["log_loss_uncalibrated"] + 1e-6
    assert study["best+tta"]["log_loss"] == pytest.approx(best["tta"]["log_loss"], abs=1e-9)
    at_64 = tried[board[0][0], 64]["plain"]
    assert at_64["accuracy"] == pytest.approx(float(board[0][1]), abs=1.5 / n_val)
    # Seen twice under load (stop 32: the small CNN, temperature 16 and log loss 0.6958 against
    # training's 1.569 and 0.6812; stop 36: ResNet18, 16 and 0.6967 against 2.30 and 0.6816), the
    # 80 px pass and a rerun of the study agreeing with training.  The same checkpoint scored again
    # here, in this process and without Ray, says which side is off.
    trained = best_meta["metrics"]
    rescored = rescore_without_ray(board[0][-1], Path(cfg.run_uri) / "val_predictions", 64)
    assert rescored["log_loss"] == pytest.approx(trained["val_log_loss_calibrated"], abs=1e-3), (rescored, trained)
    assert at_64["log_loss"] <= trained["val_log_loss_calibrated"] + 1e-4, (
        f"{board[0][0]} at its training size: study {at_64}, training {trained}, rescored without Ray "
        f"{rescored}; every fit: {json.dumps(study['test_sizes'])}"
    )
    assert study["best"]["log_loss"] <= trained["val_log_loss_calibrated"] + 1e-4
    # The ensemble: weights on the leaderboard's checkpoints, never worse than its best member.
    ensemble = study["ensemble"]
    assert set(ensemble["weights"]) == {row[-1] for row in board}
    assert sum(ensemble["weights"].values()) == pytest.approx(1.0)
    assert ensemble["log_loss"] <= min(m["log_loss"] for m in ensemble["members"]) + 1e-6
    assert ensemble["log_loss"] <= study["best"]["log_loss"] + 1e-6
    assert ensemble["members"][0]["log_loss"] == pytest.approx(study["best"]["log_loss"], abs=1e-9)
    assert ensemble["members"][0]["checkpoint"] == board[0][-1]
    # The kept predictions (the report's figures) are the best model's alone, as study["best"] scored them.
    kept = pq.read_table(Path(cfg.run_uri) / "val_predictions", columns=["model", "prob_dog", "truth"])
    assert kept.column("model").unique().to_pylist() == [study["best"]["model"]]
    assert study["best"]["model"].startswith(board[0][0] + ":")
    probs, truth = kept.column("prob_dog").to_numpy(), kept.column("truth").to_numpy()
    assert ((probs >= 0.5) == truth).mean() == pytest.approx(study["best"]["accuracy"], abs=1e-9)
    assert not list(Path(cfg.run_uri).glob(".val_predictions*"))  # the study's passes are cleaned up


def rescore_without_ray(checkpoint: str, kept: Path, size: int) -> dict:
    """The checkpoint's temperature, log loss and accuracy on the validation images the study kept
    (``kept``: their paths and labels), decoded and scored in this process as training validates."""
    import numpy as np
    import torch

    from catdog.calibration import fit_view_temperature
    from catdog.checkpoints import load_model
    from catdog.data import decode_batch
    from catdog.presets import EvalPreset
    from catdog.training import to_model_input

    model, meta = load_model(Storage(), checkpoint)
    rows = pq.read_table(kept, columns=["path", "truth"]).to_pydict()
    # The decode step training's validation runs in its Ray Data tasks, called here directly.
    preset = EvalPreset(size, meta["crop_fraction"])
    decoded = decode_batch({"path": np.array(rows["path"])}, Storage(), {"image": preset})
    with torch.inference_mode():
        x = to_model_input(torch.from_numpy(decoded["image"]), torch.device("cpu"), mean=meta["mean"], std=meta["std"])
        logits = model(x).float()
    margins, labels = (logits[:, 1] - logits[:, 0]).double().numpy(), np.asarray(rows["truth"])
    temperature, log_loss = fit_view_temperature(margins[None], labels)
    return {"temperature": temperature, "log_loss": log_loss, "accuracy": float(((margins > 0) == labels).mean())}


def test_predict_scores_at_the_size_and_temperature_the_study_chose(report):
    _, cfg, predict_log = report
    best = json.loads((Path(cfg.run_uri) / "best.json").read_text())["checkpoint"]
    test_time = json.loads((Path(best) / "meta.json").read_text())["test_time"]
    used = f"{test_time['image_size']}px T{test_time['temperature']:.3f}"
    assert [line for line in predict_log if re.search(rf"^predicting \d+ of \d+ images .* with \S+ {used} ", line)]


def test_report_has_every_section_inline(report):
    path, cfg, _ = report
    page = path.read_text()
    for section in SECTIONS:
        assert f"id='{section}'" in page, section
    images = re.findall(r'<img class="figure" alt="([^"]+)" src="data:image/png;base64,', page)
    assert set(images) >= {"confusion.png", "wrong.png", "test_histogram.png", "curves.png"}
    assert 'src="http' not in page and "src='http" not in page  # opens offline
    assert "<th>log_loss_uncalibrated</th>" in page and "<th>weight</th>" in page  # calibration, ensemble weights
    assert all((path.parent / "report" / name).stat().st_size > 1000 for name in images)


def test_report_links_every_output_relatively(report):
    path, cfg, _ = report
    page = path.read_text()
    links = re.findall(r"<a href='([^']+)'>", page)
    for name in ("leaderboard.csv", "best.json", "config.yaml", "submission.csv", "logs/train.log", "logs/predict.log"):
        assert name in links, name
    assert "sequential_cnn/metrics.csv" in links
    assert all(not link.startswith(("/", "http")) for link in links), links
    assert all((path.parent / link.rstrip("/")).exists() for link in links), links


def test_report_rounds_numbers(report):
    path, _, _ = report
    cells = re.findall(r"<td>(-?\d+\.\d+)</td>", path.read_text())
    assert cells and all(len(cell.split(".")[1]) in (1, 4) for cell in cells), cells


def expected_headline(path: Path) -> str:
    """The headline's first sentence, from the run folder's own files."""
    best = json.loads((path.parent / "best.json").read_text())
    return f"Best model: {best['arch']}, validation accuracy {best['val_acc']:.4f}, log loss {best['val_log_loss']:.4f}"


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    path, _, _ = report
    probe = tmp_path / "probe.html"
    # Test-side probe: after load, record how many images decoded to a real size.
    probe.write_text(
        path.read_text().replace(
            "</body>",
            (
                "<script>window.addEventListener('load',()=>{const i=[...document.images];"
                "document.body.setAttribute('data-loaded',i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length);"
                "});</script></body>"
            ),
        )
    )
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r'data-loaded="(\d+)/(\d+)"', proc.stdout)
    assert match, proc.stderr[-2000:]
    loaded, total = map(int, match.groups())
    assert total >= 4 and loaded == total
    assert "Leaderboard" in proc.stdout and "Most confidently wrong" in proc.stdout
    # The headline comes first, before the leaderboard, with the answer and the run's context.
    text = re.sub(r"<[^>]+>", "", proc.stdout)
    headline = expected_headline(path)
    assert headline in text, text[:2000]
    assert text.index(headline) < text.index("Leaderboard")
    summary = json.loads((path.parent / "run_summary.json").read_text())
    assert f"total wall time {summary['wall_seconds']:.1f} s" in text
    assert f"{summary['machine']['cpus']} CPUs" in text and "train worker(s)" in text
    assert summary["finished_utc"] in text
