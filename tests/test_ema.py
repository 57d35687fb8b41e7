"""EMA of weights (train.ema_decay): the average itself, its checkpointing, and its agreement across DDP ranks."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from catdog.checkpoints import load_checkpoint, metrics_csv, save_checkpoint
from catdog.config import TrainConfig
from catdog.ema import ModelEma
from catdog.models import MODEL_FILE, build_model, sequential_cnn
from catdog.training import build_optimizer, evaluate, pick_weights, train_one_epoch, validate


def take_steps(model: torch.nn.Module, optimizer, steps: int, after_step) -> None:
    """``steps`` SGD steps on random 32 px batches (train mode: BatchNorm statistics move too)."""
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(6, 3, 32, 32)), torch.randint(0, 2, (6,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        after_step()


def test_ema_equals_the_hand_computed_average_of_parameters_and_buffers():
    torch.manual_seed(0)
    model = sequential_cnn(width=4)
    decay = 0.2  # the warm-up (1 + t) / (10 + t) is below it at t = 0, 1 and above it from t = 2 on
    ema = ModelEma(model, decay)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    def hand_update():
        t = ema.updates - 1  # ema.update ran just before: this was update number t
        d = min(decay, (1 + t) / (10 + t))
        for key, value in model.state_dict().items():
            expected[key] = expected[key] * d + value * (1 - d) if value.is_floating_point() else value.clone()

    take_steps(model, torch.optim.SGD(model.parameters(), lr=0.5), 4, lambda: (ema.update(model), hand_update()))
    assert ema.updates == 4
    averaged = ema.module.state_dict()
    assert averaged.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(averaged[key], value, rtol=1e-6, atol=1e-7, msg=key)
    running = [k for k in expected if k.endswith("running_mean")]
    tracked = [k for k in expected if k.endswith("num_batches_tracked")]
    assert running and tracked
    assert all(int(averaged[k]) == 4 for k in tracked)  # integer buffers are copied, not averaged
    # The average really lags the model (for parameters and BatchNorm statistics alike).
    trained = model.state_dict()
    assert not torch.allclose(averaged["0.weight"], trained["0.weight"])
    assert not torch.allclose(averaged[running[0]], trained[running[0]])
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_pick_weights_prefers_accuracy_then_log_loss_and_raw_on_a_tie():
    raw = {"val_acc": 0.9, "val_log_loss": 0.30, "val_loss": 0.31, "val_images": 10, "unreadable": []}
    better_acc = {**raw, "val_acc": 0.91, "val_log_loss": 0.40, "val_loss": 0.41}
    picked = pick_weights(raw, better_acc)
    assert picked["weights"] == "ema" and picked["val_loss"] == 0.41 and picked["val_acc"] == 0.91
    assert (picked["val_acc_raw"], picked["val_log_loss_raw"]) == (0.9, 0.30)
    assert (picked["val_acc_ema"], picked["val_log_loss_ema"]) == (0.91, 0.40)
    assert pick_weights(raw, {**raw, "val_log_loss": 0.29})["weights"] == "ema"
    assert pick_weights(raw, {**raw, "val_acc": 0.89, "val_log_loss": 0.1})["weights"] == "raw"
    tie = pick_weights(raw, dict(raw))
    assert tie["weights"] == "raw" and tie["val_loss"] == 0.31


def checkpoint_cfg() -> dict:
    return {"arch": "sequential_cnn", "image_size": 32, "config_hash": "abc", "run_name": "ema"}


@pytest.mark.parametrize("chosen", ["ema", "raw"])
def test_checkpoint_holds_the_chosen_weights_and_resumes_both(tmp_path, chosen):
    torch.manual_seed(0)
    model = sequential_cnn(width=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = ModelEma(model, 0.5)
    take_steps(model, optimizer, 3, lambda: ema.update(model))
    history = [{"epoch": 1, "val_acc": 0.5, "weights": chosen}]
    meta = save_checkpoint(tmp_path, model, optimizer, cfg=checkpoint_cfg(), epoch=1, step=3, history=history, ema=ema)
    assert meta["weights"] == chosen
    stored = torch.load(tmp_path / MODEL_FILE, weights_only=True)  # what predict loads
    held = ema.module.state_dict() if chosen == "ema" else model.state_dict()
    assert all(torch.equal(stored[k], v) for k, v in held.items())

    state = load_checkpoint(tmp_path)
    assert state["ema"]["updates"] == 3 and state["train_state"]["step"] == 3
    assert set(state["train_state"]) == {"optimizer", "step", "epoch", "scaler"}
    resumed_model, resumed_ema = sequential_cnn(width=4), ModelEma(sequential_cnn(width=4), 0.5)
    resumed_model.load_state_dict(state["model"])
    resumed_ema.load_state_dict(state["ema"])
    assert resumed_ema.updates == 3
    for original, resumed in ((model, resumed_model), (ema.module, resumed_ema.module)):
        theirs = resumed.state_dict()
        assert all(torch.equal(theirs[k], v) for k, v in original.state_dict().items())
    assert not torch.equal(resumed_model.state_dict()["0.weight"], resumed_ema.module.state_dict()["0.weight"])


def test_checkpoint_without_ema_keeps_the_old_format(tmp_path):
    model = sequential_cnn(width=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    meta = save_checkpoint(tmp_path, model, optimizer, cfg=checkpoint_cfg(), epoch=1, step=0, history=[{"epoch": 1}])
    assert "weights" not in meta
    assert set(torch.load(tmp_path / "train_state.pt", weights_only=True)) == {"optimizer", "step", "epoch", "scaler"}
    state = load_checkpoint(tmp_path)
    assert state["ema"] is None
    assert all(torch.equal(state["model"][k], v) for k, v in model.state_dict().items())


def test_metrics_csv_has_ema_columns_only_with_an_ema():
    plain = {"epoch": 1, "val_acc": 0.5, "val_log_loss": 0.7}
    assert metrics_csv([plain]).splitlines()[0] == "epoch,val_acc,val_log_loss"
    picked = pick_weights({**plain, "val_loss": 0.7}, {**plain, "val_loss": 0.7, "val_log_loss": 0.6})
    header, row = metrics_csv([{"epoch": 1, **picked}]).splitlines()
    assert (
        header
        == "epoch,val_loss,val_acc,val_log_loss,weights,val_acc_raw,val_log_loss_raw,val_acc_ema,val_log_loss_ema"
    )
    assert row == "1,0.7,0.5,0.6,ema,0.5,0.7,0.5,0.6"


class ArrayShard:
    """A worker's share of the data, served the way ``DataIterator.iter_torch_batches`` serves it,
    from arrays in memory (the code under test is the step, not Ray Data)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, prefix: str):
        self.images, self.labels, self.prefix = images, labels, prefix

    def iter_torch_batches(self, *, batch_size: int, collate_fn, **_options):
        for start in range(0, len(self.images), batch_size):
            rows = slice(start, start + batch_size)
            paths = np.array([f"{self.prefix}/{i}.jpg" for i in range(len(self.images))[rows]])
            yield collate_fn({"image": self.images[rows], "label": self.labels[rows], "path": paths})


class CountingShard(ArrayShard):
    """An :class:`ArrayShard` that counts how often it is read."""

    reads = 0

    def iter_torch_batches(self, **options):
        self.reads += 1
        yield from super().iter_torch_batches(**options)


def test_validation_reads_the_shard_once_for_the_raw_weights_and_their_ema():
    torch.manual_seed(0)
    model = sequential_cnn(width=4)
    ema = ModelEma(model, 0.5)
    take_steps(model, torch.optim.SGD(model.parameters(), lr=0.5), 3, lambda: ema.update(model))
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), rng.integers(0, 2, 20)
    cfg, cpu = {"batch_size": 4, "amp": False}, torch.device("cpu")
    shard = CountingShard(images, labels, "val")
    val = validate(model, ema, shard, cfg, cpu)
    assert shard.reads == 1  # batches of 8: both models scored each batch
    alone = {
        name: evaluate(net, ArrayShard(images, labels, "val"), cfg, cpu)
        for name, net in (("raw", model), ("ema", ema.module))
    }
    assert alone["raw"]["val_log_loss"] != alone["ema"]["val_log_loss"]  # two different models
    for name, metrics in alone.items():
        assert val[f"val_acc_{name}"] == metrics["val_acc"]
        assert val[f"val_log_loss_{name}"] == pytest.approx(metrics["val_log_loss"], rel=1e-12)
    chosen = alone[val["weights"]]
    for key in ("val_loss", "temperature", "val_log_loss_calibrated", "val_images"):
        assert val[key] == pytest.approx(chosen[key], rel=1e-12), key


def random_shard(rng: np.random.Generator, n: int, prefix: str) -> ArrayShard:
    return ArrayShard(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 2, n), prefix)


def ddp_rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a 2-process gloo group: an epoch of catdog's DDP step with the EMA, then its validation."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(rank)  # different starts: the DDP wrap broadcasts rank 0's weights
    model = torch.nn.parallel.DistributedDataParallel(build_model("sequential_cnn"))
    ema = ModelEma(model, 0.9)
    cfg = {**TrainConfig().model_dump(), "arch": "sequential_cnn", "fine_tune": False, "amp": False}
    cfg.update(batch_size=8, image_size=32)
    rng = np.random.default_rng(rank)  # different rows on each rank
    stats = train_one_epoch(
        model,
        build_optimizer(model, "sequential_cnn", cfg),
        random_shard(rng, 24, f"train{rank}"),
        cfg,
        step=0,
        total_steps=3,
        frozen=False,
        device=torch.device("cpu"),
        ema=ema,
    )
    before_sync = {k: v.clone() for k, v in ema.module.state_dict().items()}
    val = validate(model, ema, random_shard(rng, 10, f"val{rank}"), cfg, torch.device("cpu"))
    val.pop("unreadable")
    payload = {"before_sync": before_sync, "ema": ema.state_dict(), "raw": model.module.state_dict()}
    torch.save({**payload, "val": val, "stats": stats}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ema_is_identical_on_two_ddp_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(ddp_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["ema"]["updates"] == rank1["ema"]["updates"] == 3
    assert rank0["stats"]["train_images"] == 48  # both ranks' rows, summed
    for key, value in rank0["ema"]["model"].items():
        assert torch.equal(value, rank1["ema"]["model"][key]), key  # bitwise
    for key, value in rank0["raw"].items():
        assert torch.equal(value, rank1["raw"][key]), key
    # Before the sync each rank's average had blended in its own BatchNorm statistics.
    running = [k for k in rank0["before_sync"] if k.endswith("running_var")]
    assert any(not torch.equal(rank0["before_sync"][k], rank1["before_sync"][k]) for k in running)
    # Same metrics (all-reduced over both ranks' 10 rows), hence the same choice on both.
    assert rank0["val"] == rank1["val"] and rank0["val"]["val_images"] == 20
    assert rank0["val"]["weights"] in ("ema", "raw")
