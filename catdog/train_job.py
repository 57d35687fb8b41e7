"""The train job on the driver: validate inputs, train each architecture with TorchTrainer,
then write the leaderboard and ``best.json``.

Each architecture is its own Ray Train run at ``<storage.root>/<run_name>/<arch>/``; Train V2
resumes a run whose storage path and name are unchanged, and a ``result.json`` written after a
finished run lets a re-run skip it.

Both only ever reuse models trained with the same settings: every checkpoint and ``result.json``
carries the :func:`run_fingerprint` of its architecture, and a re-run whose settings differ stops
before any work (:func:`check_fingerprints`).  ``epochs`` is deliberately not in it: raising it
continues the run (see ``lr_factor`` in training.py for the schedule), lowering it below what a
finished run did keeps the longer-trained model.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import time

from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from catdog.checkpoints import metrics_csv
from catdog.config import CatdogConfig, ConfigError, ModelSpec
from catdog.data import Split, image_dataset, load_split, split_key
from catdog.models import InitError, check_init
from catdog.presets import EvalPreset, TrainPreset
from catdog.report import validation_study, write_report
from catdog.runtime import check_predict_resources, check_train_resources, init_ray, run_on_worker_nodes
from catdog.storage import Storage, join
from catdog.training import train_loop_per_worker, write_json

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
LEADERBOARD_COLUMNS = (
    "arch",
    "val_acc",
    "val_log_loss",
    "epochs",
    "best_epoch",
    "train_seconds",
    "images_per_s",
    "checkpoint",
)


class ShardConfig(DataConfig):
    """Train shards must be equal (DDP steps in lock-step); validation shards need not be, and
    splitting them unequally means no validation image is dropped."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            for i, shard in enumerate(ds.streaming_split(world_size, equal=(name == "train"))):
                output[i][name] = shard
        return output


class RunMismatch(ConfigError):
    """A re-run whose model-shaping settings differ from what the run folder holds."""


def run_fingerprint(cfg: CatdogConfig, spec: ModelSpec) -> dict:
    """Every setting that shapes ``spec``'s model, resolved (per-architecture overrides applied) and
    keyed by the config key a user changes.  Settings that do not shape a model (``predict.*``,
    ``storage.*``, ``ray.*``, decode batching and threads, ``amp``, ``torch_threads``,
    ``max_failures``, ``keep_checkpoints``) and ``epochs`` are left out."""
    train, data = cfg.train, cfg.data
    init = cfg.init_for(spec)
    return {
        "data.train": absolute(data.train),
        "data.val_fraction": data.val_fraction,
        "data.seed": data.seed,
        "data.limit": data.limit,
        "arch": spec.arch,
        "image_size": cfg.image_size_for(spec),
        "early_image_size": spec.early_image_size,
        "early_epochs": spec.early_epochs,
        "init": init if init in ("scratch", "imagenet") else absolute(init),
        "train.optimizer": train.optimizer,
        "train.lr": spec.lr or train.lr,
        "train.weight_decay": train.weight_decay,
        "train.momentum": train.momentum,
        "train.warmup_fraction": train.warmup_fraction,
        "train.label_smoothing": train.label_smoothing,
        "train.crop_scale_min": train.crop_scale_min,
        "train.batch_size": spec.batch_size or train.batch_size,
        "train.num_workers": train.num_workers,
        "train.freeze_backbone_epochs": train.freeze_backbone_epochs,
        "train.backbone_lr_mult": train.backbone_lr_mult,
    }


def absolute(uri: str) -> str:
    """A local path made absolute (the same folder named from another directory is the same data)."""
    return uri if "://" in uri else os.path.abspath(uri)


def recorded_fingerprint(storage: Storage, arch_uri: str) -> dict | None:
    """The fingerprint a previous run left for this architecture: its ``result.json``, else its
    newest checkpoint's ``meta.json`` (an unfinished run); None when there is nothing to reuse."""
    done = read_result(storage, arch_uri)
    if done is not None:
        return done.get("fingerprint", {})
    if not storage.is_dir(arch_uri):
        return None
    metas = sorted(
        info.path for info in storage.list_files(arch_uri) if re.search(r"/epoch_\d+/meta\.json$", info.path)
    )
    if not metas:
        return None
    return json.loads(storage.read_text(storage.uri_of(arch_uri, metas[-1]))).get("fingerprint", {})


def check_fingerprints(cfg: CatdogConfig, storage: Storage) -> None:
    """Stop (one line, before any work) when a re-run under the same ``run_name`` would reuse or
    resume models trained with other settings; name each changed key with its old and new value."""
    changes = []
    for spec in cfg.models:
        old = recorded_fingerprint(storage, join(cfg.run_uri, spec.arch))
        if old is None:
            continue
        if not old:
            logger.warning("%s: the previous run recorded no settings fingerprint; reusing it unchecked", spec.arch)
            continue
        new = run_fingerprint(cfg, spec)
        changes += [
            f"{spec.arch}: {key} {old.get(key)!r} -> {value!r}" for key, value in new.items() if old.get(key) != value
        ]
    if changes:
        raise RunMismatch(
            f"{cfg.run_uri}: settings differ from the models already trained in this run ({'; '.join(changes)}); "
            "use --restart to move the old run aside, or a new run_name"
        )


def loop_config(cfg: CatdogConfig, spec: ModelSpec, storage: Storage, n_train: int) -> dict:
    """The plain dict each Train worker gets: everything resolved, nothing left to look up."""
    train = cfg.train
    init = cfg.init_for(spec)
    return {
        **train.model_dump(),
        "arch": spec.arch,
        "init": init,
        "fine_tune": init != "scratch",
        "epochs": spec.epochs or train.epochs,
        "batch_size": spec.batch_size or train.batch_size,
        "lr": spec.lr or train.lr,
        "image_size": cfg.image_size_for(spec),
        "early_image_size": spec.early_image_size,
        "early_epochs": spec.early_epochs,
        "n_train": n_train,
        "storage": storage,
        "arch_uri": join(cfg.run_uri, spec.arch),
        "config_hash": cfg.hash(),
        "fingerprint": run_fingerprint(cfg, spec),
        "run_name": cfg.run_name,
    }


def read_result(storage: Storage, arch_uri: str) -> dict | None:
    uri = join(arch_uri, RESULT_FILE)
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


def train_architecture(cfg: CatdogConfig, spec: ModelSpec, split: Split, storage: Storage) -> dict:
    """Train (or resume, or skip) one architecture; return its leaderboard row."""
    loop_cfg = loop_config(cfg, spec, storage, len(split.train))
    done = read_result(storage, loop_cfg["arch_uri"])
    if done and done["epochs"] >= loop_cfg["epochs"]:
        logger.info(
            "%s: already trained for %d epochs, skipping (see %s)",
            spec.arch,
            done["epochs"],
            join(loop_cfg["arch_uri"], RESULT_FILE),
        )
        return done
    size = loop_cfg["image_size"]
    augment = TrainPreset(size, scale=(cfg.train.crop_scale_min, 1.0))
    rows = sorted(split.train, key=lambda r: split_key(r["path"], cfg.data.seed + 1))  # mix the classes
    reader = {"batch_size": cfg.data.decode_batch_size, "shards": split.shards, "threads": cfg.data.decode_threads}
    datasets = {
        "train": image_dataset(storage, rows, augment, **reader).randomize_block_order(),
        "val": image_dataset(storage, split.val, EvalPreset(size), **reader),
    }
    fs, root = storage.resolve(cfg.run_uri)
    resources = {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=spec.arch,
            storage_path=root,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute="val_acc",
                checkpoint_score_order="max",
            ),
        ),
        datasets=datasets,
        dataset_config=ShardConfig(),
    )
    logger.info(
        "%s: training %d epochs at %d px on %d train / %d val images with %d worker(s)",
        spec.arch,
        loop_cfg["epochs"],
        size,
        len(split.train),
        len(split.val),
        cfg.train.num_workers,
    )
    result = trainer.fit()
    return record_result(storage, loop_cfg, result)


def record_result(storage: Storage, loop_cfg: dict, result) -> dict:
    """Write ``metrics.csv`` from the final checkpoint's history and ``result.json`` for this arch."""
    best_checkpoint, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1]["val_acc"])
    # Through Storage (retried reads), not a download of the whole checkpoint.
    final_uri = storage.uri_of(loop_cfg["arch_uri"], result.checkpoint.path)
    history = json.loads(storage.read_text(join(final_uri, "meta.json")))["history"]
    storage.write_text(join(loop_cfg["arch_uri"], "metrics.csv"), metrics_csv(history))
    row = {
        "arch": loop_cfg["arch"],
        "val_acc": best_metrics["val_acc"],
        "val_log_loss": best_metrics["val_log_loss"],
        "epochs": len(history),
        "best_epoch": best_metrics["epoch"],
        "train_seconds": round(sum(h["train_seconds"] for h in history), 1),
        "images_per_s": round(sum(h["images_per_s"] for h in history) / len(history), 1),
        "checkpoint": storage.uri_of(loop_cfg["arch_uri"], best_checkpoint.path),
        "image_size": loop_cfg["image_size"],
        "fingerprint": loop_cfg["fingerprint"],
    }
    write_json(storage, join(loop_cfg["arch_uri"], RESULT_FILE), row)
    return row


def leaderboard_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=LEADERBOARD_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def rank_results(rows: list[dict]) -> list[dict]:
    """Best first: higher validation accuracy, then lower validation log loss."""
    return sorted(rows, key=lambda r: (-r["val_acc"], r["val_log_loss"]))


def init_problems(pairs: list[tuple[str, str]], storage: Storage) -> list[str]:
    """On one node: what ``check_init`` says for each (arch, init) that cannot be had there."""
    problems = []
    for arch, init in pairs:
        try:
            check_init(arch, init, storage)
        except InitError as exc:
            problems.append(str(exc))
    return problems


def check_init_on_worker_nodes(cfg: CatdogConfig, storage: Storage) -> None:
    """The driver's ``check_init`` proves nothing for the other nodes: an air-gapped GPU node
    without the ImageNet cache, or a local path that only the head has, would make every worker
    fail at start and use up ``train.max_failures`` first.  Ask each node before ``fit()``."""
    pairs = sorted({(spec.arch, cfg.init_for(spec)) for spec in cfg.models if cfg.init_for(spec) != "scratch"})
    if not pairs:
        return
    answers = run_on_worker_nodes(
        init_problems, pairs, storage, cpus=cfg.train.cpus_per_worker, gpus=1 if cfg.train.use_gpu else 0
    )
    failed = sorted((node, problems) for node, problems in answers.items() if problems)
    if failed:
        node, problems = failed[0]
        raise InitError(
            f"{problems[0]} [on node {node}: {len(failed)} of {len(answers)} nodes that can run a Train worker "
            "lack the init weights]"
        )


def prepare_run(cfg: CatdogConfig, storage: Storage, restart: bool) -> None:
    """``--restart`` moves a previous run aside instead of deleting it (on S3: copy, then delete)."""
    if restart and storage.exists(cfg.run_uri):
        aside = f"{cfg.run_uri}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        storage.move_dir(cfg.run_uri, aside)
        logger.warning("--restart: moved the previous run to %s", aside)
    storage.makedirs(cfg.run_uri)
    storage.write_text(join(cfg.run_uri, "config.yaml"), cfg.to_yaml())


def run_training(cfg: CatdogConfig, restart: bool = False) -> str:
    """Train every architecture in ``cfg.models``; return the URI of ``best.json``."""
    storage = Storage.from_config(cfg.storage)
    split = load_split(storage, cfg.data.train, cfg.data.val_fraction, cfg.data.seed, cfg.data.limit)
    for spec in cfg.models:
        check_init(spec.arch, cfg.init_for(spec), storage)
    storage.check_bucket(cfg.run_uri)  # a missing bucket / wrong endpoint fails before Ray starts
    if not restart:
        check_fingerprints(cfg, storage)
    init_ray(cfg)
    check_train_resources(cfg)
    check_predict_resources(cfg)  # the validation study after training starts the predict actors
    check_init_on_worker_nodes(cfg, storage)
    prepare_run(cfg, storage, restart)
    logger.info(
        "run %s: %d train and %d val images (%s), models: %s",
        cfg.run_uri,
        len(split.train),
        len(split.val),
        split.class_counts(split.train),
        ", ".join(s.arch for s in cfg.models),
    )
    rows = rank_results([train_architecture(cfg, spec, split, storage) for spec in cfg.models])
    storage.write_text(join(cfg.run_uri, "leaderboard.csv"), leaderboard_csv(rows))
    best_uri = join(cfg.run_uri, "best.json")
    write_json(
        storage,
        best_uri,
        {
            **rows[0],
            "metrics": {k: rows[0][k] for k in ("val_acc", "val_log_loss")},
            "config": cfg.model_dump(mode="json"),
        },
    )
    if cfg.train.report:
        validation_study(cfg, storage, split.val, split.shards)
        logger.info("report: %s", write_report(cfg, storage))
    for row in rows:
        logger.info(
            "leaderboard: %-14s val_acc %.4f val_log_loss %.4f (%s)",
            row["arch"],
            row["val_acc"],
            row["val_log_loss"],
            row["checkpoint"],
        )
    return best_uri
