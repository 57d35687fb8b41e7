"""GPU paths: AMP training with use_gpu and GPU inference actors.  Skipped without CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, quick_overrides

from catdog.config import load_config
from catdog.predict_job import run_predict
from catdog.train_job import run_training
from catdog.training import autocast

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_autocast_uses_bf16_on_gpu():
    with autocast(torch.device("cuda"), enabled=True):
        out = torch.nn.Linear(8, 2).cuda()(torch.randn(4, 8, device="cuda"))
    assert out.dtype in (torch.bfloat16, torch.float16)


def test_amp_training_and_gpu_predict(small_real_data, tmp_path, ray_session):
    cfg = load_config(
        REPO / "configs" / "quick.yaml",
        quick_overrides(
            small_real_data,
            tmp_path,
            "gpu",
            **{"models": "[resnet18]", "train.use_gpu": True, "train.amp": True, "predict.num_gpus": 0.5},
        ),
    )
    best = json.loads(Path(run_training(cfg)).read_text())
    assert best["arch"] == "resnet18" and 0 <= best["val_acc"] <= 1
    submission = run_predict(cfg, input_uri=str(small_real_data / "test1"), output_uri=str(tmp_path / "out"))
    assert Path(submission).read_text().startswith("id,label\n")
    assert pq.read_table(tmp_path / "out" / "predictions").num_rows == 120
