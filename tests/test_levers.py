"""Config keys documented as levers reach the code they control.

A lever that never reaches its code still "works" in a benchmark (another setting moves the figure),
which is how ``data.decode_threads`` once did nothing for image folders while the docs credited it.
These tests build the datasets that training and predict run, from a config, and read the decode
step's settings from the plan Ray will execute.  Nothing is executed, so they are fast.
"""

from __future__ import annotations

import dataclasses
import inspect

import pyarrow.parquet as pq
import pytest

from catdog.config import CatdogConfig
from catdog.data import decode_batch, load_split
from catdog.inference import ModelRef, predictions_dataset
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
    ds = predictions_dataset(config(), STORAGE, rows, [ref], tta=False, shards=shards)
    assert decode_settings(ds) == LEVERS
