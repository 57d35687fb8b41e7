"""Config keys documented as levers reach the code they control.

A lever that never reaches its code still "works" in a benchmark (another setting moves the figure),
which is how ``data.decode_threads`` once did nothing for image folders while the docs credited it.
These tests build the datasets that training and predict run, from a config, and read the decode
step's settings from the plan Ray will execute.  Nothing is executed, so they are fast.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging

import pyarrow.parquet as pq
import pytest
import ray
import torch

from catdog import inference, runtime
from catdog.config import CatdogConfig
from catdog.data import decode_batch, load_split
from catdog.inference import ModelRef, Predictor, measure_scoring_precision, predictions_dataset, scoring_amp
from catdog.shards import ShardSet, shard_table
from catdog.storage import Storage
from catdog.train_job import train_datasets

STORAGE = Storage()
LEVERS = {"data.decode_threads": 3, "data.decode_batch_size": 7}


def decode_settings(ds) -> dict:
    """The decode step's ``threads`` and batch size, as the plan will run them."""
    op = ds._logical_plan.dag
    while op is not None:
        if getattr(op, "fn", None) is decode_batch:
            bound = inspect.signature(decode_batch).bind({}, *op.fn_args, **(op.fn_kwargs or {}))
            bound.apply_defaults()
            return {"data.decode_threads": bound.arguments["threads"], "data.decode_batch_size": op.batch_size}
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
    ds = predictions_dataset(config(), STORAGE, rows, [ref], tta=False, shards=shards, amp=False)
    assert decode_settings(ds) == LEVERS


def predictor_amp(ds) -> bool:
    """The ``amp`` the plan's predictor actors will be constructed with."""
    op = ds._logical_plan.dag
    while getattr(op, "fn", None) is not Predictor:
        assert op.input_dependencies, f"no Predictor step in the plan of {ds}"
        op = op.input_dependencies[0]
    bound = inspect.signature(Predictor).bind(*op.fn_constructor_args, **(op.fn_constructor_kwargs or {}))
    bound.apply_defaults()
    return bound.arguments["amp"]


CNN = ModelRef("unused", "sequential_cnn", 16, 0.875)


@pytest.mark.parametrize("amp", [True, False])
def test_the_scoring_precision_reaches_the_predictor_actors(amp, kaggle_folder, ray_session):
    rows = [{"path": str(p), "id": i} for i, p in enumerate(sorted(kaggle_folder.glob("*.jpg")))]
    assert predictor_amp(predictions_dataset(config(), STORAGE, rows, [CNN], tta=False, amp=amp)) is amp


def amp_config(**predict) -> CatdogConfig:
    return CatdogConfig.model_validate({"predict": {"batch_size": 8, "torch_threads": 1, **predict}})


@pytest.mark.parametrize(
    "predict", [{"amp": False}, {"amp": True, "measure_amp": False}, {"amp": True, "num_gpus": 1}], ids=str
)
def test_scoring_precision_is_timed_only_on_cpus_with_amp_and_measure_amp(predict, monkeypatch):
    """amp off scores fp32; measure_amp off or a GPU takes amp as set, with no task started."""
    monkeypatch.setattr(ray, "remote", lambda *_: pytest.fail("a precision task was started"))
    assert scoring_amp(amp_config(**predict), [CNN]) is predict["amp"]


@pytest.mark.parametrize("one_machine", [True, False], ids=["embedded", "cluster"])
def test_a_job_times_the_precision_where_its_actors_run_and_says_which_it_scores_in(
    one_machine, ray_session, caplog, monkeypatch
):
    """Timed in the driver when every node is this machine (the session's Ray is), else in a Ray task
    (``measure_scoring_precision`` then runs in a worker process, out of reach of the spy)."""
    assert runtime.runs_on_this_machine_only()
    monkeypatch.setattr(inference, "runs_on_this_machine_only", lambda: one_machine)
    in_driver = []
    spy = inference.measure_scoring_precision
    monkeypatch.setattr(inference, "measure_scoring_precision", lambda *a: in_driver.append(a) or spy(*a))
    with caplog.at_level(logging.INFO, logger="catdog"):
        amp = scoring_amp(amp_config(amp=True), [CNN, dataclasses.replace(CNN, image_size=24)])
    assert in_driver == ([([("sequential_cnn", 16), ("sequential_cnn", 24)], 8, 1)] if one_machine else [])
    where = "this machine" if one_machine else "a worker node"
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("scoring in"))
    if inference.cpu_has_fast_bf16():  # the worker processes share the driver's CPU here
        speedup = float(line.split("bf16 ran ")[1].split("x")[0])
        assert line.startswith(f"scoring in {'bf16' if amp else 'fp32'}: ") and f" on {where} " in line
        assert amp is (speedup >= inference.BF16_MIN_SPEEDUP) and speedup > 0
    else:
        assert not amp and line == f"scoring in fp32: the CPU of {where} has no bf16 instructions"


@pytest.mark.parametrize("bf16_seconds,scores_in_bf16", [(0.5, True), (0.97, False), (2.0, False)])
def test_scoring_precision_is_the_faster_and_a_near_tie_is_fp32(monkeypatch, bf16_seconds, scores_in_bf16):
    """fp32 and bf16 are both timed over every model at its size (the passes real, the seconds
    scripted); bf16 wins only by at least BF16_MIN_SPEEDUP; the worker's thread count is restored."""
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: True)
    timed = []

    def scripted_timed_call(fn, x, **_):
        fn(x)
        timed.append((fn.keywords["amp"], torch.get_num_threads()))
        return {True: bf16_seconds, False: 1.0}[fn.keywords["amp"]]

    monkeypatch.setattr(inference, "timed_call", scripted_timed_call)
    threads = torch.get_num_threads()
    speed = measure_scoring_precision([("sequential_cnn", 16), ("sequential_cnn", 24)], 4, threads + 1)
    assert speed == {
        "amp": scores_in_bf16,
        "precision": "bf16" if scores_in_bf16 else "fp32",
        "bf16_speedup": round(1 / bf16_seconds, 3),
    }
    assert timed == [(False, threads + 1), (True, threads + 1)] and torch.get_num_threads() == threads


def test_a_cpu_without_bf16_instructions_scores_fp32_untimed(monkeypatch):
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(inference, "timed_call", lambda *_, **__: pytest.fail("timed on a CPU without bf16"))
    assert measure_scoring_precision([("sequential_cnn", 16)], 4, None) == {
        "amp": False,
        "precision": "fp32",
        "bf16_speedup": None,
    }


def test_this_machine_only_unless_another_node_is_alive_or_one_may_be_added(ray_session, monkeypatch):
    assert runtime.runs_on_this_machine_only()
    monkeypatch.setenv("CATDOG_AUTOSCALING_CLUSTER", "1")
    assert not runtime.runs_on_this_machine_only()
    monkeypatch.delenv("CATDOG_AUTOSCALING_CLUSTER")
    nodes = ray.nodes()
    other = {"NodeManagerAddress": "10.1.2.3", "Alive": True}
    monkeypatch.setattr(ray, "nodes", lambda: [*nodes, other])
    assert not runtime.runs_on_this_machine_only()
    monkeypatch.setattr(ray, "nodes", lambda: [*nodes, {**other, "Alive": False}])
    assert runtime.runs_on_this_machine_only()
