"""Ray Train training: the quick run end to end, DDP, reruns and resume, init and freezing."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import REPO, quick_overrides, require_mlflow, set_args

from catdog import training
from catdog.checkpoints import load_checkpoint, load_model
from catdog.config import load_config
from catdog.data import load_split
from catdog.images import decode_image
from catdog.models import build_model, split_parameters
from catdog.presets import EvalPreset
from catdog.storage import Storage
from catdog.train_job import best_reported, run_fingerprint, run_training
from catdog.training import autocast, input_size_for_epoch, lr_factor, to_model_input

STORAGE = Storage()


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_cpu_autocast_uses_bf16_only_where_the_cpu_runs_it_natively(monkeypatch, fast_bf16):
    monkeypatch.setattr(training, "cpu_has_fast_bf16", lambda: fast_bf16)
    conv, x = torch.nn.Conv2d(3, 4, 3), torch.randn(2, 3, 8, 8)
    with autocast(torch.device("cpu"), True):
        amp_out = conv(x)
    with autocast(torch.device("cpu"), False):
        off_out = conv(x)
    assert amp_out.dtype == (torch.bfloat16 if fast_bf16 else torch.float32)
    assert off_out.dtype == torch.float32
    # bf16 keeps ~3 significant digits: same answer, coarser.
    torch.testing.assert_close(amp_out.float(), off_out, atol=0.05, rtol=0.02)


def test_torch_still_has_the_private_bf16_probes_catdog_relies_on():
    """cpu_has_fast_bf16 calls private torch helpers and falls back to fp32 when they are gone; this test
    makes their disappearance (a torch upgrade) loud instead of a silent 2x slowdown on AMX hosts."""
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        assert callable(getattr(torch.cpu, name, None)), f"torch.cpu.{name} is gone"
        assert isinstance(getattr(torch.cpu, name)(), bool)
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    if flags:  # Linux: the probe must agree with what the CPU advertises
        assert training.cpu_has_fast_bf16() == bool({"amx_tile", "avx512_bf16"} & flags)


def test_lr_schedule_warms_up_then_decays():
    total, warmup = 100, 10
    lrs = [lr_factor(s, total, warmup) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))  # rising during warm-up
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # never rising after it
    assert lrs[-1] < 0.05 and lr_factor(10_000, total, warmup) == pytest.approx(0.02)


def test_progressive_resizing_downscales_only_the_early_epochs():
    cfg = {"image_size": 96, "early_image_size": 64, "early_epochs": 2}
    assert [input_size_for_epoch(e, cfg) for e in (1, 2, 3, 4)] == [64, 64, 96, 96]
    assert input_size_for_epoch(1, {"image_size": 96, "early_image_size": None, "early_epochs": 0}) == 96
    # A half-black, half-white batch keeps its layout and value range when downscaled.
    images = torch.zeros(2, 96, 96, 3, dtype=torch.uint8)
    images[:, :, 48:] = 255
    full, small = to_model_input(images, torch.device("cpu")), to_model_input(images, torch.device("cpu"), 64)
    assert full.shape == (2, 3, 96, 96) and small.shape == (2, 3, 64, 64)
    assert small.is_contiguous(memory_format=torch.channels_last)
    black, white = full[:, :, :1, :1], full[:, :, :1, -1:]  # per-channel normalised values
    assert torch.allclose(small[..., :30], black.expand_as(small[..., :30]), atol=1e-5)
    assert torch.allclose(small[..., 34:], white.expand_as(small[..., 34:]), atol=1e-5)


@pytest.mark.slow
def test_quick_run_trains_all_three_and_picks_the_best(quick_run):
    cfg, best_uri = quick_run
    run = Path(cfg.run_uri)
    assert best_uri == str(run / "best.json")
    board = read_csv(run / "leaderboard.csv")
    assert sorted(r["arch"] for r in board) == ["mobilenet_v2", "resnet18", "sequential_cnn"]
    assert [float(r["val_acc"]) for r in board] == sorted((float(r["val_acc"]) for r in board), reverse=True)
    best = json.loads((run / "best.json").read_text())
    assert best["arch"] == board[0]["arch"] and best["checkpoint"] == board[0]["checkpoint"]
    assert best["val_acc"] == pytest.approx(float(board[0]["val_acc"]))
    assert best["config"]["run_name"] == cfg.run_name
    assert (run / "config.yaml").exists() and load_config(run / "config.yaml") == cfg
    for row in board:
        metrics = read_csv(run / row["arch"] / "metrics.csv")
        assert [int(m["epoch"]) for m in metrics] == list(range(1, cfg.train.epochs + 1))
        for m in metrics:  # the waits for data are parts of the epoch's time
            waits = float(m["first_batch_seconds"]) + float(m["data_wait_seconds"])
            assert float(m["first_batch_seconds"]) > 0 and 0 < waits < float(m["train_seconds"])
        meta = json.loads((Path(row["checkpoint"]) / "meta.json").read_text())
        assert meta["arch"] == row["arch"] and meta["class_map"] == {"0": "cat", "1": "dog"}
        assert meta["image_size"] == cfg.data.image_size and len(meta["mean"]) == 3
        assert meta["config_hash"] == cfg.hash()


@pytest.mark.slow
def test_train_runs_on_an_embedded_ray_start_no_preemption_watcher(quick_run, ray_session):
    """An embedded Ray is one node that no autoscaler drains: its Train runs skip the watcher actor
    (catdog.runtime.start_local_ray).  The cluster keeps Ray's default: test_cluster's train job."""
    from ray._private import state

    classes = [actor["ActorClassName"] for actor in state.actors().values()]
    assert classes.count("TrainController") >= 3, classes  # quick_run's three architectures ran here
    assert "PreemptionWatcher" not in classes


@pytest.mark.slow
def test_best_checkpoint_reproduces_its_validation_accuracy(quick_run):
    cfg, best_uri = quick_run
    best = json.loads(Path(best_uri).read_text())
    model, meta = load_model(STORAGE, best["checkpoint"])
    assert not cfg.train.amp  # fp32 on every CPU: bf16 near ties would make the comparison CPU-dependent
    accuracy, n_val = val_accuracy(cfg, model, meta)
    assert accuracy == pytest.approx(best["val_acc"], abs=1.5 / n_val)


def val_accuracy(cfg, model: torch.nn.Module, meta: dict) -> tuple[float, int]:
    """``model``'s accuracy on the run's validation split, preprocessed as ``meta`` says (as predict does)."""
    split = load_split(STORAGE, cfg.data.train, cfg.data.val_fraction, cfg.data.seed, cfg.data.limit)
    preset = EvalPreset(meta["image_size"], meta["crop_fraction"])
    images = np.stack([decode_image(Path(r["path"]).read_bytes(), preset) for r in split.val])
    labels = torch.tensor([r["label"] for r in split.val])
    with torch.no_grad():
        predicted = model.eval()(to_model_input(torch.from_numpy(images), torch.device("cpu"))).argmax(1)
    return float((predicted == labels).float().mean()), len(split.val)


def quick_cfg(data: Path, root: Path, run_name: str, **extra):
    return load_config(
        REPO / "configs" / "quick.yaml",
        quick_overrides(data, root, run_name, **{"models": "[sequential_cnn]", **extra}),
    )


@pytest.mark.slow
def test_a_rerun_refuses_changed_settings_retrains_nothing_unchanged_and_trains_only_added_epochs(
    small_real_data, tmp_path, ray_session, monkeypatch, caplog
):
    """Rerunning a finished 2-epoch run: jobs/train.py with settings that shape the model changed stops
    before Ray starts, in one error line naming each change; a rerun with only other settings changed
    retrains nothing and adds no MLflow run; raising the epochs to 4 runs only epochs 3-4, continuing
    from the checkpoint on the 4-epoch schedule, with the EMA and the same MLflow runs (steps 1-4)."""
    # Progressive resizing rides along: epoch 1 trains at 24 px, the rest at the full 32 px (so the first
    # run needs 2 epochs).  So does the EMA of weights (fp32, so that its scores reproduce exactly below),
    # and MLflow tracking to a sqlite store, whose runs the resume must continue.  160 images at 32 px
    # keep the four epochs cheap; resuming mid-schedule (epoch 3 of 4) shows the new plan's rate.
    client_class = require_mlflow().MlflowClient
    monkeypatch.chdir(tmp_path)  # a sqlite store keeps artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = quick_overrides(
        small_real_data,
        tmp_path,
        "resume",
        **{
            "models": "[sequential_cnn]",
            "tracking.mlflow_uri": uri,
            "tracking.experiment": "catdog-tests",
            "data.limit": 160,
            "data.image_size": 32,
            "models.0.early_image_size": 24,
            "models.0.early_epochs": 1,
            "train.ema_decay": 0.9,
            "train.amp": False,
            "train.keep_checkpoints": 4,  # every epoch's checkpoint is checked
            "train.epochs": 2,
        },
    )
    cfg = load_config(REPO / "configs" / "quick.yaml", sets)
    run_training(cfg)
    run, arch = tmp_path / "resume", tmp_path / "resume" / "sequential_cnn"
    result = json.loads((arch / "result.json").read_text())
    assert result["fingerprint"] == json.loads(json.dumps(run_fingerprint(cfg, cfg.models[0])))
    assert json.loads((arch / "epoch_001" / "meta.json").read_text())["fingerprint"] == result["fingerprint"]
    client = client_class(uri, uri)
    experiment = client.get_experiment_by_name("catdog-tests").experiment_id
    first_runs = {r.info.run_id: r.data.tags.get("arch") for r in client.search_runs([experiment])}
    assert sorted(first_runs.values(), key=str) == [None, "sequential_cnn"]  # the parent run and the arch's
    first = read_csv(arch / "metrics.csv")
    assert [int(r["epoch"]) for r in first] == [1, 2]
    assert [int(r["train_image_size"]) for r in first] == [24, 32]
    kept = {name: (run / name).read_bytes() for name in ("best.json", "leaderboard.csv", "config.yaml")}
    stamps = {str(p): p.stat().st_mtime_ns for p in arch.glob("epoch_*/model.pt")}

    changed = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train.py"), "--config", str(REPO / "configs" / "quick.yaml")]
        + [*set_args(sets), "--set", "train.lr=0.0005", "--set", "data.val_fraction=0.3"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [line for line in changed.stderr.splitlines() if line.startswith("error: ")]
    assert changed.returncode == 2 and len(lines) == 1, changed.stderr[-3000:]
    assert "sequential_cnn: train.lr 0.002 -> 0.0005" in lines[0] and "data.val_fraction 0.25 -> 0.3" in lines[0]
    assert "--restart" in lines[0] and "run_name" in lines[0]
    assert {name: (run / name).read_bytes() for name in kept} == kept

    # Settings that do not shape a model may change; a finished run is then reused as it is.
    with caplog.at_level(logging.INFO, logger="catdog"):
        same = run_training(load_config(REPO / "configs" / "quick.yaml", [*sets, "predict.batch_size=32"]))
    assert same == str(run / "best.json")
    assert "already trained for 2 epochs, skipping" in caplog.text
    assert read_csv(arch / "metrics.csv") == first
    assert sorted(p.name for p in arch.glob("epoch_*")) == ["epoch_001", "epoch_002"]
    assert {str(p): p.stat().st_mtime_ns for p in arch.glob("epoch_*/model.pt")} == stamps
    assert {r.info.run_id for r in client.search_runs([experiment])} == set(first_runs)

    # Raising epochs continues from the checkpoint on the schedule of the new count (training.lr_factor).
    longer = load_config(REPO / "configs" / "quick.yaml", [*sets, "train.epochs=4"])
    run_training(longer)
    second = read_csv(arch / "metrics.csv")
    assert [int(r["epoch"]) for r in second] == [1, 2, 3, 4]
    assert [int(r["train_image_size"]) for r in second] == [24, 32, 32, 32]
    assert second[:2] == first  # epochs 1-2 were not run again
    assert (arch / "epoch_004" / "model.pt").exists()
    for path, stamp in stamps.items():
        assert Path(path).stat().st_mtime_ns == stamp
    result = json.loads((arch / "result.json").read_text())
    assert result["epochs"] == 4
    n_train = len(load_split(STORAGE, cfg.data.train, cfg.data.val_fraction, cfg.data.seed, cfg.data.limit).train)
    per_epoch = math.ceil(n_train / cfg.train.batch_size)

    def end_of_epoch_lr(epoch: int, planned_epochs: int) -> float:
        total = planned_epochs * per_epoch
        return cfg.train.lr * lr_factor(epoch * per_epoch - 1, total, int(cfg.train.warmup_fraction * total))

    assert float(second[1]["lr"]) == pytest.approx(end_of_epoch_lr(2, 2), abs=1e-6)  # as the 2-epoch run left it
    assert float(second[2]["lr"]) == pytest.approx(end_of_epoch_lr(3, 4), abs=1e-6)  # the 4-epoch plan
    assert float(second[2]["lr"]) > float(second[1]["lr"])  # back up from the floor that ended the 2-epoch run
    check_ema_checkpoints(longer, arch, second)
    # Ray Train resumed from the epoch-2 checkpoint, MLflow the same runs from mlflow.json.
    assert {r.info.run_id: r.data.tags.get("arch") for r in client.search_runs([experiment])} == first_runs
    arch_run = next(run_id for run_id, name in first_runs.items() if name == "sequential_cnn")
    assert [m.step for m in client.get_metric_history(arch_run, "val_acc")] == [1, 2, 3, 4]
    versions = client.search_model_versions("name='catdog-resume'")
    assert 1 <= len(versions) <= 2 and len({v.source for v in versions}) == len(versions)


def check_ema_checkpoints(cfg, arch: Path, rows: list[dict]) -> None:
    """Each epoch checkpointed the weights its metrics chose and says which; the EMA's update count ran on
    across the resume; model.pt (what predict loads) and the other weights reproduce their scores."""
    n_train = len(load_split(STORAGE, cfg.data.train, cfg.data.val_fraction, cfg.data.seed, cfg.data.limit).train)
    steps_per_epoch = math.ceil(n_train / cfg.train.batch_size)
    for row in rows:
        chosen = row["weights"]
        assert chosen in ("ema", "raw") and float(row["val_acc"]) == float(row[f"val_acc_{chosen}"])
        assert float(row["val_log_loss"]) == float(row[f"val_log_loss_{chosen}"])
        folder = arch / f"epoch_{int(row['epoch']):03d}"
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["weights"] == meta["metrics"]["weights"] == chosen
        state = load_checkpoint(str(folder))
        assert state["ema"]["updates"] == int(row["epoch"]) * steps_per_epoch  # epoch 3: resumed, not restarted
    last = arch / f"epoch_{int(rows[-1]['epoch']):03d}"
    model, meta = load_model(STORAGE, str(last))
    state = load_checkpoint(str(last))
    other_name = "raw" if meta["weights"] == "ema" else "ema"
    other = build_model(meta["arch"])
    other.load_state_dict(state["model"] if other_name == "raw" else state["ema"]["model"])
    for net, name in ((model, meta["weights"]), (other, other_name)):
        accuracy, n_val = val_accuracy(cfg, net, meta)
        assert accuracy == pytest.approx(float(rows[-1][f"val_acc_{name}"]), abs=1.5 / n_val), name


def ddp_probe_loop(cfg: dict) -> None:
    """Runs on each of 2 workers: one epoch through catdog's own functions, then records what it saw."""
    import ray.train
    import ray.train.torch

    from catdog import training
    from catdog.models import build_model
    from catdog.training import build_optimizer, train_one_epoch

    rank = ray.train.get_context().get_world_rank()
    # The ranks' CPUs disagree (this worker process is the run's own): rank 0's precision must hold for both.
    training.cpu_has_fast_bf16 = lambda: True
    training.bf16_speedup = lambda *_: 100.0 if rank else 0.01
    amp, speedup = training.pick_train_precision({**cfg, "amp": True}, torch.device("cpu"), rank)
    torch.manual_seed(rank)  # different start: DDP must sync it
    model = ray.train.torch.prepare_model(build_model("sequential_cnn"))
    optimizer = build_optimizer(model, "sequential_cnn", cfg)
    seen: list[str] = []
    stats = train_one_epoch(
        model,
        optimizer,
        ray.train.get_dataset_shard("train"),
        cfg,
        step=0,
        total_steps=10,
        frozen=False,
        device=torch.device("cpu"),
        seen=seen,
    )
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.module.parameters())).hexdigest()
    record = {"digest": digest, "seen": seen, "amp": amp, "speedup": speedup, **stats}
    Path(cfg["out"], f"rank{rank}.json").write_text(json.dumps(record))
    ray.train.report({"done": 1})


@pytest.mark.slow
def test_ddp_two_workers_share_weights_and_split_the_rows(small_real_data, tmp_path, ray_session):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from catdog.data import image_dataset
    from catdog.presets import TrainPreset
    from catdog.train_job import loop_config
    from catdog.worker_split import ShardConfig

    cfg = quick_cfg(small_real_data, tmp_path, "ddp")
    split = load_split(STORAGE, cfg.data.train, cfg.data.val_fraction, cfg.data.seed, cfg.data.limit)
    loop_cfg = {**loop_config(cfg, cfg.models[0], STORAGE, len(split.train)), "out": str(tmp_path)}
    trainer = TorchTrainer(
        ddp_probe_loop,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="ddp-probe", storage_path=str(tmp_path / "storage")),
        datasets={"train": image_dataset(STORAGE, split.train, TrainPreset(32), batch_size=32)},
        dataset_config=ShardConfig(),
    )
    trainer.fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert [(r["amp"], r["speedup"]) for r in ranks] == [(False, 0.01), (False, 100.0)]  # rank 0's choice
    seen0, seen1 = set(ranks[0]["seen"]), set(ranks[1]["seen"])
    assert not seen0 & seen1
    assert len(seen0) == len(seen1) == len(split.train) // 2
    assert ranks[0]["train_images"] == 2 * len(seen0)  # loss and counts are summed over both ranks


def test_one_worker_reads_whole_datasets_without_a_split_coordinator(ray_session):
    """world_size 1: each dataset's own iterator, every row; no streaming_split (whose coordinator
    actor is a process started per dataset and run).  Two workers' split: the DDP test above."""
    import ray.data

    from catdog.worker_split import ShardConfig

    datasets = {"train": ray.data.range(10), "val": ray.data.range(5)}
    [shards] = ShardConfig().configure(datasets, world_size=1, worker_handles=None, worker_node_ids=None)
    assert {type(it).__name__ for it in shards.values()} == {"DataIteratorImpl"}
    assert sorted(row["id"] for row in shards["train"].iter_rows()) == list(range(10))
    assert sorted(row["id"] for row in shards["val"].iter_rows()) == list(range(5))


@pytest.mark.slow
def test_init_from_state_dict_with_frozen_backbone_warm_up(small_real_data, tmp_path, ray_session):
    reference = torchvision.models.mobilenet_v2(weights=None)
    init = tmp_path / "mobilenet_v2.pt"
    torch.save(reference.state_dict(), init)
    cfg = quick_cfg(
        small_real_data,
        tmp_path,
        "frozen",
        **{
            "models": "[mobilenet_v2]",
            "train.init": str(init),
            "train.epochs": 2,
            "train.freeze_backbone_epochs": 1,
            "data.limit": 160,
            "data.image_size": 32,
        },
    )
    run_training(cfg)
    arch = tmp_path / "frozen" / "mobilenet_v2"
    after1 = torch.load(arch / "epoch_001" / "model.pt", weights_only=True)
    after2 = torch.load(arch / "epoch_002" / "model.pt", weights_only=True)
    start = reference.state_dict()
    backbone_keys = [k for k in after1 if not k.startswith("classifier.") and k.endswith("weight")]
    assert all(torch.equal(after1[k], start[k]) for k in backbone_keys), "backbone moved while frozen"
    assert all(torch.equal(after1[k], start[k]) for k in after1 if "running_mean" in k), "BN stats moved"
    assert not torch.equal(after1["classifier.1.weight"], after2["classifier.1.weight"])
    assert any(not torch.equal(after2[k], after1[k]) for k in backbone_keys), "backbone never unfroze"
    # Fine-tuning uses a lower backbone rate than the head's.
    from catdog.train_job import loop_config
    from catdog.training import build_optimizer, set_learning_rates

    loop_cfg = loop_config(cfg, cfg.models[0], STORAGE, 100)
    optimizer = build_optimizer(build_model("mobilenet_v2"), "mobilenet_v2", loop_cfg)
    set_learning_rates(optimizer, loop_cfg, step=50, total_steps=100, frozen=False)
    rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert rates["backbone"] == pytest.approx(rates["head"] * cfg.train.backbone_lr_mult)
    set_learning_rates(optimizer, loop_cfg, step=50, total_steps=100, frozen=True)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups}["backbone"] == 0
    backbone, head = split_parameters(build_model("mobilenet_v2"), "mobilenet_v2")
    assert len(head) == 2 and len(backbone) > 100


def test_the_best_checkpoint_breaks_an_accuracy_tie_by_log_loss_then_the_later_epoch():
    """Ray keeps checkpoints by val_acc alone; the one catdog records and predicts with is the better
    on log loss among equal accuracies (ResNet18's epochs 12 and 14 tied at 0.9353, 0.1700 and 0.1626)."""
    kept = [
        ("epoch_012", {"epoch": 12, "val_acc": 0.9353, "val_log_loss": 0.1700}),
        ("epoch_014", {"epoch": 14, "val_acc": 0.9353, "val_log_loss": 0.1626}),
        ("epoch_011", {"epoch": 11, "val_acc": 0.9306, "val_log_loss": 0.1500}),
    ]
    assert best_reported(kept)[0] == "epoch_014"
    assert best_reported(kept[::-1])[0] == "epoch_014"
    same = [
        ("epoch_003", {"epoch": 3, "val_acc": 0.9, "val_log_loss": 0.2}),
        ("epoch_004", {"epoch": 4, "val_acc": 0.9, "val_log_loss": 0.2}),
    ]
    assert best_reported(same)[0] == "epoch_004"  # a full tie: the later, further along its schedule
    assert best_reported([*kept, ("epoch_009", {"epoch": 9, "val_acc": 0.94, "val_log_loss": 0.3})])[0] == "epoch_009"
