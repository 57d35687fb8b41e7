"""Batch inference with Ray Data: the pieces that score images and read the scores back.

The predict and evaluate jobs (:mod:`catdog.predict_job`) and the report's validation study
(:mod:`catdog.report`) are built from them; nothing here runs a whole job.

Pipeline: list files or shard names (driver, names only) → decode with each model's eval preset (CPU tasks) →
``map_batches(Predictor)`` in an actor pool (model loaded once per actor) → Parquet, written
under a temporary name and moved into place.  ``submission.csv`` and ``metrics.json`` are built
from the Parquet columns they need, never from whole rows pulled through the driver.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from catdog.calibration import CLIP, clipped_log_loss
from catdog.checkpoints import load_model, read_meta
from catdog.config import CatdogConfig
from catdog.console import emit
from catdog.data import image_dataset
from catdog.models import batchnorm_folded
from catdog.presets import MEAN, STD, EvalPreset
from catdog.storage import Storage, basename
from catdog.training import BF16_MIN_SPEEDUP, autocast, bf16_speedup, cpu_has_fast_bf16, to_model_input

logger = logging.getLogger(__name__)

# Images per timed forward pass when an actor picks its precision: about a second in all for
# ResNet18 at 128 px on 2 cores; the per-image speed barely depends on the batch.
PRECISION_BATCH = 32
# The id of a name without one, inside the pipeline: a null in an int64 column makes Ray's numpy
# batches float64, which rounds ids past 2**53 (a nanosecond-timestamp name) to a neighbour's.
NO_ID = -1


@dataclass(frozen=True)
class ModelRef:
    """A checkpoint to predict with, and the decoded-image column its eval preset produces."""

    checkpoint: str
    arch: str
    image_size: int
    crop_fraction: float
    # Normalisation the model was trained with, from its own meta.json.
    mean: tuple[float, ...] = MEAN
    std: tuple[float, ...] = STD
    # Logits are divided by it (fitted on validation, meta.json; 1.0: the model's own probabilities).
    temperature: float = 1.0
    # Its share of an ensemble's average (normalised over the members; fitted on validation).
    weight: float = 1.0

    @property
    def column(self) -> str:
        return f"image_{self.image_size}_{int(self.crop_fraction * 1000)}"

    @property
    def preset(self) -> EvalPreset:
        return EvalPreset(self.image_size, self.crop_fraction)

    @property
    def name(self) -> str:
        return f"{self.arch}:{basename(self.checkpoint)}"


def model_ref(
    storage: Storage,
    checkpoint_uri: str,
    calibrate: bool = True,
    weight: float = 1.0,
    tta: bool = False,
    as_trained: bool = False,
) -> ModelRef:
    """The checkpoint as its meta.json describes it: at the test-time size and temperature the
    validation study picked and fitted for this ``tta`` mode (``test_time``), else at its training
    size and training-time temperature (checkpoints from before calibration have none: 1.0).
    ``as_trained``: ignore ``test_time`` (the study's own passes); ``calibrate`` false: temperature 1.0."""
    meta = read_meta(storage, checkpoint_uri)
    test_time = {} if as_trained else meta.get("test_time", {})
    temperature = test_time.get("temperature_tta" if tta else "temperature", meta.get("temperature", 1.0))
    return ModelRef(
        checkpoint_uri,
        meta["arch"],
        test_time.get("image_size", meta["image_size"]),
        test_time.get("crop_fraction", meta.get("crop_fraction", 0.875)),
        tuple(meta.get("mean", MEAN)),
        tuple(meta.get("std", STD)),
        float(temperature) if calibrate else 1.0,
        weight,
    )


class Predictor:
    """Ray Data actor: loads its models once, then scores batches under ``inference_mode``.

    ``amp``: autocast (bf16 on Ampere+ GPUs, fp16 before, bf16 on CPUs with the instructions).
    With ``measure_amp`` on such a CPU the actor first times its models in both precisions and
    keeps bf16 only where it is faster (:func:`measure_scoring_precision`), and says which.

    Each model's margin, logit(dog) - logit(cat), is divided by its ref's temperature (under TTA
    each view's, the image's and its flip's, and their probabilities averaged); several models are
    averaged with their refs' weights (normalised), and each one's own probability is kept in
    ``member_prob_dog`` (in ``models`` order).  ``margins``: also keep every model's raw margins,
    per view, in ``member_margins`` (models x views per row), from which the validation study fits
    each model's temperatures and test size in one pass.  ``fold_batchnorm``: score copies of the
    models with BatchNorm folded into the convolutions (:func:`catdog.models.batchnorm_folded`)."""

    def __init__(
        self,
        storage: Storage,
        models: list[ModelRef],
        threshold: float,
        tta: bool,
        use_gpu: bool,
        torch_threads: int | None = None,
        amp: bool = False,
        measure_amp: bool = False,
        margins: bool = False,
        fold_batchnorm: bool = False,
    ):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        loaded = [load_model(storage, ref.checkpoint)[0] for ref in models]
        if fold_batchnorm:
            loaded = [batchnorm_folded(model) for model in loaded]
        self.models = [(ref, model.to(self.device)) for ref, model in zip(models, loaded, strict=True)]
        weights = np.array([ref.weight for ref in models], dtype=np.float32)
        self.weights = weights / weights.sum()
        self.temperatures = torch.tensor([ref.temperature for ref in models], dtype=torch.float32)[:, None, None]
        self.threshold, self.tta, self.amp, self.margins = threshold, tta, amp, margins
        if amp and measure_amp and self.device.type == "cpu":
            self.amp = self.pick_cpu_precision()
        # The models prob_dog comes from: one of weight 0 is scored into member_prob_dog only.
        self.name = "+".join(ref.name for ref in models if ref.weight > 0) + ("+tta" if tta else "")

    def pick_cpu_precision(self) -> bool:
        """bf16 or fp32, whichever this actor's CPU runs its models faster (the measurement
        happens here, not on the driver: on a cluster, each node's CPU decides for its actors)."""
        speed = measure_scoring_precision([(model, ref.image_size) for ref, model in self.models])
        if speed["bf16_speedup"] is not None:
            emit(
                f"predictor: scoring in {speed['precision']}: bf16 ran {speed['bf16_speedup']:.2f}x as fast as "
                "fp32 on this CPU (predict.amp=false: always fp32)"
            )
        return speed["amp"]

    @torch.inference_mode()
    def member_margins(self, batch: dict[str, np.ndarray]) -> torch.Tensor:
        """Each model's logit(dog) - logit(cat) per view (the image; under TTA also its flip): (models, views, rows)."""
        margins = []
        for ref, model in self.models:
            images = torch.from_numpy(np.ascontiguousarray(batch[ref.column]))
            x = to_model_input(images, self.device, mean=ref.mean, std=ref.std)
            views = (x, torch.flip(x, dims=[3])) if self.tta else (x,)
            with autocast(self.device, self.amp):
                logits = [model(view).float() for view in views]
            margins.append(torch.stack([view[:, 1] - view[:, 0] for view in logits]))
        return torch.stack(margins).cpu()

    def calibrated(self, margins: torch.Tensor) -> np.ndarray:
        """Each model's calibrated p(dog), its views' probabilities averaged: (models, rows)."""
        return torch.sigmoid(margins / self.temperatures).mean(dim=1).numpy().astype(np.float32)

    def prob_dog(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.weights @ self.calibrated(self.member_margins(batch))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        bad = np.array([bool(e) for e in batch["error"]], dtype=bool)
        ids = np.asarray(batch["id"], dtype=np.int64)
        margins = self.member_margins(batch)
        members = self.calibrated(margins)
        prob = (self.weights @ members).astype(np.float32)
        label = (prob >= self.threshold).astype(np.int8)
        columns = {
            "id": pa.array(ids, mask=ids == NO_ID, type=pa.int64()),
            "path": pa.array(batch["path"], type=pa.string()),
            "prob_dog": pa.array(prob, mask=bad, type=pa.float32()),
            "label": pa.array(label, mask=bad, type=pa.int8()),
            "model": pa.array([self.name] * len(prob), type=pa.string()),
            "error": pa.array([e or None for e in batch["error"]], type=pa.string()),
        }
        if len(members) > 1:
            columns["member_prob_dog"] = member_column(members, bad)
        if self.margins:
            columns["member_margins"] = member_column(margins.flatten(0, 1).numpy(), bad)
        if "truth" in batch:
            columns["truth"] = pa.array(batch["truth"], type=pa.int8(), from_pandas=True)
        if "version" in batch:  # predict: what the image was scored at, for incremental reruns
            columns["size"] = pa.array(batch["size"], type=pa.int64())
            columns["version"] = pa.array(batch["version"], type=pa.string())
        return pa.table(columns)


def measure_scoring_precision(models: list[tuple[torch.nn.Module, int]]) -> dict:
    """Whether bf16 scores faster than fp32 on this CPU: a forward pass of every (model, image
    size) over random images, timed in both.  It depends on the model and the size: on a Xeon
    without AMX, MobileNetV2 scored 1.4x faster in bf16 at 128 px and about 1x at 64 px, ResNet18
    0.7-0.8x at 128 px.  A CPU without bf16 instructions runs autocast in fp32 anyway and is not timed.
    ``amp``: the choice; ``bf16_speedup``: fp32 over bf16 seconds."""
    if not cpu_has_fast_bf16():
        return {"amp": False, "precision": "fp32", "bf16_speedup": None}
    cpu = torch.device("cpu")
    images = {
        size: torch.randn(PRECISION_BATCH, 3, size, size).contiguous(memory_format=torch.channels_last)
        for _, size in models
    }

    @torch.inference_mode()
    def score(_, amp: bool) -> None:
        with autocast(cpu, amp):
            for model, size in models:
                model(images[size])

    speedup = bf16_speedup(score, torch.empty(0))
    amp = speedup >= BF16_MIN_SPEEDUP
    return {"amp": amp, "precision": "bf16" if amp else "fp32", "bf16_speedup": round(speedup, 3)}


def member_column(members: np.ndarray, bad: np.ndarray) -> pa.Array:
    """(values, rows) figures (models' probabilities, or margins per model and view) as one
    list<float32> per row, null where the image did not decode."""
    n_models, n_rows = members.shape
    offsets = pa.array(np.arange(n_rows + 1, dtype=np.int32) * n_models, type=pa.int32())
    values = pa.array(np.ascontiguousarray(members.T).ravel(), type=pa.float32())
    return pa.ListArray.from_arrays(offsets, values, mask=pa.array(bad))


def predictions_dataset(
    cfg: CatdogConfig,
    storage: Storage,
    rows: pa.Table | list[dict],
    models: list[ModelRef],
    tta: bool,
    shards=None,
    margins: bool = False,
):
    """Decode once per file, with each model's own eval preset, then score in an actor pool.
    ``shards``: the shard set the rows were listed from (None: rows name image files); ``margins``:
    see :class:`Predictor`."""
    import ray.data

    presets = {ref.column: ref.preset for ref in models}
    use_gpu = cfg.predict.num_gpus > 0
    rows = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
    rows = rows.set_column(rows.schema.get_field_index("id"), "id", pc.fill_null(rows["id"].cast(pa.int64()), NO_ID))
    decoded = image_dataset(
        storage, rows, presets, batch_size=cfg.data.decode_batch_size, shards=shards, threads=cfg.data.decode_threads
    )
    return decoded.map_batches(
        Predictor,
        fn_constructor_args=(
            storage,
            models,
            cfg.predict.threshold,
            tta,
            use_gpu,
            cfg.predict.torch_threads,
            cfg.predict.amp,
            cfg.predict.measure_amp,
            margins,
            cfg.predict.fold_batchnorm,
        ),
        batch_size=cfg.predict.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.predict.concurrency),
        num_gpus=cfg.predict.num_gpus if use_gpu else None,
        num_cpus=cfg.predict.cpus_per_actor,
    )


def write_parquet_atomically(ds, storage: Storage, uri: str) -> None:
    """Write to a temporary folder beside ``uri``, then move it into place (replacing old outputs).

    ``uri`` is only touched once the whole dataset has been written; see :meth:`Storage.replace_dir`
    for what that guarantees locally (one rename) and on S3 (copy each object, delete stale ones)."""
    tmp = f"{uri.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
    fs, tmp_path = storage.resolve(tmp)
    try:
        ds.write_parquet(tmp_path, filesystem=fs)
        storage.replace_dir(tmp, uri)
    finally:
        storage.delete_dir(tmp)


def read_columns(storage: Storage, uri: str, columns: list[str]):
    """Stream record batches of a few columns from a Parquet folder, file by file; each file is read
    whole through :meth:`Storage.read_bytes`, so a throttled or reset read is retried like any other."""
    for info in sorted(storage.list_files(uri), key=lambda i: i.path):
        if info.path.endswith(".parquet"):
            data = storage.read_bytes(storage.uri_of(uri, info.path))
            yield from pq.read_table(pa.BufferReader(data), columns=columns).to_batches()


def submission_csv(storage: Storage, predictions_uri: str, cfg: CatdogConfig, proba: bool) -> tuple[str, list]:
    """Kaggle ``id,label`` rows sorted by id; unreadable images get ``predict.unreadable_label``."""
    ids, values, paths, failed, no_id = [], [], [], [], []
    for batch in read_columns(storage, predictions_uri, ["id", "prob_dog", "label", "error", "path"]):
        data = batch.to_pydict()
        for id_, prob, label, error, path in zip(
            data["id"], data["prob_dog"], data["label"], data["error"], data["path"]
        ):
            if id_ is None:
                no_id.append(path)
                continue
            if error is not None:
                label = cfg.predict.unreadable_label
                value = min(max(float(label), CLIP[0]), CLIP[1]) if proba else label
            else:
                value = min(max(prob, CLIP[0]), CLIP[1]) if proba else label
            ids.append(id_)
            values.append(value)
            paths.append(path)
            failed.append(error is not None)
    if no_id:
        logger.warning(
            "%d files have no numeric id in their name and are left out of the submission: %s",
            len(no_id),
            ", ".join(basename(p) for p in no_id[:20]),
        )
    order, duplicates = unique_ids_in_order(ids, paths)
    if duplicates:
        logger.warning(
            "%d ids appear in more than one file name; the submission keeps the first path of each: %s",
            len(duplicates),
            ", ".join(map(str, duplicates[:20])),
        )
    lines = ["id,label"] + [f"{ids[i]},{values[i]:.6f}" if proba else f"{ids[i]},{values[i]}" for i in order]
    return "\n".join(lines) + "\n", [ids[i] for i in order if failed[i]]  # as submitted: one per id


def unique_ids_in_order(ids: list[int], paths: list[str]) -> tuple[list[int], list[int]]:
    """Row positions sorted by numeric id, one per id (Kaggle rejects repeats: ``1.jpg`` and
    ``1.png``, or the same name in two folders), the lexically first path winning; and the repeated ids."""
    order = sorted(range(len(ids)), key=lambda i: (ids[i], paths[i]))
    kept, repeated = [], []
    for i in order:
        if kept and ids[kept[-1]] == ids[i]:
            if not repeated or repeated[-1] != ids[i]:
                repeated.append(ids[i])
        else:
            kept.append(i)
    return kept, repeated


def binary_metrics(probs: np.ndarray, predicted: np.ndarray, truth: np.ndarray) -> dict:
    """Accuracy, clipped log loss of p(dog) ``probs`` and the 2×2 confusion matrix (rows = truth,
    cols = ``predicted``) against 0/1 ``truth``."""
    confusion = np.zeros((2, 2), dtype=np.int64)
    np.add.at(confusion, (np.asarray(truth, np.int64), np.asarray(predicted, np.int64)), 1)
    n = int(confusion.sum())
    return {
        "accuracy": float(np.trace(confusion) / n) if n else None,
        "log_loss": clipped_log_loss(probs, truth) if n else None,
        "n_images": n,
        "confusion": confusion.tolist(),
    }


def classification_metrics(storage: Storage, predictions_uri: str) -> dict:
    """:func:`binary_metrics` of a predictions Parquet's readable rows (its stored labels), the
    number of unreadable rows and the models that scored them."""
    probs, labels, truth, n_unreadable, models = [], [], [], 0, set()
    for batch in read_columns(storage, predictions_uri, ["truth", "prob_dog", "label", "error", "model"]):
        models.update(batch.column("model").to_pylist())
        readable = batch.filter(pc.is_null(batch.column("error")))
        n_unreadable += batch.num_rows - readable.num_rows
        probs.append(np.asarray(readable.column("prob_dog"), np.float64))
        labels.append(np.asarray(readable.column("label")))
        truth.append(np.asarray(readable.column("truth")))
    metrics = binary_metrics(*(np.concatenate(c) if c else np.zeros(0) for c in (probs, labels, truth)))
    return {**metrics, "n_unreadable": n_unreadable, "model": "+".join(sorted(models))}


# Rows that evaluation scores: an image, its id (null outside Kaggle test names) and its true label.
EVALUATION_ROWS = pa.schema([("path", pa.string()), ("id", pa.int64()), ("truth", pa.int8())])


def evaluation_rows(labelled: list[dict]) -> pa.Table:
    """``{"path", "label"}`` rows of a split (validation) as :data:`EVALUATION_ROWS`."""
    return pa.table(
        {
            "path": pa.array([r["path"] for r in labelled], pa.string()),
            "id": pa.nulls(len(labelled), pa.int64()),
            "truth": pa.array([r["label"] for r in labelled], pa.int8()),
        },
        schema=EVALUATION_ROWS,
    )
