"""Command-line plumbing shared by the ``catdog`` command and the thin ``jobs/*.py`` entry points.

Each job's arguments are defined once here (``JOBS``); ``catdog <job>`` and ``python jobs/<job>.py``
parse the same options and call the same function.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from catdog.checkpoints import CheckpointError
from catdog.config import CatdogConfig, ConfigError, _set_dotted, load_config, parse_override, validate_config
from catdog.console import VERBOSE_ENV
from catdog.images import DataError
from catdog.models import InitError
from catdog.runtime import ResourceError
from catdog.storage import StorageError, read_failure_in
from catdog.tracking import TrackingError

# Problems a user fixes by changing a config, an argument or their data: one line, exit 2.
USER_ERRORS = (ConfigError, DataError, InitError, ResourceError, StorageError, CheckpointError, TrackingError)
MODEL_HELP = "best.json or checkpoint folder (default: the run's best.json)"
TTA_HELP = "average with the horizontally flipped image (default: predict.tta; --no-tta turns it off)"
ENSEMBLE_HELP = "weighted average of the leaderboard's models, weights fitted on validation (val_study.json)"
NO_CALIBRATE_HELP = "use each model's own probabilities, without the temperature fitted on validation"


def add_common_arguments(parser: argparse.ArgumentParser, config_required: bool = True) -> None:
    parser.add_argument(
        "--config",
        required=config_required,
        help="YAML config, e.g. configs/local.yaml" + ("" if config_required else " (default: built-in defaults)"),
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=3 (repeatable)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help=f"show Ray's own progress bars, logs and warnings on the console (or set {VERBOSE_ENV}=1)",
    )


def job_parser(description: str, config_required: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    add_common_arguments(parser, config_required)
    return parser


def train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--restart", action="store_true", help="move the previous run aside and start fresh")


def predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help=MODEL_HELP)
    parser.add_argument("--input", help="image folder (default: data.test)")
    parser.add_argument("--output", help="output folder (default: <storage.root>/<run_name>)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, help=TTA_HELP)
    parser.add_argument("--ensemble", action="store_true", help=ENSEMBLE_HELP)
    parser.add_argument("--no-calibrate", action="store_true", help=NO_CALIBRATE_HELP)
    parser.add_argument("--proba", action="store_true", help="write clipped probabilities (Kaggle Redux format)")
    parser.add_argument("--full", action="store_true", help="re-score every image (default: only new or changed ones)")


def evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input", help="labelled folder: cat.N.jpg/dog.N.jpg or cat(s)/ dog(s)/ (default: the validation split)"
    )
    parser.add_argument("--model", help=MODEL_HELP)
    parser.add_argument("--output", help="output folder (default: <storage.root>/<run_name>/evaluate)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, help=TTA_HELP)
    parser.add_argument("--ensemble", action="store_true", help=ENSEMBLE_HELP)
    parser.add_argument("--no-calibrate", action="store_true", help=NO_CALIBRATE_HELP)


def prepare_arguments(parser: argparse.ArgumentParser) -> None:
    from catdog.shards import DEFAULT_SHARD_SIZE

    parser.add_argument("--input", required=True, help="image folder: Kaggle names or cat(s)/ dog(s)/ folders")
    parser.add_argument("--output", required=True, help="folder for the shards (local path or s3://bucket/prefix)")
    parser.add_argument(
        "--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help=f"images per shard (default {DEFAULT_SHARD_SIZE})"
    )
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    parser.add_argument("--region", help="S3 region")


def run_train(cfg: CatdogConfig, args: argparse.Namespace) -> str:
    from catdog.train_job import run_training

    return run_training(cfg, restart=args.restart)


def run_predict(cfg: CatdogConfig, args: argparse.Namespace) -> str:
    from catdog.predict_job import run_predict as predict

    return predict(
        cfg,
        args.model,
        args.input,
        args.output,
        args.tta,
        args.ensemble,
        args.proba,
        full=args.full,
        calibrate=not args.no_calibrate,
    )


def run_evaluate(cfg: CatdogConfig, args: argparse.Namespace) -> str:
    from catdog.predict_job import run_evaluate as evaluate

    return evaluate(cfg, args.input, args.model, args.output, args.tta, args.ensemble, calibrate=not args.no_calibrate)


def run_prepare(cfg: CatdogConfig, args: argparse.Namespace) -> str:
    from catdog.shards import run_prepare as prepare

    return prepare(cfg, args.input, args.output, args.shard_size)


def prepare_overrides(args: argparse.Namespace) -> None:
    """``--endpoint-url`` / ``--region`` are storage settings for a job that needs no config."""
    args.overrides += [
        f"storage.{key}={value}"
        for key, value in (("endpoint_url", args.endpoint_url), ("region", args.region))
        if value
    ]


# name → (one-line description, argument definitions, job, config required)
JOBS: dict[str, tuple[str, Callable, Callable, bool]] = {
    "train": (
        "Train every architecture in models: and pick the best one on validation.",
        train_arguments,
        run_train,
        True,
    ),
    "predict": (
        "Score an image folder with the best model: predictions Parquet + Kaggle submission.csv.",
        predict_arguments,
        run_predict,
        True,
    ),
    "evaluate": (
        "Score the run's validation split (or a labelled image folder) and write metrics.json.",
        evaluate_arguments,
        run_evaluate,
        True,
    ),
    "prepare": (
        "Pack an image folder into Parquet shards (name, label/id, bytes, width, height, sha256).",
        prepare_arguments,
        run_prepare,
        False,
    ),
}


def job_main(name: str, argv: list[str] | None = None) -> int:
    """``python jobs/<name>.py``: parse that job's arguments and run it."""
    description, add_arguments, job, config_required = JOBS[name]
    parser = job_parser(description, config_required)
    add_arguments(parser)
    return run_parsed(name, parser.parse_args(argv), job)


def main(argv: list[str] | None = None) -> int:
    """The ``catdog`` command: ``catdog train|predict|evaluate|prepare [options]``."""
    parser = argparse.ArgumentParser(prog="catdog", description="Dogs vs Cats on Ray: train, predict, evaluate.")
    commands = parser.add_subparsers(dest="job", required=True, metavar="{train,predict,evaluate,prepare}")
    for name, (description, add_arguments, _, config_required) in JOBS.items():
        sub = commands.add_parser(name, help=description, description=description)
        add_common_arguments(sub, config_required)
        add_arguments(sub)
    args = parser.parse_args(argv)
    return run_parsed(args.job, args, JOBS[args.job][2])


def run_parsed(name: str, args: argparse.Namespace, job: Callable) -> int:
    if name == "prepare":
        prepare_overrides(args)
    return run_job(args, lambda cfg: job(cfg, args))


class ConsoleFormatter(logging.Formatter):
    """``12:03:04 message``; warnings and errors say so."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        text = f"{self.formatTime(record, '%H:%M:%S')} {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure_logging() -> None:
    """catdog's INFO lines and everyone's warnings on stderr (Ray's own loggers: see catdog.console)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ConsoleFormatter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("catdog").setLevel(logging.INFO)


def load_job_config(path: str | None, overrides: list[str]) -> CatdogConfig:
    """``path`` plus overrides; without a file, the built-in defaults plus overrides."""
    if path is not None:
        return load_config(path, overrides)
    raw: dict = {}
    for item in overrides:
        key, value = parse_override(item, "--set")
        _set_dotted(raw, key, value, "--set")
    return validate_config(raw, "--set")


def run_job(args: argparse.Namespace, job: Callable[[CatdogConfig], str]) -> int:
    """Load the config, run ``job`` and print its result URI as the last stdout line."""
    if getattr(args, "verbose", False):
        os.environ[VERBOSE_ENV] = "1"  # also reaches Ray workers started from here
    configure_logging()
    try:
        cfg = load_job_config(args.config, args.overrides)
        print(job(cfg), flush=True)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # A Ray task or Train worker that could not read an object (after every retry) fails the
        # job with one line naming the object(s), not a Ray traceback.
        failure = read_failure_in(exc)
        if failure is None:
            raise
        print(f"error: {failure}", file=sys.stderr)
        return 2
    return 0
