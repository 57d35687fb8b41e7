"""Batch inference with Ray Data: predict over an image folder, and evaluate on a labelled one.

Pipeline: list files or shard names (driver, names only) → decode with each model's eval preset (CPU tasks) →
``map_batches(Predictor)`` in an actor pool (model loaded once per actor) → Parquet, written
under a temporary name and moved into place.  ``submission.csv`` and ``metrics.json`` are built
from the Parquet columns they need, never from whole rows pulled through the driver.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from catdog import tracking
from catdog.checkpoints import CheckpointError, load_model, read_meta
from catdog.config import CatdogConfig
from catdog.console import job_log
from catdog.data import Split, image_dataset, list_table, load_split
from catdog.images import DataError
from catdog.presets import MEAN, STD, EvalPreset
from catdog.runtime import check_predict_resources, init_ray
from catdog.scoring_plan import PREDICTION_SCHEMA as PREDICTION_SCHEMA  # the schema of predictions/
from catdog.scoring_plan import commit_part, make_plan, promote, score_and_commit, scoring_fingerprint
from catdog.storage import Storage, StorageError, basename, join
from catdog.training import CLIP, autocast, to_model_input

logger = logging.getLogger(__name__)


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

    @property
    def column(self) -> str:
        return f"image_{self.image_size}_{int(self.crop_fraction * 1000)}"

    @property
    def preset(self) -> EvalPreset:
        return EvalPreset(self.image_size, self.crop_fraction)

    @property
    def name(self) -> str:
        return f"{self.arch}:{basename(self.checkpoint)}"


def model_ref(storage: Storage, checkpoint_uri: str) -> ModelRef:
    meta = read_meta(storage, checkpoint_uri)
    return ModelRef(
        checkpoint_uri,
        meta["arch"],
        meta["image_size"],
        meta.get("crop_fraction", 0.875),
        tuple(meta.get("mean", MEAN)),
        tuple(meta.get("std", STD)),
    )


def resolve_models(storage: Storage, cfg: CatdogConfig, model_uri: str | None, ensemble: bool) -> list[ModelRef]:
    """``--model`` may name a ``best.json`` (default: the run's) or a checkpoint folder.
    With ``ensemble`` every checkpoint on the run's leaderboard is used."""
    model_uri = model_uri or join(cfg.run_uri, "best.json")
    if model_uri.endswith(".json"):
        if not storage.exists(model_uri):
            raise CheckpointError(
                f"{model_uri}: not found{storage.why_missing(model_uri)}; train first (make train) or pass --model"
            )
        best = json.loads(storage.read_text(model_uri))
        if ensemble:
            board = join(model_uri.rsplit("/", 1)[0], "leaderboard.csv")
            rows = list(csv.DictReader(io.StringIO(storage.read_text(board))))
            return [model_ref(storage, row["checkpoint"]) for row in rows]
        return [model_ref(storage, best["checkpoint"])]
    if ensemble:
        raise CheckpointError(f"{model_uri}: --ensemble needs a best.json next to a leaderboard.csv")
    return [model_ref(storage, model_uri)]


class Predictor:
    """Ray Data actor: loads its models once, then scores batches under ``inference_mode``."""

    def __init__(
        self,
        storage: Storage,
        models: list[ModelRef],
        threshold: float,
        tta: bool,
        use_gpu: bool,
        torch_threads: int | None = None,
        amp: bool = False,
    ):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.models = [(ref, load_model(storage, ref.checkpoint)[0].to(self.device)) for ref in models]
        self.threshold, self.tta, self.amp = threshold, tta, amp
        self.name = "+".join(ref.name for ref in models) + ("+tta" if tta else "")

    @torch.inference_mode()
    def prob_dog(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        probs = []
        for ref, model in self.models:
            images = torch.from_numpy(np.ascontiguousarray(batch[ref.column]))
            x = to_model_input(images, self.device, mean=ref.mean, std=ref.std)
            with autocast(self.device, self.amp):
                p = torch.softmax(model(x).float(), dim=1)[:, 1]
                if self.tta:
                    p = (p + torch.softmax(model(torch.flip(x, dims=[3])).float(), dim=1)[:, 1]) / 2
            probs.append(p)
        return torch.stack(probs).mean(0).cpu().numpy().astype(np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        bad = np.array([bool(e) for e in batch["error"]], dtype=bool)
        prob = self.prob_dog(batch)
        label = (prob >= self.threshold).astype(np.int8)
        columns = {
            "id": pa.array(batch["id"], type=pa.int64(), from_pandas=True),  # NaN (no id in the name) → null
            "path": pa.array(batch["path"], type=pa.string()),
            "prob_dog": pa.array(prob, mask=bad, type=pa.float32()),
            "label": pa.array(label, mask=bad, type=pa.int8()),
            "model": pa.array([self.name] * len(prob), type=pa.string()),
            "error": pa.array([e or None for e in batch["error"]], type=pa.string()),
        }
        if "truth" in batch:
            columns["truth"] = pa.array(batch["truth"], type=pa.int8(), from_pandas=True)
        if "version" in batch:  # predict: what the image was scored at, for incremental reruns
            columns["size"] = pa.array(batch["size"], type=pa.int64())
            columns["version"] = pa.array(batch["version"], type=pa.string())
        return pa.table(columns)


def predictions_dataset(
    cfg: CatdogConfig, storage: Storage, rows: pa.Table | list[dict], models: list[ModelRef], tta: bool, shards=None
):
    """Decode once per file, with each model's own eval preset, then score in an actor pool.
    ``shards``: the shard set the rows were listed from (None: rows name image files)."""
    import ray.data

    presets = {ref.column: ref.preset for ref in models}
    use_gpu = cfg.predict.num_gpus > 0
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


def refresh_report(cfg: CatdogConfig, storage: Storage, output_uri: str) -> None:
    """Outputs that land in the run folder also refresh its ``report.html`` (unless ``train.report`` is off)."""
    if (
        cfg.train.report
        and output_uri.rstrip("/").startswith(cfg.run_uri.rstrip("/"))
        and storage.exists(join(cfg.run_uri, "leaderboard.csv"))
    ):
        from catdog.report import write_report  # report builds on this module

        logger.info("report: %s", write_report(cfg, storage))


def run_predict(
    cfg: CatdogConfig,
    model_uri: str | None = None,
    input_uri: str | None = None,
    output_uri: str | None = None,
    tta: bool = False,
    ensemble: bool = False,
    proba: bool = False,
    full: bool = False,
) -> str:
    """Score the images under ``input_uri`` (a folder or a shard set) that ``output_uri`` has no
    valid result for (all of them with ``full``), resuming an interrupted run; return the URI of
    ``submission.csv``.  See :mod:`catdog.scoring_plan`."""
    started = time.time()
    tracking.require_mlflow(cfg)
    storage = Storage.from_config(cfg.storage)
    input_uri, output_uri = input_uri or cfg.data.test, output_uri or cfg.run_uri
    models = resolve_models(storage, cfg, model_uri, ensemble)
    listing, shards = list_table(storage, input_uri)
    if not listing.num_rows:
        raise DataError(f"{input_uri}: no .jpg/.jpeg/.png images found")
    storage.check_bucket(output_uri)
    fingerprint = scoring_fingerprint(storage, [m.checkpoint for m in models], tta, cfg.predict.amp)
    plan = make_plan(storage, listing.select(["path", "size", "version", "id"]), output_uri, fingerprint, full)
    scored, scoring = 0, 0.0
    with job_log(storage, output_uri, "predict") as ray_log:
        logger.info(
            "predicting %d of %d images from %s with %s (%d reused, %d resumed, %d removed); "
            "outputs in %s, Ray's log in %s",
            plan.to_score.num_rows,
            listing.num_rows,
            input_uri,
            ", ".join(m.name for m in models),
            plan.reused,
            plan.resumed,
            plan.removed,
            output_uri,
            ray_log.where,
        )
        if plan.to_score.num_rows:
            init_ray(cfg)
            check_predict_resources(cfg)
            ray_log.settle()
            scoring = time.time()
            ds = predictions_dataset(cfg, storage, plan.to_score, models, tta, shards).map_batches(
                commit_part, fn_args=(storage, plan.parts_uri, fingerprint), batch_size=None, batch_format="pyarrow"
            )
            scored = score_and_commit(ds, plan).scored
            scoring = time.time() - scoring
    promote(storage, plan, cfg.predict.threshold)
    submission_uri, n_unreadable = write_submission(cfg, storage, output_uri, plan.predictions_uri, proba)
    print(
        f"predict: scored {scored}, reused {plan.reused + plan.resumed}, removed {plan.removed} "
        f"of {listing.num_rows} images in {time.time() - started:.1f} s",
        flush=True,
    )
    refresh_report(cfg, storage, output_uri)
    tracking.log_job_run(
        cfg,
        "predict",
        throughput(scored, scoring, started) | {"n_unreadable": n_unreadable, "n_reused": plan.reused + plan.resumed},
        {"input": input_uri, "output": output_uri, "models": "+".join(m.name for m in models), "tta": tta},
    )
    return submission_uri


def write_submission(
    cfg: CatdogConfig, storage: Storage, output_uri: str, predictions_uri: str, proba: bool
) -> tuple[str, int]:
    """``submission.csv`` from ``predictions/``; its URI and how many unreadable images it labels."""
    text, unreadable = submission_csv(storage, predictions_uri, cfg, proba)
    if unreadable:
        logger.warning(
            "%d unreadable images were given label %d in the submission: ids %s",
            len(unreadable),
            cfg.predict.unreadable_label,
            ", ".join(map(str, unreadable[:50])),
        )
    submission_uri = join(output_uri, "submission.csv")
    storage.write_text(submission_uri, text)
    logger.info("wrote %s (%d rows) and %s", submission_uri, text.count("\n") - 1, predictions_uri)
    return submission_uri, len(unreadable)


def throughput(n_images: int, scoring_seconds: float, started: float) -> dict:
    return {
        "n_images": n_images,
        "scoring_seconds": round(scoring_seconds, 1),
        "images_per_s": n_images / max(scoring_seconds, 1e-9),
        "wall_seconds": round(time.time() - started, 1),
    }


def classification_metrics(storage: Storage, predictions_uri: str) -> dict:
    """Accuracy, clipped log loss and the 2×2 confusion matrix (rows = truth, cols = predicted)."""
    confusion = np.zeros((2, 2), dtype=np.int64)
    log_loss_sum, n_unreadable, models = 0.0, 0, set()
    for batch in read_columns(storage, predictions_uri, ["truth", "prob_dog", "label", "error", "model"]):
        data = batch.to_pydict()
        models.update(data["model"])
        for truth, prob, label, error in zip(data["truth"], data["prob_dog"], data["label"], data["error"]):
            if error is not None:
                n_unreadable += 1
                continue
            confusion[truth, label] += 1
            p = min(max(prob, CLIP[0]), CLIP[1])
            log_loss_sum -= float(np.log(p if truth == 1 else 1 - p))
    n = int(confusion.sum())
    return {
        "accuracy": float(np.trace(confusion) / n) if n else None,
        "log_loss": log_loss_sum / n if n else None,
        "n_images": n,
        "n_unreadable": n_unreadable,
        "confusion": confusion.tolist(),
        "model": "+".join(sorted(models)),
    }


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


def training_split(storage: Storage, cfg: CatdogConfig, model: ModelRef) -> tuple[Split, str]:
    """The train/val split ``model`` was trained on (the data settings in its checkpoint's
    fingerprint; ``cfg.data`` for checkpoints from before fingerprints), and how to name it."""
    recorded = read_meta(storage, model.checkpoint).get("fingerprint") or {}
    train_uri = recorded.get("data.train", cfg.data.train)
    settings = {key: recorded.get(f"data.{key}", getattr(cfg.data, key)) for key in ("val_fraction", "seed", "limit")}
    split = load_split(storage, train_uri, **settings)
    described = ", ".join(f"{k} {v}" for k, v in settings.items())
    return split, f"validation split of {train_uri} ({described})"


def train_overlap(storage: Storage, cfg: CatdogConfig, model: ModelRef, paths: pa.ChunkedArray) -> int | None:
    """How many of ``paths`` are in ``model``'s training split (None when that cannot be listed).
    The split assigns files by base name, so a copy of a training image counts too."""
    try:
        split, _ = training_split(storage, cfg, model)
    except (DataError, StorageError) as exc:
        logger.warning("cannot check the input against the training split: %s", exc)
        return None
    trained = pa.array([basename(r["path"]) for r in split.train], pa.string())
    names = pc.replace_substring_regex(paths, r"^.*/", "")
    return int(pc.sum(pc.is_in(names, value_set=trained)).as_py() or 0)


def input_rows(storage: Storage, input_uri: str) -> tuple[pa.Table, object, int, list[str]]:
    """The labelled images of a folder or shard set as :data:`EVALUATION_ROWS`, the shard set (or
    None), how many files carry no label, and the first few of them."""
    listing, shards = list_table(storage, input_uri)
    labelled = pc.is_valid(listing["label"])
    unlabeled = listing.filter(pc.invert(labelled))["path"].to_pylist()[:20]
    rows = listing.filter(labelled).select(["path", "id", "label"]).rename_columns(["path", "id", "truth"])
    return rows.cast(EVALUATION_ROWS), shards, listing.num_rows - rows.num_rows, unlabeled


def run_evaluate(
    cfg: CatdogConfig,
    input_uri: str | None = None,
    model_uri: str | None = None,
    output_uri: str | None = None,
    tta: bool = False,
    ensemble: bool = False,
) -> str:
    """Score a labelled folder or shard set, by default the run's validation split (never its
    training images); write ``metrics.json`` and return its URI."""
    started = time.time()
    tracking.require_mlflow(cfg)
    storage = Storage.from_config(cfg.storage)
    output_uri = output_uri or join(cfg.run_uri, "evaluate")
    models = resolve_models(storage, cfg, model_uri, ensemble)
    if input_uri is None:
        split, split_name = training_split(storage, cfg, models[0])
        rows, shards, n_unlabeled, unlabeled = evaluation_rows(split.val), split.shards, 0, []
        scored = {"split": "validation", "input": split_name}
    else:
        rows, shards, n_unlabeled, unlabeled = input_rows(storage, input_uri)
        overlap = train_overlap(storage, cfg, models[0], rows["path"])
        scored = {"split": "input", "input": input_uri, "train_overlap": overlap}
        if overlap:
            logger.warning(
                "%s: %d of its %d labelled images are in the model's training split; the metrics overstate "
                "accuracy on unseen images (evaluate without --input scores the validation split)",
                input_uri,
                overlap,
                rows.num_rows,
            )
    if n_unlabeled:
        logger.warning(
            "%s: skipped %d files whose names carry no label: %s",
            input_uri,
            n_unlabeled,
            ", ".join(basename(p) for p in unlabeled),
        )
    if not rows.num_rows:
        raise DataError(f"{scored['input']}: no labelled images (cat.N.jpg / dog.N.jpg or cat(s)/ dog(s)/ folders)")
    storage.check_bucket(output_uri)
    predictions_uri = join(output_uri, "predictions")
    with job_log(storage, output_uri, "evaluate") as ray_log:
        logger.info(
            "evaluating on %d images from %s; outputs in %s, Ray's log in %s",
            rows.num_rows,
            scored["input"],
            output_uri,
            ray_log.where,
        )
        init_ray(cfg)
        check_predict_resources(cfg)
        ray_log.settle()
        scoring = time.time()
        write_parquet_atomically(predictions_dataset(cfg, storage, rows, models, tta, shards), storage, predictions_uri)
        scoring = time.time() - scoring
    metrics = {**classification_metrics(storage, predictions_uri), **scored}
    metrics_uri = join(output_uri, "metrics.json")
    storage.write_text(metrics_uri, json.dumps(metrics, indent=2) + "\n")
    if not metrics["n_images"]:
        raise DataError(f"{scored['input']}: none of the {metrics['n_unreadable']} labelled images could be read")
    print(
        f"evaluate: accuracy {metrics['accuracy']:.4f} log_loss {metrics['log_loss']:.4f} on "
        f"{metrics['n_images']} images ({metrics['n_unreadable']} unreadable) with {metrics['model']}",
        flush=True,
    )
    refresh_report(cfg, storage, output_uri)
    tracking.log_job_run(
        cfg,
        "evaluate",
        {k: metrics[k] for k in ("accuracy", "log_loss", "n_unreadable")} | throughput(rows.num_rows, scoring, started),
        {"input": scored["input"], "output": output_uri, "models": metrics["model"], "tta": tta},
    )
    return metrics_uri
