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

from catdog.images import decode_image, id_from_path
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


def warm_then_time(build, files: list[str], batch: int, column: str, startup: float, **iter_args) -> dict:
    """Time one pass of ``build(files)`` with warm Ray workers.

    A first pass over a few blocks starts Ray's worker processes and their imports; that goes into
    ``startup`` with ``ray.init``.  A training job pays it once, not every epoch, so the timed pass is
    the steady state, measured the same way for every Ray path."""
    warm_start = time.perf_counter()
    for _ in build(files[: 2 * READER["batch_size"]]).iter_torch_batches(batch_size=batch, **iter_args):
        pass
    startup += time.perf_counter() - warm_start
    start, count = time.perf_counter(), 0
    for rows in build(files).iter_torch_batches(batch_size=batch, **iter_args):
        count += len(rows[column])
    return {"images": count, "seconds": time.perf_counter() - start, "startup": startup}


# catdog's reader as configured where decode is the bottleneck (data.decode_batch_size and
# data.decode_threads); bench/levers.py measures the alternatives.
READER = {"batch_size": 512, "threads": 2}


def reader(ray_workers: int) -> dict:
    """READER on ``ray_workers`` logical CPUs: a decode task reserves a CPU per thread, so the
    1-CPU scaling row decodes with one thread (two would never be scheduled)."""
    return {**READER, "threads": min(READER["threads"], ray_workers)}


def ray_read_images(a: dict) -> dict:
    import ray

    startup = start_ray(a["ray_workers"])

    def build(files):
        return ray.data.read_images(files, size=(a["size"], a["size"]), mode="RGB")

    return warm_then_time(build, train_files(a["data"], a["n"]), a["batch"], "image", startup)


def catdog_folder(a: dict) -> dict:
    from catdog.data import image_dataset
    from catdog.training import Collate

    startup = start_ray(a["ray_workers"])

    def build(files):
        rows = [{"path": p, "label": 0} for p in files]
        return image_dataset(Storage(), rows, EvalPreset(a["size"], crop_fraction=1.0), **reader(a["ray_workers"]))

    files = train_files(a["data"], a["n"])
    return warm_then_time(build, files, a["batch"], "label", startup, collate_fn=Collate())


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
    by_path = {entry["path"]: entry for entry in entries}

    def build(paths):
        rows = [by_path[p] for p in paths]
        preset = EvalPreset(a["size"], crop_fraction=1.0)
        return image_dataset(storage, rows, preset, shards=shards, **reader(a["ray_workers"]))

    return warm_then_time(build, list(by_path), a["batch"], "label", startup, collate_fn=Collate())


def bf16(a: dict) -> bool:
    """The row's precision: bf16 autocast on both sides (catdog's ``amp``), or fp32 on both."""
    return a.get("precision", "fp32") == "bf16"


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
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16(a)):
            logits = model(to_model_input(images[i : i + a["batch"]], torch.device("cpu")))
            loss = loss_fn(logits, labels[i : i + a["batch"]])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        count += len(labels[i : i + a["batch"]])
    return {"images": count, "seconds": time.perf_counter() - start}


def catdog_train(a: dict) -> dict:
    """One training run of ``1 + repeats`` epochs; each epoch after the first is one run (steady state).
    ``startup`` is the rest of the wall time: Ray and Train start-up, epoch 1, validation, checkpoints."""
    import csv

    from catdog.config import load_config
    from catdog.train_job import run_training

    root = a.get("root") or tempfile.mkdtemp(prefix="catdog-bench-runs-")
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
            f"train.epochs={1 + a['repeats']}",
            f"train.batch_size={a['batch']}",
            f"train.torch_threads={a['threads']}",
            f"train.amp={str(bf16(a)).lower()}",  # the plain loop runs the same precision
            "train.measure_amp=false",
            "ray.num_cpus=4",
            *a.get("sets", []),
        ],
    )
    start = time.perf_counter()
    run_training(cfg)
    wall = time.perf_counter() - start
    with open(f"{root}/quick/{a['arch']}/metrics.csv", newline="") as handle:
        epochs = list(csv.DictReader(handle))[1:]
    startup = wall - sum(float(e["train_seconds"]) for e in epochs)
    return {
        "runs": [
            {"images": int(e["train_images"]), "seconds": float(e["train_seconds"]), "startup": startup} for e in epochs
        ],
        "rss_mb": rss_mb(),
    }


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
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16(a)):
        for batch in loader:
            torch.softmax(model(to_model_input(batch, torch.device("cpu"))).float(), 1)
            count += len(batch)
    return {"images": count, "seconds": time.perf_counter() - start, "rss_mb": rss_mb()}


def catdog_predict(a: dict) -> dict:
    """The predict job end to end (Ray start-up, listing, Parquet and CSV included), then the same
    Ray Data pipeline once more over up to ``STEADY_IMAGES`` images, timed from its first batch in
    three chunks: the steady state."""
    import pyarrow.parquet as pq
    import ray

    from catdog.config import load_config
    from catdog.data import list_entries
    from catdog.inference import model_ref, predictions_dataset
    from catdog.predict_job import run_predict

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
            f"predict.amp={str(bf16(a)).lower()}",
            "predict.measure_amp=false",  # the precision the row names, as the plain loop runs it
            # One pass per image, as the plain loop scores: local.yaml's flip TTA would double the compute.
            "predict.tta=false",
            f"ray.num_cpus={actors + 2}",
            *a.get("sets", []),
        ],
    )
    checkpoint, storage = _checkpoint_for(a["arch"], a["size"]), Storage()
    start = time.perf_counter()
    run_predict(cfg, checkpoint, folder, out)
    seconds = time.perf_counter() - start
    # What the timed run scored with, as its predictions say ("+tta" marks flip TTA).
    scored_as = sorted(set(pq.read_table(f"{out}/predictions", columns=["model"]).column("model").to_pylist()))
    assert id_from_path(f"{folder}/1.jpg") == 1
    rows = [{"path": e["path"], "id": e["id"]} for e in list_entries(storage, folder)[0]][:STEADY_IMAGES]
    ds = predictions_dataset(cfg, storage, rows, [model_ref(storage, checkpoint)], tta=False)
    stamps = []  # (images scored so far, time), from the first batch on
    for batch in ds.iter_batches(batch_size=a["batch"], batch_format="pyarrow"):
        stamps.append(((stamps[-1][0] + batch.num_rows) if stamps else 0, time.perf_counter()))
    ray.shutdown()
    return {
        "images": a["n"],
        "seconds": seconds,
        "steady_rates": chunk_rates(stamps, 3),
        "scored_as": scored_as,
        "rss_mb": rss_mb(),
    }


STEADY_IMAGES = 3000  # the steady-state pass: long enough for three chunks of ~30 batches


def chunk_rates(stamps: list[tuple[int, float]], chunks: int) -> list[float]:
    """Images/s over ``chunks`` equal spans of batches, after the first batch (the pipeline's fill)."""
    edges = np.linspace(0, len(stamps) - 1, chunks + 1).round().astype(int)
    return [
        (stamps[j][0] - stamps[i][0]) / (stamps[j][1] - stamps[i][1]) for i, j in zip(edges[:-1], edges[1:]) if j > i
    ]


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
