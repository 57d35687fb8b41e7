"""The benchmarks cannot rot: each script runs once on a tiny input and prints every row."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_bench_smoke_prints_every_row(data_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--data", str(data_dir), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "smoke.md").read_text()
    expected = [
        ("ingest", "pillow_single"),
        ("ingest", "dataloader_2"),
        ("ingest", "ray_read_images"),
        ("ingest", "catdog_folder"),
        ("train", "plain_train"),
        ("train", "catdog_train"),
        ("predict", "plain_predict"),
        ("predict", "catdog_predict"),
    ]
    for group, path in expected:
        assert f"| {group} | {path} |" in table, f"missing row {group}/{path}"
    for ratio in (
        "ingest: catdog / stock read_images",
        "ingest: catdog / plain DataLoader",
        "train sequential_cnn: Ray Train 1 worker / plain loop",
        "predict mobilenet_v2: catdog end to end / plain loop",
    ):
        assert ratio in table
    results = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert len(results["results"]) == len(expected)
    assert all(r["summary"]["images"] > 0 for r in results["results"])
