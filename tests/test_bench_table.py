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
