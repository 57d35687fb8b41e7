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
import hashlib
import io
import json
import logging
import os
import re
import sys
import time

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from catdog import budget, tracking
from catdog.checkpoints import metrics_csv
from catdog.config import CatdogConfig, ConfigError, ModelSpec
from catdog.console import duration, job_log, verbose
from catdog.data import Split, image_dataset, load_split, split_key
from catdog.models import InitError, check_init
from catdog.presets import EvalPreset, TrainPreset
from catdog.report import PLAN_FILE, RUN_SUMMARY_FILE, validation_study, write_report
from catdog.runtime import check_predict_resources, check_train_resources, cpu_model, init_ray, run_on_worker_nodes
from catdog.storage import Storage, join
from catdog.training import measure_speeds, train_loop_per_worker, validation_rank, write_json
from catdog.worker_split import ShardConfig

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
LEADERBOARD_COLUMNS = (
    "arch",
    "val_acc",
    "val_log_loss",
    "val_log_loss_calibrated",
    "temperature",
    "weights",
    "epochs",
    "best_epoch",
    "image_sizes",
    "minutes",
    "budget_minutes",
    "train_seconds",
    "images_per_s",
    "checkpoint",
)


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
        "train.time_budget_minutes": train.time_budget_minutes,
        "budget_share": spec.budget_share,
        "early_fraction": spec.early_fraction,
        "init": init if init in ("scratch", "imagenet") else absolute(init),
        "train.optimizer": train.optimizer,
        "train.lr": spec.lr or train.lr,
        "train.weight_decay": train.weight_decay,
        "train.momentum": train.momentum,
        "train.warmup_fraction": train.warmup_fraction,
        "train.label_smoothing": train.label_smoothing,
        "train.ema_decay": train.ema_decay,
        "train.crop_scale_min": train.crop_scale_min,
        "train.batch_size": spec.batch_size or train.batch_size,
        "train.num_workers": train.num_workers,
        "train.freeze_backbone_epochs": train.freeze_backbone_epochs,
        "train.backbone_lr_mult": train.backbone_lr_mult,
    }


def fingerprint_digest(fingerprint: dict) -> str:
    """A short, stable name for a fingerprint (MLflow tags)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]


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
        "amp": train.amp if spec.amp is None else spec.amp,
        "measure_amp": train.measure_amp,
        "n_train": n_train,
        "storage": storage,
        "arch_uri": join(cfg.run_uri, spec.arch),
        "config_hash": cfg.hash(),
        "fingerprint": run_fingerprint(cfg, spec),
        "run_name": cfg.run_name,
        # A live bar per epoch only where a person watches a terminal (no redraws in pipes and logs).
        "progress_bar": sys.stdout.isatty() and not verbose(),
    }


def arch_params(cfg: CatdogConfig, loop_cfg: dict) -> dict:
    """The resolved config of one architecture, for MLflow: every section, with ``models``
    replaced by this architecture's settings as trained."""
    keys = ("arch", "init", "epochs", "batch_size", "lr", "image_size", "early_image_size", "early_epochs", "amp")
    return {
        **{k: v for k, v in cfg.model_dump(mode="json").items() if k != "models"},
        "model": {k: loop_cfg[k] for k in keys},
    }


def read_result(storage: Storage, arch_uri: str) -> dict | None:
    uri = join(arch_uri, RESULT_FILE)
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


def train_architecture(
    cfg: CatdogConfig,
    spec: ModelSpec,
    split: Split,
    storage: Storage,
    run_clock: dict,
    tracker=None,
    run_budget: RunBudget | None = None,
) -> dict:
    """Train (or resume, or skip) one architecture; return its leaderboard row.  Under a time
    budget, a finished architecture is always skipped: its plan was its epoch count."""
    loop_cfg = loop_config(cfg, spec, storage, len(split.train))
    done = read_result(storage, loop_cfg["arch_uri"])
    if done and (run_budget is not None or done["epochs"] >= loop_cfg["epochs"]):
        logger.info(
            "%s: already trained for %d epochs, skipping (see %s)",
            spec.arch,
            done["epochs"],
            join(loop_cfg["arch_uri"], RESULT_FILE),
        )
        return done
    loop_cfg["run_clock"] = {**run_clock, "arch_started": time.time()}
    if run_budget is not None:
        loop_cfg.update(run_budget.start(cfg.models.index(spec)))
    if tracker is not None:
        loop_cfg["mlflow"] = tracker.arch_run(
            spec.arch, arch_params(cfg, loop_cfg), fingerprint_digest(loop_cfg["fingerprint"])
        )
    size = loop_cfg["image_size"]
    datasets = train_datasets(cfg, split, storage, size)
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
        "%s: training %d epochs at %s px on %d train / %d val images with %d worker(s)%s%s",
        spec.arch,
        loop_cfg["epochs"],
        image_sizes_text((spec.early_image_size or size, size), loop_cfg["early_epochs"]),
        len(split.train),
        len(split.val),
        cfg.train.num_workers,
        f", resuming after epoch {done['epochs']}" if done else "",
        f", {loop_cfg['budget']['allotted_seconds']:.0f} s of the time budget allotted" if run_budget else "",
    )
    result = trainer.fit()
    row = record_result(storage, loop_cfg, result)
    if run_budget is not None:
        run_budget.finished(spec.arch, row, time.time() - loop_cfg["run_clock"]["arch_started"])
    logger.info(
        "%s: done in %s: best val_acc %.4f, val_log_loss %.4f (epoch %d)",
        spec.arch,
        duration(time.time() - loop_cfg["run_clock"]["arch_started"]),
        row["val_acc"],
        row["val_log_loss"],
        row["best_epoch"],
    )
    if tracker is not None:
        tracker.arch_done(spec.arch, loop_cfg["arch_uri"], row["checkpoint"])
    return row


def record_result(storage: Storage, loop_cfg: dict, result) -> dict:
    """Write ``metrics.csv`` from the final checkpoint's history and ``result.json`` for this arch:
    its best checkpoint, and the budget it got (epochs, image sizes, minutes)."""
    best_checkpoint, best_metrics = best_reported(result.best_checkpoints)
    # Through Storage (retried reads), not a download of the whole checkpoint.
    final_uri = storage.uri_of(loop_cfg["arch_uri"], result.checkpoint.path)
    history = json.loads(storage.read_text(join(final_uri, "meta.json")))["history"]
    storage.write_text(join(loop_cfg["arch_uri"], "metrics.csv"), metrics_csv(history))
    row = {
        "arch": loop_cfg["arch"],
        "val_acc": best_metrics["val_acc"],
        "val_log_loss": best_metrics["val_log_loss"],
        # What predict applies by default, and which weights the checkpoint holds (train.ema_decay).
        "val_log_loss_calibrated": best_metrics.get("val_log_loss_calibrated"),
        "temperature": best_metrics.get("temperature"),
        "weights": best_metrics.get("weights", "raw"),
        "epochs": len(history),
        "best_epoch": best_metrics["epoch"],
        "image_sizes": ">".join(str(size) for size in dict.fromkeys(h["train_image_size"] for h in history)),
        "minutes": round((time.time() - loop_cfg["run_clock"]["arch_started"]) / 60, 2),
        "budget_minutes": budget.minutes(loop_cfg["budget"]["allotted_seconds"]) if loop_cfg.get("budget") else None,
        "train_seconds": round(sum(h["train_seconds"] for h in history), 1),
        "epoch_seconds": round(sum(h.get("epoch_seconds", 0.0) for h in history), 1),
        "images_per_s": round(sum(h["images_per_s"] for h in history) / len(history), 1),
        "checkpoint": storage.uri_of(loop_cfg["arch_uri"], best_checkpoint.path),
        "image_size": loop_cfg["image_size"],
        "fingerprint": loop_cfg["fingerprint"],
    }
    write_json(storage, join(loop_cfg["arch_uri"], RESULT_FILE), row)
    return row


def best_reported(checkpoints: list[tuple]) -> tuple:
    """The best of the (checkpoint, metrics) pairs Ray kept: higher ``val_acc``, then lower
    ``val_log_loss``, then the later epoch.  Ray ranks them by ``val_acc`` alone, and a tie went to
    the earlier epoch: ResNet18's epochs 12 and 14 both scored 0.9353 on a Xeon with AMX, epoch 14
    with 0.1626 log loss against 0.1700, and epoch 12 was the one used (bench/NOTES.md)."""
    return max(checkpoints, key=lambda pair: (*validation_rank(pair[1]), pair[1]["epoch"]))


def leaderboard_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=LEADERBOARD_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def rank_results(rows: list[dict]) -> list[dict]:
    """Best first: higher validation accuracy, then lower validation log loss."""
    return sorted(rows, key=validation_rank, reverse=True)


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


def train_sizes(cfg: CatdogConfig, spec: ModelSpec) -> tuple[int, int]:
    """(early, final) training image sizes; both the final size without progressive resizing."""
    size = cfg.image_size_for(spec)
    return (spec.early_image_size or size, size)


def size_rungs(cfg: CatdogConfig, spec: ModelSpec) -> list[tuple[int, int]]:
    """The (early, final) sizes a time budget may train ``spec`` at, largest first: its own, then
    each of ``smaller_sizes``."""
    return [train_sizes(cfg, spec), *((sizes[0], sizes[-1]) for sizes in spec.smaller_sizes)]


def at_sizes(spec: ModelSpec, sizes: tuple[int, int]) -> ModelSpec:
    """``spec`` trained at (early, final) ``sizes``, with no smaller sizes left to choose from."""
    early = sizes[0] if spec.early_image_size else None
    return spec.model_copy(
        update={"image_size": sizes[1], "early_image_size": early, "smaller_sizes": [], "min_epochs": None}
    )


def with_recorded_sizes(cfg: CatdogConfig, storage: Storage) -> CatdogConfig:
    """A rerun keeps the sizes its run's plan chose (``plan.json``) instead of choosing again: the
    models it reuses or resumes were trained at them."""
    plan_uri = join(cfg.run_uri, PLAN_FILE)
    if not any(spec.smaller_sizes for spec in cfg.models) or not storage.exists(plan_uri):
        return cfg
    recorded = json.loads(storage.read_text(plan_uri)).get("archs", {})
    models = []
    for spec in cfg.models:
        planned = recorded.get(spec.arch, {})
        sizes = (planned.get("early_image_size") or planned.get("image_size"), planned.get("image_size"))
        models.append(at_sizes(spec, sizes) if spec.smaller_sizes and sizes in size_rungs(cfg, spec) else spec)
    return cfg.model_copy(update={"models": models})


def measure_speeds_on_a_worker(cfg: CatdogConfig) -> dict[str, dict]:
    """Each architecture's seconds per image at each size it trains at, measured in one Ray task
    holding what a Train worker holds (its CPUs, its GPU), so the figures are a worker's."""
    import ray

    jobs = []
    for spec in cfg.models:
        loop = {
            "batch_size": spec.batch_size or cfg.train.batch_size,
            "amp": cfg.train.amp if spec.amp is None else spec.amp,
            "torch_threads": cfg.train.torch_threads,
            "use_gpu": cfg.train.use_gpu,
        }
        sizes = sorted({size for rung in size_rungs(cfg, spec) for size in rung})
        jobs.append((spec.arch, sizes, cfg.image_size_for(spec), loop))
    task = ray.remote(measure_speeds).options(
        num_cpus=cfg.train.cpus_per_worker, num_gpus=1 if cfg.train.use_gpu else 0, max_retries=1
    )
    return ray.get(task.remote(jobs))


def size_rung_seconds(cfg: CatdogConfig, spec: ModelSpec, speed: dict, n_train: int, n_val: int) -> list[dict]:
    """Each of ``spec``'s size rungs with its predicted epoch seconds by training size.  Validation was
    timed at the model's own size; a smaller rung's is scaled by its pixels (the first epoch's real
    pace corrects it)."""
    size = cfg.image_size_for(spec)
    rungs = []
    for sizes in size_rungs(cfg, spec):
        rung_speed = {**speed, "val": speed["val"] * (sizes[1] / size) ** 2}
        epoch_s = {s: budget.epoch_seconds(rung_speed, s, n_train, n_val) for s in sorted(set(sizes))}
        rungs.append({"sizes": sizes, "epoch_s": epoch_s})
    return rungs


class RunBudget:
    """The driver's side of ``train.time_budget_minutes``: the plan made from measured speeds,
    re-planned as each architecture starts from the time really left, and what each part took.
    Everything lands in ``plan.json``; the Train workers re-plan from their own pace (budget.py)."""

    def __init__(self, cfg: CatdogConfig, split: Split, started: float):
        measure_start = time.time()
        speeds = measure_speeds_on_a_worker(cfg)
        world = cfg.train.num_workers
        n_train, n_val = -(-len(split.train) // world), -(-len(split.val) // world)
        n_val *= 2 if cfg.train.ema_decay else 1  # with an EMA, every epoch scores the validation images twice
        self.deadline = started + cfg.train.time_budget_minutes * 60
        self.arch_fixed = budget.ARCH_FIXED_S
        candidates = [
            {
                "arch": spec.arch,
                "share": share,
                "early_fraction": spec.early_fraction or 0.0,
                "amp": speeds[spec.arch]["amp"],
                "min_epochs": spec.min_epochs or 1,
                **rungs[0],
                "rungs": rungs,
            }
            for spec, share in zip(cfg.models, budget.shares([spec.budget_share for spec in cfg.models]))
            for rungs in [size_rung_seconds(cfg, spec, speeds[spec.arch], n_train, n_val)]
        ]
        study = (
            budget.study_seconds(
                [speeds[s.arch]["val"] for s in cfg.models], len(split.val), cfg.train.test_size_factors
            )
            if cfg.train.report
            else 0
        )
        self.reserve = study + budget.ARCH_TAIL_S
        self.archs = budget.choose_sizes(candidates, self.training_left(), self.arch_fixed)
        first = budget.plan_run(self.archs, self.training_left(), self.arch_fixed)
        # The whole run as planned, from the job's start: over the budget only when even the least
        # plan (one epoch at the final size each) does not fit.
        run_s = time.time() - started + sum(plan["predicted_s"] for plan in first) + self.reserve
        self.record = {
            "budget_minutes": cfg.train.time_budget_minutes,
            "predicted_minutes": budget.minutes(run_s),
            "measure_seconds": round(time.time() - measure_start, 1),
            "seconds_per_image": speeds,
            "study": {"predicted_minutes": budget.minutes(study)},
            "archs": {
                a["arch"]: {
                    "share": round(a["share"], 4),
                    "image_sizes": image_sizes_text(a["sizes"], plan["early_epochs"]),
                    # The sizes chosen (models.*.smaller_sizes): what a rerun of this run trains at.
                    "image_size": a["sizes"][1],
                    "early_image_size": a["sizes"][0] if a["sizes"][0] != a["sizes"][1] else None,
                    "precision": precision_text(speeds[a["arch"]]),
                    "planned_epochs": plan["epochs"],
                    "planned_early_epochs": plan["early_epochs"],
                    "predicted_minutes": budget.minutes(plan["predicted_s"]),
                }
                for a, plan in zip(self.archs, first)
            },
        }

    def sized(self, cfg: CatdogConfig) -> CatdogConfig:
        """``cfg`` with every model at the sizes this plan chose: what the run trains, validates,
        checkpoints and writes to ``config.yaml``."""
        models = [at_sizes(spec, a["sizes"]) if spec.smaller_sizes else spec for spec, a in zip(cfg.models, self.archs)]
        return cfg.model_copy(update={"models": models})

    def training_left(self) -> float:
        return self.deadline - time.time() - self.reserve

    def start(self, index: int) -> dict:
        """Loop-config entries for architecture ``index``, planned from the time left now."""
        arch = self.archs[index]
        seconds = budget.arch_seconds(self.training_left(), self.archs[index + 1 :], arch["share"], self.arch_fixed)
        plan = budget.arch_plan(arch, seconds, self.arch_fixed)
        self.record["archs"][arch["arch"]].update(
            allotted_minutes=budget.minutes(seconds), predicted_minutes=budget.minutes(plan["predicted_s"])
        )
        deadline = time.time() + seconds - budget.ARCH_TAIL_S
        return {
            "epochs": plan["epochs"],
            "early_epochs": plan["early_epochs"],
            "amp": arch["amp"],  # the precision measured faster on this machine
            "budget": {
                "deadline": deadline,
                "allotted_seconds": seconds,  # plan.json's allotted_minutes, and the leaderboard's budget_minutes
                "epoch_seconds": arch["epoch_s"],  # re-planned from the real pace, epoch by epoch
                "predicted_epoch_seconds": arch["epoch_s"],  # what each re-plan paces
                "early_fraction": arch["early_fraction"],
            },
        }

    def seconds_after(self, index: int) -> float:
        """Predicted seconds of the run after architecture ``index``: the later ones' plans and the study."""
        later = self.archs[index + 1 :]
        return sum(self.record["archs"][a["arch"]]["predicted_minutes"] * 60 for a in later) + self.reserve

    def finished(self, arch: str, row: dict, seconds: float) -> None:
        """Record what the architecture took; its fixed cost (all but its epochs) replaces the prior."""
        self.record["archs"][arch].update(
            epochs=row["epochs"], image_sizes=row["image_sizes"], actual_minutes=budget.minutes(seconds)
        )
        if row.get("epoch_seconds"):
            self.arch_fixed = max(0.0, seconds - row["epoch_seconds"])

    def summary(self, study_seconds: float | None, total_seconds: float) -> dict:
        if study_seconds is not None:
            self.record["study"]["actual_minutes"] = budget.minutes(study_seconds)
        return {**self.record, "actual_minutes": budget.minutes(total_seconds)}


def precision_text(speed: dict) -> str:
    """``bf16``, ``fp16`` or ``fp32``, with the measured bf16 speed-up where both were timed."""
    name = speed["precision"]
    return f"{name} (bf16 {speed['bf16_speedup']:.2f}x fp32)" if "bf16_speedup" in speed else name


def image_sizes_text(sizes: tuple[int, int], early_epochs: int) -> str:
    """``96>128`` for progressive resizing (early epochs at 96 px), ``128`` otherwise."""
    return f"{sizes[0]}>{sizes[1]}" if early_epochs and sizes[0] != sizes[1] else str(sizes[1])


def run_training(cfg: CatdogConfig, restart: bool = False) -> str:
    """Train every architecture in ``cfg.models``; return the URI of ``best.json``."""
    started = time.time()
    tracking.require_mlflow(cfg)
    storage = Storage.from_config(cfg.storage)
    split = load_split(storage, cfg.data.train, cfg.data.val_fraction, cfg.data.seed, cfg.data.limit)
    for spec in cfg.models:
        check_init(spec.arch, cfg.init_for(spec), storage)
    storage.check_bucket(cfg.run_uri)  # a missing bucket / wrong endpoint fails before Ray starts
    if not restart:
        cfg = with_recorded_sizes(cfg, storage)
        check_fingerprints(cfg, storage)
    with job_log(storage, cfg.run_uri, "train") as ray_log:
        logger.info(
            "run %s: %d train / %d val images %s, models %s; outputs in %s, Ray's log in %s",
            cfg.run_name,
            len(split.train),
            len(split.val),
            split.class_counts(split.train),
            ", ".join(s.arch for s in cfg.models),
            cfg.run_uri,
            ray_log.where,
        )
        init_ray(cfg, trains=True)
        check_train_resources(cfg)
        check_predict_resources(cfg)  # the validation study after training starts the predict actors
        check_init_on_worker_nodes(cfg, storage)
        prepare_run(cfg, storage, restart)
        ray_log.settle()
        run_budget = plan_budget(cfg, split, storage, started) if cfg.train.time_budget_minutes else None
        cfg = run_budget.sized(cfg) if run_budget is not None else cfg
        tracker = tracking.TrainingTracker(cfg, storage, cfg.hash()) if tracking.enabled(cfg) else None
        rows = rank_results(train_all(cfg, split, storage, started, tracker, run_budget))
        leaderboard = leaderboard_csv(rows)
        storage.write_text(join(cfg.run_uri, "leaderboard.csv"), leaderboard)
        best_uri = join(cfg.run_uri, "best.json")
        write_json(
            storage,
            best_uri,
            {
                **rows[0],
                "metrics": {k: rows[0][k] for k in ("val_acc", "val_log_loss")},
                "config": cfg.model_dump(mode="json"),
                **({"plan": run_budget.record} if run_budget else {}),
            },
        )
        report_uri, study_started = None, time.time()
        if cfg.train.report:
            validation_study(cfg, storage, split.val, split.shards)
        if run_budget is not None:
            study = time.time() - study_started if cfg.train.report else None
            write_json(storage, join(cfg.run_uri, PLAN_FILE), run_budget.summary(study, time.time() - started))
        record_run_summary(cfg, storage, time.time() - started)
        if cfg.train.report:
            report_uri = write_report(cfg, storage)
        if tracker is not None:
            tracker.finish(rows, cfg.run_uri, report_uri, leaderboard)
    if report_uri:
        logger.info("report: %s", report_uri)
    log_leaderboard(rows, time.time() - started)
    return best_uri


def plan_budget(cfg: CatdogConfig, split: Split, storage: Storage, started: float) -> RunBudget:
    """Measure, plan, and say so: in the log, in ``plan.json`` and at the end of ``config.yaml``."""
    run_budget = RunBudget(cfg, split, started)
    sized = run_budget.sized(cfg)
    if sized != cfg:
        # Sizes chosen here, not recorded by the run's first plan (one from before plan.json recorded
        # them), must still be those its trained models have.  Unchanged sizes were checked at start.
        check_fingerprints(sized, storage)
    for spec, arch in zip(cfg.models, run_budget.archs):
        if arch["rung"]:
            logger.info(
                "%s: fewer than min_epochs (%d) fit at %s px: training at %s px (models.*.smaller_sizes)",
                spec.arch,
                spec.min_epochs,
                image_sizes_text(train_sizes(cfg, spec), 1),
                image_sizes_text(arch["sizes"], 1),
            )
    lines = [
        f"{arch}: {p['planned_epochs']} epochs at {p['image_sizes']} px in {p['precision']}, "
        f"{p['predicted_minutes']:.1f} min"
        for arch, p in run_budget.record["archs"].items()
    ]
    logger.info(
        "time budget %.1f min (speeds measured in %.0f s): %s; validation study %.1f min",
        cfg.train.time_budget_minutes,
        run_budget.record["measure_seconds"],
        "; ".join(lines),
        run_budget.record["study"]["predicted_minutes"],
    )
    if run_budget.record["predicted_minutes"] > cfg.train.time_budget_minutes:
        logger.warning(
            "time budget %.1f min is too short for this run: even one epoch per architecture is predicted to "
            "take %.1f min with the measuring, the validation study and each architecture's start (about "
            "%.0f s); training that anyway. Raise train.time_budget_minutes, or train fewer models or images",
            cfg.train.time_budget_minutes,
            run_budget.record["predicted_minutes"],
            budget.ARCH_FIXED_S,
        )
    write_json(storage, join(cfg.run_uri, PLAN_FILE), run_budget.record)
    comment = "".join(f"#   {line}\n" for line in lines)
    storage.write_text(
        join(cfg.run_uri, "config.yaml"),
        sized.to_yaml() + f"# Time budget plan (re-planned as the run goes; see {PLAN_FILE}):\n" + comment,
    )
    return run_budget


def train_datasets(cfg: CatdogConfig, split: Split, storage: Storage, size: int) -> dict:
    """The Train workers' inputs: the training rows (classes mixed, augmented, block order shuffled
    each epoch) and the validation rows (eval preset), both read with the config's decode settings."""
    augment = TrainPreset(size, scale=(cfg.train.crop_scale_min, 1.0))
    rows = sorted(split.train, key=lambda r: split_key(r["path"], cfg.data.seed + 1))  # mix the classes
    reader = {"batch_size": cfg.data.decode_batch_size, "shards": split.shards, "threads": cfg.data.decode_threads}
    return {
        "train": image_dataset(storage, rows, augment, shuffle_blocks=True, **reader),
        "val": image_dataset(storage, split.val, EvalPreset(size), **reader),
    }


def train_all(
    cfg: CatdogConfig, split: Split, storage: Storage, started: float, tracker, run_budget: RunBudget | None
) -> list[dict]:
    """Each architecture in turn; the run clock lets each epoch line estimate the run's ETA."""
    rows, trained_epochs = [], 0
    for index, spec in enumerate(cfg.models):
        later = sum(planned_epochs(cfg, s, run_budget) for s in cfg.models[index + 1 :])
        clock = {"started": started, "epochs_done": trained_epochs, "epochs_after": later}
        if run_budget is not None:
            clock.update(budget_end=run_budget.deadline, seconds_after=run_budget.seconds_after(index))
        before = read_result(storage, join(cfg.run_uri, spec.arch))
        row = train_architecture(cfg, spec, split, storage, clock, tracker, run_budget)
        trained_epochs += row["epochs"] - (before["epochs"] if before else 0)
        rows.append(row)
    return rows


def planned_epochs(cfg: CatdogConfig, spec: ModelSpec, run_budget: RunBudget | None) -> int:
    if run_budget is not None:
        return run_budget.record["archs"][spec.arch]["planned_epochs"]
    return spec.epochs or cfg.train.epochs


def machine_summary(cfg: CatdogConfig) -> dict:
    """What the run ran on, for the report's headline: the Ray cluster's CPUs and GPUs, the
    driver's CPU model, and the Train workers."""
    import ray

    resources = ray.cluster_resources()
    return {
        "cpus": int(resources.get("CPU", 0)),
        "gpus": int(resources.get("GPU", 0)),
        "cpu_model": cpu_model(),
        "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
        "train_workers": cfg.train.num_workers,
        "use_gpu": cfg.train.use_gpu,
    }


def record_run_summary(cfg: CatdogConfig, storage: Storage, seconds: float) -> None:
    """``run_summary.json``: wall time of every train invocation of this run, summed (a resumed
    run adds its own), the machine, and when it finished."""
    uri = join(cfg.run_uri, RUN_SUMMARY_FILE)
    previous = json.loads(storage.read_text(uri))["wall_seconds"] if storage.exists(uri) else 0.0
    summary = {
        "wall_seconds": round(previous + seconds, 1),
        "finished_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_summary(cfg),
    }
    write_json(storage, uri, summary)


def log_leaderboard(rows: list[dict], seconds: float) -> None:
    logger.info("leaderboard (best first, %s in all):", duration(seconds))
    for rank, row in enumerate(rows, 1):
        calibrated = row.get("val_log_loss_calibrated")
        logger.info(
            "  %d. %-14s val_acc %.4f  val_log_loss %.4f%s  %6.1f s  %s",
            rank,
            row["arch"],
            row["val_acc"],
            row["val_log_loss"],
            f" ({calibrated:.4f} calibrated)" if calibrated is not None else "",
            float(row["train_seconds"]),
            row["checkpoint"],
        )
