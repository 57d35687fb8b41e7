"""The GPU path's pieces, checked without a GPU: precision choice, the loss scaler's state through a
checkpoint, pinnable batches, and the epoch sums that the loops keep on the device."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from ray.data.collate_fn import is_tensor_batch_type
from torch import nn

from catdog import training
from catdog.checkpoints import load_checkpoint, save_checkpoint
from catdog.models import build_model
from catdog.training import (
    Collate,
    amp_dtype,
    autocast,
    build_optimizer,
    evaluate,
    grad_scaler,
    restore_scaler,
    to_model_input,
    train_one_epoch,
)

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of the given compute capability, as torch.cuda sees it (this machine has none).
    Emulated bf16 works on it, as on a real T4: ``is_bf16_supported()`` says yes even at 7.5."""
    training.cuda_has_native_bf16.cache_clear()

    def install(major: int, minor: int) -> None:
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(
            torch.cuda, "get_device_properties", lambda _: types.SimpleNamespace(major=major, minor=minor)
        )
        monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda _: True)

    yield install
    training.cuda_has_native_bf16.cache_clear()


def test_a_turing_gpu_gets_fp16_with_a_grad_scaler(fake_gpu):
    fake_gpu(7, 5)
    assert torch.cuda.is_bf16_supported()  # emulation counted: what the old check relied on
    assert amp_dtype(CUDA, True) == torch.float16
    assert grad_scaler(CUDA, True).is_enabled()
    assert amp_dtype(CUDA, False) is None and not grad_scaler(CUDA, False).is_enabled()


def test_an_ampere_gpu_gets_bf16_without_scaling(fake_gpu):
    fake_gpu(8, 0)
    assert amp_dtype(CUDA, True) == torch.bfloat16
    assert not grad_scaler(CUDA, True).is_enabled()


def test_the_gpu_capability_is_asked_once(fake_gpu, monkeypatch):
    fake_gpu(8, 6)
    calls = []
    real = torch.cuda.is_bf16_supported
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: calls.append(kw) or real(**kw))
    assert {amp_dtype(CUDA, True) for _ in range(5)} == {torch.bfloat16}
    assert calls == [{"including_emulation": False}]


def test_a_cpu_without_native_bf16_stays_fp32(monkeypatch):
    monkeypatch.setattr(training, "cpu_has_fast_bf16", lambda: False)
    assert amp_dtype(CPU, True) is None
    assert not grad_scaler(CPU, True).is_enabled()
    with autocast(CPU, True):
        assert nn.Linear(4, 2)(torch.randn(3, 4)).dtype == torch.float32


def scaled_step(scaler: torch.amp.GradScaler, model: nn.Module, optimizer, loss_value: float) -> None:
    optimizer.zero_grad()
    scaler.scale(model(torch.ones(1, 4)).sum() * loss_value).backward()
    scaler.step(optimizer)
    scaler.update()


def test_the_loss_scale_survives_a_checkpoint(tmp_path):
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    scaled_step(scaler, model, optimizer, float("inf"))  # overflow: the scale halves
    scaled_step(scaler, model, optimizer, 1.0)  # a good step: the growth tracker counts 1
    assert scaler.get_scale() == 2.0**11 and scaler.state_dict()["_growth_tracker"] == 1
    cfg = {"arch": "sequential_cnn", "image_size": 64, "config_hash": "h", "fingerprint": {}, "run_name": "r"}
    save_checkpoint(str(tmp_path), model, optimizer, cfg=cfg, epoch=1, step=2, history=[{"epoch": 1}], scaler=scaler)

    resumed = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    restore_scaler(resumed, load_checkpoint(str(tmp_path))["train_state"])
    assert resumed.state_dict() == scaler.state_dict()
    scaled_step(resumed, model, optimizer, 1.0)
    scaled_step(resumed, model, optimizer, 1.0)  # third good step in a row: growth, as without the restart
    assert resumed.get_scale() == 2.0**12


def test_a_checkpoint_without_scaling_resumes_into_any_scaler(tmp_path):
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = {"arch": "sequential_cnn", "image_size": 64, "config_hash": "h", "fingerprint": {}, "run_name": "r"}
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    save_checkpoint(str(tmp_path), model, optimizer, cfg=cfg, epoch=1, step=1, history=[{"epoch": 1}], scaler=disabled)
    state = load_checkpoint(str(tmp_path))["train_state"]
    assert state["scaler"] == {}
    fresh = torch.amp.GradScaler("cpu", init_scale=64.0)
    restore_scaler(fresh, state)  # bf16 run resumed on an fp16 GPU: starts from the initial scale
    assert fresh.get_scale() == 64.0


def decoded_batch(n: int, size: int = 16, bad: tuple[int, ...] = (), seed: int = 0) -> dict[str, np.ndarray]:
    """What ``decode_batch`` hands the collate function: uint8 NHWC images, labels, errors, paths."""
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "label": np.arange(n) % 2,
        "error": np.array(["cannot decode" if i in bad else "" for i in range(n)], dtype=object),
        "path": np.array([f"/data/{'dog' if i % 2 else 'cat'}.{seed}-{i}.jpg" for i in range(n)], dtype=object),
    }


def test_collate_output_is_all_tensors_so_ray_pins_it():
    collate = Collate()
    raw = decoded_batch(6, bad=(2,))
    batch = collate(raw)
    assert all(isinstance(value, torch.Tensor) for value in batch.values())
    assert is_tensor_batch_type(batch)  # the test Ray's pin_memory wrapper applies
    assert batch["valid"].tolist() == [True, True, False, True, True, True]
    assert collate.paths(batch) == list(raw["path"])
    with pytest.raises(KeyError):
        collate.paths(batch)  # released once read


class FakeShard:
    """``iter_torch_batches`` over fixed decoded batches, in order, as a Train worker's shard gives them."""

    def __init__(self, batches: list[dict]):
        self.batches = batches
        self.options: dict = {}

    def iter_torch_batches(self, *, collate_fn, **options):
        self.options = options
        return (collate_fn(batch) for batch in self.batches)


def test_epoch_sums_kept_on_the_device_match_a_direct_computation(monkeypatch):
    monkeypatch.setattr(training, "cpu_has_fast_bf16", lambda: False)  # exact fp32 arithmetic
    torch.manual_seed(0)
    # Train-mode BatchNorm normalises by the whole batch, so the rows that failed to decode get a
    # batch of their own here (it adds nothing to the sums); validation mixes them in.
    train_batches = [decoded_batch(8, seed=1), decoded_batch(8, seed=2), decoded_batch(3, bad=(0, 1, 2), seed=3)]
    val_batches = [decoded_batch(8, bad=(3,), seed=4), decoded_batch(8, seed=5), decoded_batch(5, bad=(0, 4), seed=6)]
    cfg = {
        "arch": "sequential_cnn",
        "label_smoothing": 0.0,
        "amp": True,
        "batch_size": 8,
        "optimizer": "adamw",
        "lr": 0.0,  # weights stay put, so the direct computation sees the same model
        "weight_decay": 0.0,
        "warmup_fraction": 0.0,
        "fine_tune": False,
        "image_size": 16,
    }
    model = build_model("sequential_cnn")
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # deterministic train-mode outputs
    optimizer = build_optimizer(model, "sequential_cnn", cfg)
    shard = FakeShard(train_batches)
    stats = train_one_epoch(model, optimizer, shard, cfg, step=0, total_steps=3, frozen=False, device=CPU)
    assert shard.options["device"] == "cpu" and shard.options["pin_memory"] is False

    losses, counts = [], []
    for raw in train_batches[:2]:
        valid = np.array([not e for e in raw["error"]])
        with torch.no_grad():
            logits = model.train()(to_model_input(torch.from_numpy(raw["image"][valid]), CPU))
        losses.append(float(nn.functional.cross_entropy(logits, torch.from_numpy(raw["label"][valid]))) * valid.sum())
        counts.append(valid.sum())
    assert stats["train_images"] == sum(counts) == 16
    assert stats["train_loss"] == pytest.approx(sum(losses) / sum(counts), rel=1e-5)
    assert stats["unreadable"] == list(train_batches[2]["path"])

    val = evaluate(model, FakeShard(val_batches), cfg, CPU)
    model.eval()
    correct, loss_sum = 0, 0.0
    for raw in val_batches:
        valid = np.array([not e for e in raw["error"]])
        labels = torch.from_numpy(raw["label"][valid])
        with torch.no_grad():
            logits = model(to_model_input(torch.from_numpy(raw["image"][valid]), CPU))
        correct += int((logits.argmax(1) == labels).sum())
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
    assert val["val_images"] == 18
    assert val["val_acc"] == pytest.approx(correct / 18)
    assert val["val_loss"] == pytest.approx(loss_sum / 18, rel=1e-5)
    assert val["unreadable"] == [val_batches[0]["path"][3], val_batches[2]["path"][0], val_batches[2]["path"][4]]
