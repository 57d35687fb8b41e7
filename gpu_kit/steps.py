"""The kit's measured steps, one process each: ``python -m gpu_kit.steps NAME '{json args}'``.

Each prints its result as one JSON line starting with ``RESULT_TAG``; ``gpu_kit.check`` runs them
under their own timeouts.  ``args["device"]`` is ``cuda`` on the GPU machine and ``cpu`` for
``run.sh --cpu``, which runs the same code on fewer, smaller images.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path

import torch

RESULT_TAG = "GPU-CHECK-RESULT "
REPO = Path(__file__).resolve().parents[1]


def catdog_config(a: dict, run_name: str, train: str, **extra):
    """configs/quick.yaml with the kit's data, sizes and device: what every catdog step runs."""
    from catdog.config import load_config

    gpu = a["device"] == "cuda"
    sets = {
        "data.train": train,
        "data.test": f"{a['data']}/test1",
        "storage.root": f"{a['work']}/runs",
        "run_name": run_name,
        "data.limit": "null",
        "data.val_fraction": 0.2,
        "data.image_size": a["size"],
        "train.batch_size": a["batch"],
        "train.use_gpu": gpu,
        "train.amp": True,
        "train.measure_amp": False,  # the plain loop autocasts wherever the device has bf16: so does catdog
        "train.num_workers": 1,
        "train.init": "scratch",
        "predict.amp": True,
        "predict.measure_amp": False,  # the plain loops autocast wherever the device has bf16: so does catdog
        "predict.num_gpus": 1 if gpu else 0,
        "ray.num_cpus": os.cpu_count() if gpu else 4,
        # The GPU machine's plain `ray` has no dashboard packages: run.sh --cpu starts none either.
        "ray.dashboard": False,
        **extra,
    }
    return load_config(REPO / "configs" / "quick.yaml", [f"{k}={v}" for k, v in sets.items()])


def arch_results(run_dir: Path, arches: list[str]) -> dict:
    out = {}
    for arch in arches:
        result = json.loads((run_dir / arch / "result.json").read_text())
        with open(run_dir / arch / "metrics.csv", newline="") as handle:
            epochs = list(csv.DictReader(handle))
        out[arch] = {
            "epochs": result["epochs"],
            "val_acc": result["val_acc"],
            "checkpoint": result["checkpoint"],
            "epoch_images_per_s": [round(float(e["images_per_s"]), 1) for e in epochs],
            # Where epoch 1's time goes on a fresh worker: waiting for the first batch (Ray Data
            # starting), waiting for later ones (data-bound), and the whole epoch.
            "epoch_seconds": [round(float(e["train_seconds"]), 2) for e in epochs],
            "first_batch_seconds": [round(float(e["first_batch_seconds"]), 2) for e in epochs],
            "data_wait_seconds": [round(float(e["data_wait_seconds"]), 2) for e in epochs],
        }
    return out


def train(a: dict) -> dict:
    """ResNet18 (progressive resizing) and MobileNetV2 from scratch under a time budget, one Train
    worker, AMP, EMA of the weights: the speed measurement, planning, EMA, temperature fit and the
    validation study's ensemble weights on this device, end to end."""
    from catdog.train_job import run_training
    from catdog.training import amp_dtype

    arches = ["resnet18", "mobilenet_v2"]
    small = a["size"] // 2
    models = (
        f"[{{arch: resnet18, early_image_size: {small}, early_fraction: 0.5, budget_share: 3}},"
        " {arch: mobilenet_v2, budget_share: 1}]"
    )
    limit = "null" if a["train_limit"] is None else a["train_limit"]
    budget = a["train_budget_minutes"]
    sets = {"train.time_budget_minutes": budget, "train.ema_decay": 0.99, "data.limit": limit}
    cfg = catdog_config(a, "smoke", f"{a['data']}/train", models=models, **sets)
    started = time.perf_counter()
    run_training(cfg)
    run_seconds = time.perf_counter() - started
    run = Path(a["work"], "runs", "smoke")
    results = arch_results(run, arches)
    plan = json.loads((run / "plan.json").read_text())
    study = json.loads((run / "val_study.json").read_text())
    for arch, result in results.items():
        meta = json.loads((Path(result["checkpoint"]) / "meta.json").read_text())
        result.update({k: meta.get(k) for k in ("temperature", "weights", "image_size")})
        result["plan"] = plan["archs"][arch]
    passed = (
        all(r["epochs"] >= 1 and 0 <= r["val_acc"] <= 1 and r["temperature"] for r in results.values())
        and "actual_minutes" in plan["study"]
        and bool(study.get("ensemble", {}).get("weights"))
    )
    return {
        "passed": passed,
        "amp_dtype": str(amp_dtype(torch.device(a["device"]), True)),
        "budget_minutes": budget,
        "run_minutes": round(run_seconds / 60, 2),
        "measure_seconds": plan["measure_seconds"],
        "seconds_per_image": plan["seconds_per_image"],
        "study": plan["study"],
        "ensemble": study.get("ensemble"),
        "models": results,
    }


def linked_folder(source: Path, folder: Path, n: int, labelled: bool) -> list[str]:
    """``n`` file names for the kit's images, repeated through symlinks (unique names, so the split
    and the ids still work): ``cat.N.jpg`` / ``dog.N.jpg`` when labelled, else ``N.jpg``."""
    images = sorted(source.glob("*.jpg"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        image = images[i % len(images)]
        name = f"{image.name.split('.')[0]}.{i}.jpg" if labelled else f"{i + 1}.jpg"
        link = folder / name
        if not link.exists():
            link.symlink_to(image.resolve())
        paths.append(str(link))
    return paths


def train_timing(a: dict) -> dict:
    """3 epochs of ResNet18 through catdog (Ray Train + Ray Data) against the plain loop, same
    device, batch, size and precision.  Epoch 1 warms up both; the rate is the mean of epochs 2-3."""
    from catdog.data import load_split
    from catdog.storage import Storage
    from catdog.train_job import run_training
    from gpu_kit.plain import plain_train

    folder = Path(a["work"], "train-linked")
    linked_folder(Path(a["data"], "train"), folder, a["train_images"], labelled=True)
    # Timing only: no validation study or report after training.
    cfg = catdog_config(a, "timing", str(folder), models="[resnet18]", **{"train.epochs": 3, "train.report": False})
    started = time.perf_counter()
    run_training(cfg)
    run_seconds = time.perf_counter() - started
    timing = arch_results(Path(a["work"], "runs", "timing"), ["resnet18"])["resnet18"]
    catdog = timing["epoch_images_per_s"]
    catdog_rate = sum(catdog[1:]) / len(catdog[1:])
    files = [row["path"] for row in load_split(Storage(), str(folder), 0.2, 0).train]
    device = torch.device(a["device"])
    plain = plain_train(files, "resnet18", a["size"], a["batch"], 3, device, a["loader_workers"], amp=True)
    return {
        "passed": catdog_rate > 0 and plain["images_per_s"] > 0,
        "train_images_per_epoch": len(files),
        "catdog_images_per_s": round(catdog_rate, 1),
        "catdog_epoch_images_per_s": catdog,
        "catdog_run_seconds": round(run_seconds, 1),
        **{f"catdog_{k}": timing[k] for k in ("epoch_seconds", "first_batch_seconds", "data_wait_seconds")},
        "plain_images_per_s": round(plain["images_per_s"], 1),
        "plain_epoch_images_per_s": [round(r, 1) for r in plain["epoch_images_per_s"]],
        "ratio": round(catdog_rate / plain["images_per_s"], 3),
    }


def predict_checkpoint(a: dict) -> str:
    """The smoke step's ResNet18 checkpoint; if that step failed, untrained weights in a checkpoint
    folder (throughput does not depend on the weights)."""
    result = Path(a["work"], "runs", "smoke", "resnet18", "result.json")
    if result.exists():
        return json.loads(result.read_text())["checkpoint"]
    from catdog.models import META_FILE, MODEL_FILE, build_model

    folder = Path(a["work"], "untrained-resnet18")
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(build_model("resnet18").state_dict(), folder / MODEL_FILE)
    (folder / META_FILE).write_text(json.dumps({"arch": "resnet18", "image_size": a["size"], "crop_fraction": 0.875}))
    return str(folder)


def predict(a: dict) -> dict:
    """``predict_images`` files scored by catdog's GPU actor (the predict job end to end, then the
    same Ray Data pipeline again, timed from its first batch) and by the plain loop."""
    import pyarrow.parquet as pq

    from catdog.checkpoints import load_model
    from catdog.inference import model_ref, predictions_dataset
    from catdog.predict_job import run_predict
    from catdog.storage import Storage
    from gpu_kit.plain import plain_predict

    folder = Path(a["work"], "predict-linked")
    files = linked_folder(Path(a["data"], "test1"), folder, a["predict_images"], labelled=False)
    checkpoint, storage = predict_checkpoint(a), Storage()
    cfg = catdog_config(
        a, "predict", f"{a['data']}/train", **{"predict.batch_size": a["predict_batch"], "predict.torch_threads": 2}
    )
    out = Path(a["work"], "predict-out")
    start = time.perf_counter()
    run_predict(cfg, checkpoint, str(folder), str(out))
    end_to_end = len(files) / (time.perf_counter() - start)
    rows = pq.read_table(out / "predictions").num_rows

    ds = predictions_dataset(
        cfg,
        storage,
        [{"path": p, "id": i + 1} for i, p in enumerate(files)],
        [model_ref(storage, checkpoint)],
        tta=False,
    )
    count, first = 0, None
    for batch in ds.iter_batches(batch_size=a["predict_batch"], batch_format="pyarrow"):
        if first is None:
            first = time.perf_counter()
        else:
            count += batch.num_rows
    steady = count / max(time.perf_counter() - first, 1e-9)

    model, meta = load_model(storage, checkpoint)
    device = torch.device(a["device"])
    plain = plain_predict(
        files,
        model,
        meta["image_size"],
        meta.get("crop_fraction", 0.875),
        a["predict_batch"],
        device,
        a["loader_workers"],
        amp=True,
    )
    return {
        "passed": rows == len(files) and steady > 0,
        "images": len(files),
        "prediction_rows": rows,
        "catdog_end_to_end_images_per_s": round(end_to_end, 1),
        "catdog_images_per_s": round(steady, 1),
        "plain_images_per_s": round(plain["images_per_s"], 1),
        "ratio": round(steady / plain["images_per_s"], 3),
    }


STEPS = {f.__name__: f for f in (train, train_timing, predict)}

if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = STEPS[sys.argv[1]](json.loads(sys.argv[2]))
    print(RESULT_TAG + json.dumps(result), flush=True)
