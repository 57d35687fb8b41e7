"""The bench's table logic: which rows it plans and how each ratio pairs catdog with its baseline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def bench_run():
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result(bench_run, path: str, images_per_s: float, steady: float | None = None, **args) -> dict:
    """One row as bench/run.py records it: one run of ``n`` images at ``images_per_s``."""
    group = "ingest" if "arch" not in args else "train" if path.endswith("train") else "predict"
    run = {"images": args["n"], "seconds": args["n"] / images_per_s, **({"steady_rates": [steady]} if steady else {})}
    summary = bench_run.summarise([run])
    return {"group": group, "path": path, "args": {"ray_workers": 2, **args}, "summary": summary}


def test_default_plan_pairs_every_model_row_with_its_baseline_in_each_precision(bench_run):
    rows = bench_run.plan(bench_run.SIZES["default"], Path("/data"), [2, 1], {"train", "predict"}, ("fp32", "bf16"))
    model_rows = {(name, a["arch"], a["precision"], a["n"], a.get("ray_workers", 2)) for _, name, a in rows}
    for precision in ("fp32", "bf16"):
        for arch in ("resnet18", "mobilenet_v2"):
            assert {("plain_train", arch, precision, 640, 2), ("catdog_train", arch, precision, 640, 2)} <= model_rows
            assert {
                ("plain_predict", arch, precision, 5000, 2),
                ("catdog_predict", arch, precision, 5000, 2),
            } <= model_rows
        # the end-to-end target is over >= 20,000 images
        assert {
            ("plain_predict", "resnet18", precision, 20000, 2),
            ("catdog_predict", "resnet18", precision, 20000, 2),
        } <= model_rows
    # the 1-actor scaling row once, in the first precision
    assert [r for r in model_rows if r[4] == 1] == [("catdog_predict", "resnet18", "fp32", 5000, 1)]


def test_each_ratio_divides_the_catdog_row_by_the_baseline_of_the_same_precision_and_size(bench_run):
    model = {"arch": "resnet18", "size": 128}
    results = [
        result(bench_run, "dataloader_2", 3000, n=4000),
        result(bench_run, "catdog_folder", 1500, n=4000),
        result(bench_run, "plain_train", 60, n=640, precision="fp32", **model),
        result(bench_run, "catdog_train", 45, n=640, precision="fp32", **model),
        result(bench_run, "plain_train", 120, n=640, precision="bf16", **model),
        result(bench_run, "catdog_train", 108, n=640, precision="bf16", **model),
        result(bench_run, "plain_predict", 150, n=5000, precision="fp32", **model),
        result(bench_run, "catdog_predict", 120, 165, n=5000, precision="fp32", **model),
        result(bench_run, "plain_predict", 160, n=20000, precision="fp32", **model),
        result(bench_run, "catdog_predict", 152, 170, n=20000, precision="fp32", **model),
    ]
    ratios = bench_run.ratios(results)
    assert ratios == {
        "ingest: catdog folder / plain DataLoader": 0.5,
        "train resnet18 fp32: Ray Train 1 worker / plain loop": 0.75,
        "train resnet18 bf16: Ray Train 1 worker / plain loop": 0.9,
        "predict resnet18 fp32: catdog steady state / plain loop, 5,000 images": 1.1,
        "predict resnet18 fp32: catdog end to end / plain loop, 5,000 images": 0.8,
        "predict resnet18 fp32: catdog steady state / plain loop, 20,000 images": 170 / 160,
        "predict resnet18 fp32: catdog end to end / plain loop, 20,000 images": 0.95,
    }
    table = bench_run.markdown(
        results, {"when": "now", "machine": "m", "mode": "default", "precisions": ["fp32", "bf16"]}
    )
    assert "| train | catdog_train | resnet18 | bf16 | 2 | 640 |" in table


def test_the_profile_counts_a_stack_in_the_steps_own_part_before_the_framework_it_calls(bench_run):
    spec = importlib.util.spec_from_file_location("profile_train", REPO / "bench" / "profile_train.py")
    profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile)
    loop = "train_loop_per_worker (catdog/training.py:473);train_one_epoch (catdog/training.py:262)"
    stacks = {
        f"{loop};Tensor.backward (torch/_tensor.py:623);_engine_run_backward (torch/autograd/graph.py:10)": "backward",
        f"{loop};Adam.step (torch/optim/adam.py:248);_single_tensor_adam (torch/optim/adam.py:456)": "optimizer step",
        f"{loop};Module._call_impl (torch/nn/modules/module.py:1786);ResNet.forward (torchvision/models/r.py:2)": (
            "forward"
        ),
        f"{loop};timed_batches (catdog/training.py:312);_iter_batches (ray/data/iterator.py:150)": (
            "waiting for the next batch"
        ),
        "Thread.run (threading.py:982);_worker (ray/data/_internal/block_batching/util.py:121);"
        "Collate.__call__ (catdog/training.py:90);stack (torch/functional.py:10)": "collate",
        "Thread.run (threading.py:982);next_batch (ray/data/_internal/batcher.py:514)": (
            "Ray Data batching / prefetch thread"
        ),
        f"{loop};_save (torch/serialization.py:900)": "other: _save",
    }
    assert {stack: profile.part_of(stack) for stack in stacks} == stacks
