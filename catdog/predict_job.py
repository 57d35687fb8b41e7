"""The predict and evaluate jobs: resolve the models, list the input, score it with the pipeline
of :mod:`catdog.inference`, write ``submission.csv`` or ``metrics.json``, refresh the run's report
and log the run.

The pipeline pieces live in :mod:`catdog.inference`, and :mod:`catdog.report` scores the validation
study with them; the jobs sit above both, so a job can refresh the report without the pipeline
depending on the report.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time

import pyarrow as pa
import pyarrow.compute as pc

from catdog import tracking
from catdog.checkpoints import CheckpointError, read_meta
from catdog.config import CatdogConfig
from catdog.console import job_log
from catdog.data import Split, list_table, load_split
from catdog.images import DataError
from catdog.inference import (
    EVALUATION_ROWS,
    ModelRef,
    classification_metrics,
    evaluation_rows,
    model_ref,
    predictions_dataset,
    submission_csv,
    write_parquet_atomically,
)
from catdog.report import VAL_STUDY, write_report
from catdog.runtime import check_predict_resources, init_ray
from catdog.scoring_plan import commit_part, make_plan, promote, score_and_commit, scoring_fingerprint
from catdog.storage import Storage, StorageError, basename, join

logger = logging.getLogger(__name__)


def resolve_models(
    storage: Storage, cfg: CatdogConfig, model_uri: str | None, ensemble: bool, tta: bool, calibrate: bool = True
) -> list[ModelRef]:
    """``--model`` may name a ``best.json`` (default: the run's) or a checkpoint folder.
    With ``ensemble``, the leaderboard's checkpoints that the validation study gave a weight
    (``val_study.json`` beside ``best.json``), with those weights.  Each at the test-time size the
    study picked, with the temperature it fitted for ``tta`` (:func:`~catdog.inference.model_ref`);
    ``calibrate`` false: temperature 1.0."""
    model_uri = model_uri or join(cfg.run_uri, "best.json")
    if model_uri.endswith(".json"):
        if not storage.exists(model_uri):
            raise CheckpointError(
                f"{model_uri}: not found{storage.why_missing(model_uri)}; train first (make train) or pass --model"
            )
        best = json.loads(storage.read_text(model_uri))
        if ensemble:
            weights = ensemble_weights(storage, model_uri.rsplit("/", 1)[0])
            return [model_ref(storage, uri, calibrate, weight, tta) for uri, weight in weights.items() if weight > 0]
        return [model_ref(storage, best["checkpoint"], calibrate, tta=tta)]
    if ensemble:
        raise CheckpointError(f"{model_uri}: --ensemble needs a best.json next to a leaderboard.csv")
    return [model_ref(storage, model_uri, calibrate, tta=tta)]


def ensemble_weights(storage: Storage, run_uri: str) -> dict[str, float]:
    """Checkpoint → weight for every model on the run's leaderboard, as the validation study fitted
    them; one leaderboard model needs none.  Stops (one line) when they are missing or were fitted
    for other checkpoints than the leaderboard's."""
    rows = csv.DictReader(io.StringIO(storage.read_text(join(run_uri, "leaderboard.csv"))))
    board = [row["checkpoint"] for row in rows]
    if len(board) == 1:
        return {board[0]: 1.0}
    study_uri = join(run_uri, VAL_STUDY)
    study = json.loads(storage.read_text(study_uri)) if storage.exists(study_uri) else {}
    weights = study.get("ensemble", {}).get("weights")
    if weights is None or set(weights) != set(board):
        found = "has none" if weights is None else "has them for other checkpoints than leaderboard.csv"
        raise CheckpointError(
            f"{study_uri}: --ensemble needs weights fitted on validation and {basename(study_uri)} {found}; "
            "run the same train command again with --set train.report=true (it reuses the trained models "
            "and only runs the validation study)"
        )
    return {uri: float(weights[uri]) for uri in board}


def refresh_report(cfg: CatdogConfig, storage: Storage, output_uri: str) -> None:
    """Outputs that land in the run folder also refresh its ``report.html`` (unless ``train.report`` is off)."""
    if (
        cfg.train.report
        and output_uri.rstrip("/").startswith(cfg.run_uri.rstrip("/"))
        and storage.exists(join(cfg.run_uri, "leaderboard.csv"))
    ):
        logger.info("report: %s", write_report(cfg, storage))


def run_predict(
    cfg: CatdogConfig,
    model_uri: str | None = None,
    input_uri: str | None = None,
    output_uri: str | None = None,
    tta: bool | None = None,
    ensemble: bool = False,
    proba: bool = False,
    full: bool = False,
    calibrate: bool = True,
) -> str:
    """Score the images under ``input_uri`` (a folder or a shard set) that ``output_uri`` has no
    valid result for (all of them with ``full``), resuming an interrupted run; return the URI of
    ``submission.csv``.  ``tta`` unset follows ``predict.tta``.  See :mod:`catdog.scoring_plan`."""
    started = time.time()
    tta = cfg.predict.tta if tta is None else tta
    tracking.require_mlflow(cfg)
    storage = Storage.from_config(cfg.storage)
    input_uri, output_uri = input_uri or cfg.data.test, output_uri or cfg.run_uri
    models = resolve_models(storage, cfg, model_uri, ensemble, tta, calibrate)
    listing, shards = list_table(storage, input_uri)
    if not listing.num_rows:
        raise DataError(f"{input_uri}: no .jpg/.jpeg/.png images found")
    storage.check_bucket(output_uri)
    total = sum(m.weight for m in models)
    scales = [(m.temperature, m.weight / total) for m in models]
    fingerprint = scoring_fingerprint(storage, [m.checkpoint for m in models], tta, cfg.predict.amp, scales)
    plan = make_plan(storage, listing.select(["path", "size", "version", "id"]), output_uri, fingerprint, full)
    scored, scoring = 0, 0.0
    with job_log(storage, output_uri, "predict") as ray_log:
        logger.info(
            "predicting %d of %d images from %s with %s (%d reused, %d resumed, %d removed); "
            "outputs in %s, Ray's log in %s",
            plan.to_score.num_rows,
            listing.num_rows,
            input_uri,
            described(models),
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
        {"input": input_uri, "output": output_uri, "models": described(models), "tta": tta, "calibrate": calibrate},
    )
    return submission_uri


def described(models: list[ModelRef]) -> str:
    """The models with their test-time size, temperature and (ensembles) weight, for logs and MLflow params."""
    total = sum(m.weight for m in models)
    weight = (lambda m: f" w{m.weight / total:.3f}") if len(models) > 1 else (lambda m: "")
    return ", ".join(f"{m.name} {m.image_size}px T{m.temperature:.3f}{weight(m)}" for m in models)


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
    tta: bool | None = None,
    ensemble: bool = False,
    calibrate: bool = True,
) -> str:
    """Score a labelled folder or shard set, by default the run's validation split (never its
    training images); write ``metrics.json`` and return its URI.  ``tta`` unset follows ``predict.tta``."""
    started = time.time()
    tta = cfg.predict.tta if tta is None else tta
    tracking.require_mlflow(cfg)
    storage = Storage.from_config(cfg.storage)
    output_uri = output_uri or join(cfg.run_uri, "evaluate")
    models = resolve_models(storage, cfg, model_uri, ensemble, tta, calibrate)
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
        {
            "input": scored["input"],
            "output": output_uri,
            "models": described(models),
            "tta": tta,
            "calibrate": calibrate,
        },
    )
    return metrics_uri
