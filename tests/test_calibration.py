"""Calibration and ensemble weights: the temperature fit (math and training's validation pass), the
Predictor applying temperatures and weights, ensemble weights, and how predict finds and
fingerprints them.  Fast: no Ray, no training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from catdog import calibration
from catdog.calibration import (
    CLIP,
    TEMPERATURES,
    clipped_log_loss,
    fit_ensemble_weights,
    fit_view_temperature,
    log_loss_sums,
    pick_temperature,
    view_probs,
)
from catdog.checkpoints import CheckpointError, record_test_time, save_checkpoint
from catdog.cli import main
from catdog.config import load_config
from catdog.inference import Predictor, model_ref
from catdog.models import build_model
from catdog.predict_job import resolve_models
from catdog.scoring_plan import scoring_fingerprint
from catdog.storage import Storage
from catdog.training import Collate, evaluate

STORAGE = Storage()
REPO = Path(__file__).resolve().parents[1]


def true_margins_and_labels(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from p(dog) = sigmoid(margin): a model whose logit margin is ``margin`` is calibrated."""
    rng = np.random.default_rng(seed)
    margins = rng.normal(0.0, 2.5, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-margins))).astype(np.int64)
    return margins, labels


def fitted(margins: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """(temperature, calibrated log loss, log loss at T=1) from the grid sums."""
    sums = log_loss_sums(torch.tensor(margins), torch.tensor(labels), torch.tensor(TEMPERATURES))
    temperature, calibrated = pick_temperature(TEMPERATURES, sums.tolist(), len(labels))
    return temperature, calibrated, float(sums[TEMPERATURES.index(1.0)]) / len(labels)


def test_temperature_one_is_the_model_own_clipped_log_loss():
    margins, labels = true_margins_and_labels(500)
    logits = torch.tensor(np.stack([np.zeros_like(margins), margins], axis=1))
    prob = torch.softmax(logits, dim=1)[:, 1].clamp(*CLIP)
    expected = nn.functional.binary_cross_entropy(prob, torch.tensor(labels, dtype=torch.float64))
    assert fitted(margins, labels)[2] == pytest.approx(float(expected), rel=1e-9)


@pytest.mark.parametrize(("scale", "direction"), [(3.0, "over"), (0.4, "under")])
def test_fitted_temperature_undoes_over_and_under_confidence(scale, direction):
    margins, labels = true_margins_and_labels()
    temperature, calibrated, raw = fitted(margins * scale, labels)
    assert (temperature > 1.0) if direction == "over" else (temperature < 1.0)
    assert temperature == pytest.approx(scale, rel=0.15)  # the scale that made it mis-calibrated
    assert calibrated < raw - 0.02
    # The loss it reports is the loss at that temperature.
    p = 1 / (1 + np.exp(-margins * scale / temperature))
    assert calibrated == pytest.approx(clipped_log_loss(p, labels), rel=1e-9)


def test_a_calibrated_model_keeps_a_temperature_near_one_and_constant_logits_keep_one():
    margins, labels = true_margins_and_labels()
    assert fitted(margins, labels)[0] == pytest.approx(1.0, rel=0.1)
    assert fitted(np.zeros(100), labels[:100])[0] == 1.0  # every temperature ties


class MarginModel(nn.Module):
    """Logits (0, scale * (mean of the red channel, normalised)): the margin is set by the image."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        margin = self.scale * x[:, 0].mean(dim=(1, 2))
        return torch.stack([torch.zeros_like(margin), margin], dim=1)


class ListShard:
    """Stands in for a Ray Data shard: ``iter_torch_batches`` over numpy batches in memory."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def iter_torch_batches(self, batch_size, collate_fn: Collate, **options):
        return (collate_fn(batch) for batch in self.batches)


def margin_images(n: int = 2000, seed: int = 1) -> tuple[ListShard, np.ndarray, np.ndarray]:
    """8x8 images whose red level is the true margin's encoding; labels drawn from that margin."""
    rng = np.random.default_rng(seed)
    red = rng.integers(30, 226, n).astype(np.uint8)
    images = np.zeros((n, 8, 8, 3), dtype=np.uint8)
    images[..., 0] = red[:, None, None]
    feature = (red / 255.0 - 0.485) / 0.229  # what to_model_input makes of the red channel
    margins = 1.6 * (feature - feature.mean())
    labels = (rng.random(n) < 1 / (1 + np.exp(-margins))).astype(np.int64)
    batches = [
        {"image": images[i : i + 256], "label": labels[i : i + 256], "path": [f"{j}.jpg" for j in range(i, i + 256)]}
        for i in range(0, n, 256)
    ]
    return ListShard(batches), feature, labels


@pytest.mark.parametrize(("scale", "over"), [(6.0, True), (0.5, False)])
def test_evaluate_fits_the_temperature_in_its_validation_pass(scale, over):
    shard, feature, labels = margin_images()
    model = MarginModel(scale)
    # The model's margin is scale * feature; centre it with a bias so that only the scale is off.
    model.forward = lambda x, m=model: MarginModel.forward(m, x) - torch.tensor([0.0, scale * feature.mean()])
    metrics = evaluate(model, shard, {"batch_size": 128, "amp": False}, torch.device("cpu"))
    assert metrics["val_images"] == len(labels)
    assert (metrics["temperature"] > 1.0) if over else (metrics["temperature"] < 1.0)
    assert metrics["val_log_loss_calibrated"] < metrics["val_log_loss"] - 0.01
    p = 1 / (1 + np.exp(-scale * (feature - feature.mean()) / metrics["temperature"]))
    assert metrics["val_log_loss_calibrated"] == pytest.approx(clipped_log_loss(p, labels), rel=1e-4)


def test_the_ensemble_is_never_worse_than_its_strong_member_and_drops_a_random_one():
    margins, labels = true_margins_and_labels()
    strong = 1 / (1 + np.exp(-margins))
    random = np.random.default_rng(5).random(len(labels))
    weights = fit_ensemble_weights(np.stack([random, strong]), labels)
    assert weights.tolist() == [0.0, 1.0]  # dropped, not a sliver: predict skips weight-0 members
    pooled = weights @ np.stack([random, strong])
    assert clipped_log_loss(pooled, labels) <= clipped_log_loss(strong, labels)


def test_the_ensemble_combines_members_that_help_each_other():
    """Two members, each with independent noise on the true margin: their average beats both."""
    margins, labels = true_margins_and_labels()
    rng = np.random.default_rng(2)
    members = np.stack([1 / (1 + np.exp(-(margins + rng.normal(0, 2.0, len(margins))))) for _ in range(2)])
    weights = fit_ensemble_weights(members, labels)
    assert np.all(weights > 0.2)
    assert clipped_log_loss(weights @ members, labels) < min(clipped_log_loss(m, labels) for m in members) - 0.01


def test_the_ensemble_weight_of_a_weaker_helpful_member_is_the_optimum_not_a_half():
    """A strong member and a much noisier one: the best mix gives the weaker a small weight, which
    selection with replacement (first addition at 1/2) could not reach; the fit matches a fine grid."""
    margins, labels = true_margins_and_labels()
    rng = np.random.default_rng(7)
    strong = 1 / (1 + np.exp(-(margins + rng.normal(0, 1.0, len(margins)))))
    weak = 1 / (1 + np.exp(-(0.6 * margins + rng.normal(0, 2.5, len(margins)))))
    members = np.stack([strong, weak])
    weights = fit_ensemble_weights(members, labels)
    grid = np.linspace(0, 1, 1001)
    losses = [clipped_log_loss(w * weak + (1 - w) * strong, labels) for w in grid]
    assert 0.02 < grid[int(np.argmin(losses))] < 0.45 and clipped_log_loss(0.5 * (strong + weak), labels) > min(losses)
    assert weights[1] == pytest.approx(grid[int(np.argmin(losses))], abs=0.01)
    assert clipped_log_loss(weights @ members, labels) == pytest.approx(min(losses), abs=1e-5)
    assert clipped_log_loss(weights @ members, labels) < clipped_log_loss(strong, labels) - 0.002


def test_the_ensemble_on_random_members_never_loses_to_the_best():
    rng = np.random.default_rng(3)
    for _ in range(20):
        labels = rng.integers(0, 2, 300)
        members = rng.random((4, 300))
        weights = fit_ensemble_weights(members, labels)
        best = min(clipped_log_loss(m, labels) for m in members)
        assert clipped_log_loss(weights @ members, labels) <= best
        assert weights.sum() == pytest.approx(1.0)
        assert np.all((weights == 0) | (weights >= calibration.ENSEMBLE_MIN_WEIGHT))


def tiny_checkpoint(folder: Path, seed: int, temperature: float | None) -> str:
    """An untrained Sequential CNN at 64 px whose meta.json carries ``temperature`` (None: none, as before)."""
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    model = build_model("sequential_cnn")
    cfg = {"arch": "sequential_cnn", "image_size": 64, "config_hash": f"seed{seed}", "run_name": "test"}
    history = [{} if temperature is None else {"temperature": temperature}]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(str(folder), model, optimizer, cfg=cfg, epoch=1, step=0, history=history)
    return str(folder)


def test_model_ref_reads_the_temperature_and_old_checkpoints_get_one(tmp_path):
    calibrated = tiny_checkpoint(tmp_path / "a", 0, 2.5)
    assert json.loads((Path(calibrated) / "meta.json").read_text())["temperature"] == 2.5
    assert model_ref(STORAGE, calibrated).temperature == 2.5
    assert model_ref(STORAGE, calibrated, calibrate=False).temperature == 1.0
    old = tiny_checkpoint(tmp_path / "b", 0, None)
    meta = json.loads((Path(old) / "meta.json").read_text())
    del meta["temperature"]  # a checkpoint written before calibration
    (Path(old) / "meta.json").write_text(json.dumps(meta))
    assert model_ref(STORAGE, old).temperature == 1.0


def test_predictor_divides_logits_by_the_temperature_and_weights_members(tmp_path):
    a, b = tiny_checkpoint(tmp_path / "a", 0, 2.0), tiny_checkpoint(tmp_path / "b", 1, 0.5)
    ref_a = model_ref(STORAGE, a)
    rng = np.random.default_rng(0)
    batch = {
        ref_a.column: rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8),
        "error": np.array([None, None, "bad", None, None, None], dtype=object),
        "id": np.arange(6),
        "path": np.array([f"{i}.jpg" for i in range(6)], dtype=object),
    }

    def probs(ref, tta=False):
        return Predictor(STORAGE, [ref], 0.5, tta=tta, use_gpu=False).prob_dog(batch).astype(np.float64)

    def logit(p):
        return np.log(p / (1 - p))

    for tta in (False, True):
        calibrated, raw = probs(ref_a, tta), probs(model_ref(STORAGE, a, calibrate=False), tta)
        assert np.abs(calibrated - raw).max() > 1e-4
        if not tta:  # the flip is calibrated too, so only the plain one is exactly a rescaled logit
            np.testing.assert_allclose(logit(calibrated) * 2.0, logit(raw), rtol=1e-4, atol=1e-5)
    ref_b = model_ref(STORAGE, b, weight=3.0)
    table = Predictor(STORAGE, [model_ref(STORAGE, a, weight=1.0), ref_b], 0.5, tta=False, use_gpu=False)(batch)
    members = np.array([probs(ref_a), probs(ref_b)])
    np.testing.assert_allclose(
        table.column("prob_dog").to_numpy(zero_copy_only=False)[[0, 1, 3, 4, 5]],
        (0.25 * members[0] + 0.75 * members[1])[[0, 1, 3, 4, 5]],
        atol=1e-6,
    )
    member_column = table.column("member_prob_dog").to_pylist()
    assert member_column[2] is None
    np.testing.assert_allclose(member_column[0], members[:, 0], atol=1e-6)
    # The study's pass keeps every model's raw margin per view, from which it computes what predict would.
    with_margins = Predictor(STORAGE, [ref_a, ref_b], 0.5, tta=True, use_gpu=False, margins=True)(batch)
    margins = with_margins.column("member_margins").to_pylist()
    assert margins[2] is None and len(margins[0]) == 4  # 2 models x (image, flip)
    views = np.array([m for m in margins if m is not None]).reshape(-1, 2, 2).transpose(1, 2, 0)
    tta_members = np.array([probs(ref_a, True), probs(ref_b, True)])[:, [0, 1, 3, 4, 5]]
    for index, temperature in enumerate((2.0, 0.5)):
        np.testing.assert_allclose(view_probs(views[index], temperature), tta_members[index], atol=1e-6)
    np.testing.assert_allclose(view_probs(views[0][:1], 2.0), members[0][[0, 1, 3, 4, 5]], atol=1e-6)


def test_scoring_fingerprint_changes_with_temperatures_and_weights(tmp_path):
    a, b = tiny_checkpoint(tmp_path / "a", 0, 2.0), tiny_checkpoint(tmp_path / "b", 1, 0.5)
    prints = {
        scoring_fingerprint(STORAGE, [a, b], False, False, scales)
        for scales in ([(1.0, 0.5), (1.0, 0.5)], [(2.0, 0.5), (0.5, 0.5)], [(2.0, 0.75), (0.5, 0.25)])
    }
    assert len(prints) == 3
    assert scoring_fingerprint(STORAGE, [a], False, False) == scoring_fingerprint(STORAGE, [a], False, False, [(1, 1)])


def ensemble_run(root: Path, study: dict | None) -> tuple[object, list[str]]:
    """A run folder with two checkpoints on its leaderboard and, if given, a val_study.json."""
    cfg = load_config(REPO / "configs" / "quick.yaml", [f"storage.root={root}"])
    run = Path(cfg.run_uri)
    checkpoints = [tiny_checkpoint(run / arch / "epoch_001", i, 1.5) for i, arch in enumerate(("a", "b"))]
    (run / "leaderboard.csv").write_text("arch,checkpoint\n" + "".join(f"x,{c}\n" for c in checkpoints))
    (run / "best.json").write_text(json.dumps({"checkpoint": checkpoints[0]}))
    if study is not None:
        (run / "val_study.json").write_text(json.dumps(study))
    return cfg, checkpoints


def test_ensemble_uses_the_fitted_weights_and_drops_zero_weight_members(tmp_path):
    cfg, (a, b) = ensemble_run(tmp_path, None)
    (Path(cfg.run_uri) / "val_study.json").write_text(json.dumps({"ensemble": {"weights": {a: 1.0, b: 0.0}}}))
    assert [(r.checkpoint, r.weight, r.temperature) for r in resolve_models(STORAGE, cfg, None, True, False)] == [
        (a, 1.0, 1.5)
    ]
    (Path(cfg.run_uri) / "val_study.json").write_text(json.dumps({"ensemble": {"weights": {a: 0.6, b: 0.4}}}))
    refs = resolve_models(STORAGE, cfg, None, True, False, calibrate=False)
    assert [(r.weight, r.temperature) for r in refs] == [(0.6, 1.0), (0.4, 1.0)]


@pytest.mark.parametrize("study", [None, {"best": {}}, {"ensemble": {"weights": {"elsewhere/epoch_001": 1.0}}}])
def test_ensemble_without_fitted_weights_stops_before_any_work(tmp_path, capsys, study):
    cfg, _ = ensemble_run(tmp_path, study)
    with pytest.raises(CheckpointError, match="train.report=true"):
        resolve_models(STORAGE, cfg, None, True, False)
    code = main(["predict", "--config", str(REPO / "configs" / "quick.yaml"), "--set", f"storage.root={tmp_path}",
                 "--ensemble"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "train.report=true" in err[0]
    assert not (Path(cfg.run_uri) / "predictions").exists()


def test_a_view_temperature_is_fitted_on_the_averaged_views_as_predict_averages_them():
    """Under TTA predict averages the views' calibrated probabilities, so the TTA temperature must be
    fitted on that average: here two views of a calibrated model, each over-confident by 2x."""
    margins, labels = true_margins_and_labels()
    rng = np.random.default_rng(1)
    views = np.stack([margins + rng.normal(0, 0.3, len(margins)) for _ in range(2)]) * 2
    temperature, loss = fit_view_temperature(views, labels)
    assert 1.6 < temperature < 2.5
    assert loss < clipped_log_loss(view_probs(views, 1.0), labels) - 0.02
    # The fit is the grid's best for exactly the probabilities predict computes.
    grid = [clipped_log_loss(view_probs(views, t), labels) for t in TEMPERATURES]
    assert loss == pytest.approx(min(grid), rel=1e-12)
    one_view = fit_view_temperature(views[:1], labels)[0]
    assert one_view == pytest.approx(fitted(views[0], labels)[0])


def test_the_study_test_time_record_sets_predict_size_and_temperature_per_tta_mode(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "a", 0, 2.0)
    trained = model_ref(STORAGE, checkpoint)
    record = {"image_size": 80, "crop_fraction": 0.875, "temperature": 0.7, "temperature_tta": 0.6}
    record_test_time(STORAGE, checkpoint, record)
    meta_file = Path(checkpoint) / "meta.json"
    written = meta_file.stat().st_mtime_ns
    record_test_time(STORAGE, checkpoint, dict(record))  # unchanged: not rewritten (the scoring fingerprint)
    assert meta_file.stat().st_mtime_ns == written
    plain, tta = model_ref(STORAGE, checkpoint), model_ref(STORAGE, checkpoint, tta=True)
    assert (plain.image_size, plain.temperature, tta.image_size, tta.temperature) == (80, 0.7, 80, 0.6)
    assert plain.column == "image_80_875" != trained.column
    assert model_ref(STORAGE, checkpoint, calibrate=False, tta=True).temperature == 1.0
    as_trained = model_ref(STORAGE, checkpoint, as_trained=True)
    assert (as_trained.image_size, as_trained.temperature) == (trained.image_size, 2.0)
    assert resolve_models(STORAGE, load_config(REPO / "configs" / "quick.yaml"), checkpoint, False, True) == [tta]
