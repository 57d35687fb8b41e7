"""Shared command-line plumbing for the thin ``jobs/*.py`` entry points."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from catdog.checkpoints import CheckpointError
from catdog.config import CatdogConfig, ConfigError, _set_dotted, load_config, parse_override, validate_config
from catdog.data import DataError
from catdog.models import InitError
from catdog.runtime import ResourceError
from catdog.storage import StorageError, read_failure_in

# Problems a user fixes by changing a config, an argument or their data: one line, exit 2.
USER_ERRORS = (ConfigError, DataError, InitError, ResourceError, StorageError, CheckpointError)


def job_parser(description: str, config_required: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
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
    return parser


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


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
