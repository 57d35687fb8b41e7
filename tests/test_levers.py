"""Config keys documented as levers reach the code they control.

A lever that never reaches its code still "works" in a benchmark (another setting moves the figure),
which is how ``data.decode_threads`` once did nothing for image folders while the docs credited it.
These tests build the datasets that training and predict run, from a config, and read the decode
step's settings from the plan Ray will execute.  Nothing is executed, so they are fast.  The
predict precision's tests then build a predictor actor in this process, on an untrained small CNN.
"""

from __future__ import annotations

import dataclasses
import inspect
import json

import pyarrow.parquet as pq
import pytest
import torch

from catdog import inference, training
from catdog.config import CatdogConfig
from catdog.data import decode_batch, load_split
from catdog.inference import ModelRef, Predictor, measure_scoring_precision, model_ref, predictions_dataset
from catdog.models import META_FILE, MODEL_FILE, build_model
from catdog.shards import ShardSet, shard_table
from catdog.storage import Storage
from catdog.train_job import train_datasets

STORAGE = Storage()
# A decode task reserves a CPU per thread: one CPU for three threads let Ray oversubscribe the cores.
LEVERS = {"data.decode_threads": 3, "data.decode_batch_size": 7, "CPUs per decode task": 3}


def decode_settings(ds) -> dict:
    """The decode step's ``threads``, batch size and CPUs reserved per task, as the plan will run them."""
    op = ds._logical_plan.dag
    while op is not None:
        if getattr(op, "fn", None) is decode_batch:
            bound = inspect.signature(decode_batch).bind({}, *op.fn_args, **(op.fn_kwargs or {}))
            bound.apply_defaults()
            return {
                "data.decode_threads": bound.arguments["threads"],
                "data.decode_batch_size": op.batch_size,
                "CPUs per decode task": op.ray_remote_args.get("num_cpus"),
            }
        op = op.input_dependencies[0] if op.input_dependencies else None
    raise AssertionError(f"no decode_batch step in the plan of {ds}")


def config() -> CatdogConfig:
    return CatdogConfig.model_validate({"data": {"decode_threads": 3, "decode_batch_size": 7}})


def shard_set(folder, tmp_path) -> ShardSet:
    """The folder's images packed into one real shard file (``prepare``'s format)."""
    names = sorted(p.name for p in folder.glob("*.jpg") if not p.name.startswith("."))
    rows = [{"name": n, "bytes": (folder / n).read_bytes(), "sha256": "", "width": 8, "height": 8} for n in names]
    out = tmp_path / "shards"
    out.mkdir()
    pq.write_table(shard_table(rows), out / "shard-00000.parquet")
    return ShardSet(uri=str(out), source=str(folder), files=("shard-00000.parquet",), images=len(names))


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_decode_levers_reach_the_training_and_validation_readers(source, kaggle_folder, tmp_path, ray_session):
    split = load_split(STORAGE, str(kaggle_folder), 0.25, 0)
    if source == "shards":
        split = dataclasses.replace(split, shards=shard_set(kaggle_folder, tmp_path))
    datasets = train_datasets(config(), split, STORAGE, 32)
    assert {name: decode_settings(ds) for name, ds in datasets.items()} == {"train": LEVERS, "val": LEVERS}


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_decode_levers_reach_the_predict_reader(source, kaggle_folder, tmp_path, ray_session):
    rows = [{"path": str(p), "id": i} for i, p in enumerate(sorted(kaggle_folder.glob("*.jpg")))]
    shards = shard_set(kaggle_folder, tmp_path) if source == "shards" else None
    ref = ModelRef("unused", "sequential_cnn", 32, 0.875)
    ds = predictions_dataset(config(), STORAGE, rows, [ref], tta=False, shards=shards)
    assert decode_settings(ds) == LEVERS


def predictor_args(ds) -> dict:
    """The arguments the plan's predictor actors will be constructed with."""
    op = ds._logical_plan.dag
    while getattr(op, "fn", None) is not Predictor:
        assert op.input_dependencies, f"no Predictor step in the plan of {ds}"
        op = op.input_dependencies[0]
    bound = inspect.signature(Predictor).bind(*op.fn_constructor_args, **(op.fn_constructor_kwargs or {}))
    bound.apply_defaults()
    return bound.arguments


@pytest.mark.parametrize("amp,measure_amp", [(True, True), (True, False), (False, True)])
def test_predict_amp_and_measure_amp_reach_the_predictor_actors(amp, measure_amp, kaggle_folder, ray_session):
    rows = [{"path": str(p), "id": i} for i, p in enumerate(sorted(kaggle_folder.glob("*.jpg")))]
    cfg = CatdogConfig.model_validate({"predict": {"amp": amp, "measure_amp": measure_amp}})
    args = predictor_args(
        predictions_dataset(cfg, STORAGE, rows, [ModelRef("unused", "sequential_cnn", 32, 0.875)], False)
    )
    assert (args["amp"], args["measure_amp"]) == (amp, measure_amp)


@pytest.mark.parametrize("fold", [True, False])
def test_fold_batchnorm_reaches_the_predictor_actors_and_their_models(fold, kaggle_folder, cnn_checkpoint, ray_session):
    rows = [{"path": str(p), "id": i} for i, p in enumerate(sorted(kaggle_folder.glob("*.jpg")))]
    cfg = CatdogConfig.model_validate({"predict": {"fold_batchnorm": fold}})
    args = predictor_args(
        predictions_dataset(cfg, STORAGE, rows, [ModelRef("unused", "sequential_cnn", 32, 0.875)], False)
    )
    assert args["fold_batchnorm"] is fold
    actor = Predictor(STORAGE, [cnn_checkpoint], 0.5, False, False, fold_batchnorm=fold)
    batchnorms = [m for _, model in actor.models for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bool(batchnorms) is not fold


@pytest.fixture
def cnn_checkpoint(tmp_path) -> ModelRef:
    """An untrained small CNN in a checkpoint folder (the speed does not depend on the weights)."""
    torch.save(build_model("sequential_cnn").state_dict(), tmp_path / MODEL_FILE)
    (tmp_path / META_FILE).write_text(json.dumps({"arch": "sequential_cnn", "image_size": 16}))
    return model_ref(STORAGE, str(tmp_path))


def predictor(ref: ModelRef, amp: bool, measure_amp: bool) -> Predictor:
    return Predictor(STORAGE, [ref, dataclasses.replace(ref, image_size=24)], 0.5, False, False, None, amp, measure_amp)


@pytest.mark.parametrize("bf16_seconds,scores_in_bf16", [(0.5, True), (0.97, False), (2.0, False)])
def test_a_cpu_actor_scores_in_the_faster_precision_and_a_near_tie_in_fp32(
    monkeypatch, capsys, cnn_checkpoint, bf16_seconds, scores_in_bf16
):
    """fp32 and bf16 are both timed twice, alternating, over every model at its size (the passes
    real, the seconds scripted); each one's fastest call counts; bf16 wins only by at least
    BF16_MIN_SPEEDUP; the actor says which it took."""
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: True)
    timed = []

    def scripted_timed_call(fn, x, **_):
        fn(x)
        timed.append(fn.keywords["amp"])
        slowed = 3.0 if len(timed) == 1 else 1.0  # another process took the first call's cores
        return slowed * {True: bf16_seconds, False: 1.0}[fn.keywords["amp"]]

    monkeypatch.setattr(training, "timed_call", scripted_timed_call)
    assert predictor(cnn_checkpoint, amp=True, measure_amp=True).amp is scores_in_bf16
    assert timed == [False, True, False, True]
    speedup = round(1 / bf16_seconds, 3)
    assert measure_scoring_precision([(build_model("sequential_cnn").eval(), 16)]) == {
        "amp": scores_in_bf16,
        "precision": "bf16" if scores_in_bf16 else "fp32",
        "bf16_speedup": speedup,
    }
    precision = "bf16" if scores_in_bf16 else "fp32"
    assert f"predictor: scoring in {precision}: bf16 ran {speedup:.2f}x as fast as fp32" in capsys.readouterr().out


@pytest.mark.parametrize("amp,measure_amp", [(True, False), (False, True)])
def test_without_amp_or_measure_amp_an_actor_times_nothing(monkeypatch, cnn_checkpoint, amp, measure_amp):
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(training, "timed_call", lambda *_, **__: pytest.fail("timed"))
    assert predictor(cnn_checkpoint, amp, measure_amp).amp is amp


def test_a_cpu_without_bf16_instructions_scores_fp32_untimed(monkeypatch, cnn_checkpoint):
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(training, "timed_call", lambda *_, **__: pytest.fail("timed on a CPU without bf16"))
    assert predictor(cnn_checkpoint, amp=True, measure_amp=True).amp is False


def test_an_actor_on_this_cpu_keeps_bf16_only_where_it_measured_faster(cnn_checkpoint, capsys):
    """Nothing scripted: this machine's own timing (either answer passes; the line must match it)."""
    scores_in_bf16 = predictor(cnn_checkpoint, amp=True, measure_amp=True).amp
    out = capsys.readouterr().out
    if inference.cpu_has_fast_bf16():
        line = next(line for line in out.splitlines() if "predictor: scoring in" in line)
        speedup = float(line.split("bf16 ran ")[1].split("x")[0])
        assert f"scoring in {'bf16' if scores_in_bf16 else 'fp32'}:" in line and speedup > 0
        assert scores_in_bf16 is (speedup >= inference.BF16_MIN_SPEEDUP)
    else:
        assert scores_in_bf16 is False and "scoring in" not in out
