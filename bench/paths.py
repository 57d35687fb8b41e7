"""The measured paths.  ``python bench/paths.py NAME '{json args}'`` runs one and prints one JSON
line: images, seconds (the timed part), startup (seconds before it), rss_mb (peak, this process)."""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from catdog.data import decode_image, id_from_path
from catdog.presets import EvalPreset
from catdog.storage import Storage


def train_files(data: str, n: int) -> list[str]:
    half = (n + 1) // 2
    return [f"{data}/train/{kind}.{i}.jpg" for i in range(half) for kind in ("cat", "dog")][:n]


def test_folder(data: str, n: int) -> str:
    """``n`` test images; beyond the 5,000 real ones, test1 is repeated through symlinks."""
    source = sorted(Path(data, "test1").glob("*.jpg"), key=lambda p: int(p.stem))
    if n <= len(source):
        folder = Path(tempfile.mkdtemp(prefix="catdog-bench-"))
        for path in source[:n]:
            (folder / path.name).symlink_to(path)
        return str(folder)
    folder = Path(tempfile.mkdtemp(prefix="catdog-bench-"))
    for i in range(n):
        (folder / f"{i + 1}.jpg").symlink_to(source[i % len(source)])
    return str(folder)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decode_file(path: str, preset: EvalPreset) -> np.ndarray:
    with open(path, "rb") as handle:
        return decode_image(handle.read(), preset)


class FileDataset(torch.utils.data.Dataset):
    def __init__(self, files: list[str], preset: EvalPreset):
        self.files, self.preset = files, preset

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(decode_file(self.files[index], self.preset))


def pillow_single(a: dict) -> dict:
    files = train_files(a["data"], a["n"])
    start = time.perf_counter()
    for path in files:
        decode_file(path, EvalPreset(a["size"], crop_fraction=1.0))
    return {"images": len(files), "seconds": time.perf_counter() - start}


def dataloader_2(a: dict) -> dict:
    files = train_files(a["data"], a["n"])
    preset = EvalPreset(a["size"], crop_fraction=1.0)
    loader = torch.utils.data.DataLoader(FileDataset(files, preset), batch_size=a["batch"], num_workers=2)
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch)
    return {"images": count, "seconds": time.perf_counter() - start}


def start_ray(workers: int) -> float:
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return time.perf_counter() - start


def ray_read_images(a: dict) -> dict:
    import ray

    startup = start_ray(a["ray_workers"])
    files = train_files(a["data"], a["n"])
    start, count = time.perf_counter(), 0
    ds = ray.data.read_images(files, size=(a["size"], a["size"]), mode="RGB")
    for batch in ds.iter_torch_batches(batch_size=a["batch"]):
        count += len(batch["image"])
    return {"images": count, "seconds": time.perf_counter() - start, "startup": startup}


def catdog_folder(a: dict) -> dict:
    from catdog.data import image_dataset
    from catdog.training import Collate

    startup = start_ray(a["ray_workers"])
    rows = [{"path": p, "label": 0} for p in train_files(a["data"], a["n"])]
    start, count = time.perf_counter(), 0
    ds = image_dataset(Storage(), rows, EvalPreset(a["size"], crop_fraction=1.0), batch_size=128)
    for batch in ds.iter_torch_batches(batch_size=a["batch"], collate_fn=Collate()):
        count += len(batch["path"])
    return {"images": count, "seconds": time.perf_counter() - start, "startup": startup}


def catdog_shards(a: dict) -> dict:
    """The training reader over Parquet shards made by ``prepare`` (packing is not timed)."""
    from catdog.data import image_dataset, list_entries
    from catdog.shards import prepare_shards
    from catdog.training import Collate

    startup = start_ray(a["ray_workers"])
    storage, source = Storage(), Path(tempfile.mkdtemp(prefix="catdog-bench-src-"))
    for path in train_files(a["data"], a["n"]):
        (source / Path(path).name).symlink_to(path)
    shards_dir = tempfile.mkdtemp(prefix="catdog-bench-shards-")
    prepare_shards(storage, str(source), shards_dir)
    entries, shards = list_entries(storage, shards_dir)
    start, count = time.perf_counter(), 0
    ds = image_dataset(storage, entries, EvalPreset(a["size"], crop_fraction=1.0), batch_size=128, shards=shards)
    for batch in ds.iter_torch_batches(batch_size=a["batch"], collate_fn=Collate()):
        count += len(batch["path"])
    return {"images": count, "seconds": time.perf_counter() - start, "startup": startup}


def plain_train(a: dict) -> dict:
    from catdog.models import build_model
    from catdog.training import to_model_input

    torch.set_num_threads(a["threads"])
    model = build_model(a["arch"]).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randint(0, 255, (a["n"], a["size"], a["size"], 3), dtype=torch.uint8)
    labels = torch.randint(0, 2, (a["n"],))
    loss_fn = torch.nn.CrossEntropyLoss()
    warm_up = min(2, a["n"] // a["batch"] - 1)  # steady state: after (up to) two warm-up steps
    count, start = 0, time.perf_counter()
    for i in range(0, a["n"], a["batch"]):
        if i == warm_up * a["batch"]:
            start, count = time.perf_counter(), 0
        loss = loss_fn(
            model(to_model_input(images[i : i + a["batch"]], torch.device("cpu"))), labels[i : i + a["batch"]]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        count += len(labels[i : i + a["batch"]])
    return {"images": count, "seconds": time.perf_counter() - start}


def catdog_train(a: dict) -> dict:
    import csv

    from catdog.config import load_config
    from catdog.train_job import run_training

    root = tempfile.mkdtemp(prefix="catdog-bench-runs-")
    n_total = int(a["n"] / 0.8)
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "quick.yaml",
        [
            f"data.train={a['data']}/train",
            f"storage.root={root}",
            f"models=[{a['arch']}]",
            f"data.limit={n_total}",
            f"data.image_size={a['size']}",
            "data.val_fraction=0.2",
            "train.epochs=2",
            f"train.batch_size={a['batch']}",
            f"train.torch_threads={a['threads']}",
            "ray.num_cpus=4",
        ],
    )
    start = time.perf_counter()
    run_training(cfg)
    wall = time.perf_counter() - start
    with open(f"{root}/quick/{a['arch']}/metrics.csv", newline="") as handle:
        last = list(csv.DictReader(handle))[-1]  # epoch 2: steady state
    seconds, images = float(last["train_seconds"]), int(last["train_images"])
    return {"images": images, "seconds": seconds, "startup": wall - seconds, "rss_mb": rss_mb()}


def _checkpoint_for(arch: str, size: int) -> str:
    """A catdog checkpoint folder with untrained weights (throughput does not depend on them)."""
    from catdog.models import META_FILE, MODEL_FILE, build_model

    folder = Path(tempfile.mkdtemp(prefix="catdog-bench-ckpt-"))
    torch.save(build_model(arch).state_dict(), folder / MODEL_FILE)
    (folder / META_FILE).write_text(json.dumps({"arch": arch, "image_size": size, "crop_fraction": 0.875}))
    return str(folder)


def plain_predict(a: dict) -> dict:
    from catdog.models import build_model
    from catdog.training import to_model_input

    torch.set_num_threads(a["threads"])
    files = sorted(str(p) for p in Path(test_folder(a["data"], a["n"])).iterdir())
    model = build_model(a["arch"]).eval()
    loader = torch.utils.data.DataLoader(
        FileDataset(files, EvalPreset(a["size"])), batch_size=a["batch"], num_workers=2
    )
    start, count = time.perf_counter(), 0
    with torch.inference_mode():
        for batch in loader:
            torch.softmax(model(to_model_input(batch, torch.device("cpu"))), 1)
            count += len(batch)
    return {"images": count, "seconds": time.perf_counter() - start, "rss_mb": rss_mb()}


def catdog_predict(a: dict) -> dict:
    """The predict job end to end (Ray start-up, listing, Parquet and CSV included), then the same
    Ray Data pipeline once more, timed from its first batch: the steady state."""
    import ray

    from catdog.config import load_config
    from catdog.data import list_entries
    from catdog.inference import model_ref, predictions_dataset, run_predict

    folder = test_folder(a["data"], a["n"])
    out = tempfile.mkdtemp(prefix="catdog-bench-out-")
    actors = a["ray_workers"]
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "local.yaml",
        [
            f"storage.root={out}",
            f"predict.batch_size={a['batch']}",
            f"predict.concurrency={actors}",
            f"predict.torch_threads={max(1, a['threads'] // actors)}",
            f"ray.num_cpus={actors + 2}",
        ],
    )
    checkpoint, storage = _checkpoint_for(a["arch"], a["size"]), Storage()
    start = time.perf_counter()
    run_predict(cfg, checkpoint, folder, out)
    seconds = time.perf_counter() - start
    assert id_from_path(f"{folder}/1.jpg") == 1
    rows = [{"path": e["path"], "id": e["id"]} for e in list_entries(storage, folder)[0]]
    ds = predictions_dataset(cfg, storage, rows, [model_ref(storage, checkpoint)], tta=False)
    count, steady_start = 0, None
    for batch in ds.iter_batches(batch_size=a["batch"], batch_format="pyarrow"):
        if steady_start is None:
            steady_start = time.perf_counter()
        else:
            count += batch.num_rows
    steady = time.perf_counter() - steady_start
    ray.shutdown()
    return {"images": a["n"], "seconds": seconds, "steady_images": count, "steady_seconds": steady, "rss_mb": rss_mb()}


PATHS = {
    f.__name__: f
    for f in (
        pillow_single,
        dataloader_2,
        ray_read_images,
        catdog_folder,
        catdog_shards,
        plain_train,
        catdog_train,
        plain_predict,
        catdog_predict,
    )
}

if __name__ == "__main__":
    print(json.dumps(PATHS[sys.argv[1]](json.loads(sys.argv[2]))), flush=True)
