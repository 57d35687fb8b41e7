"""Shared command-line plumbing for the thin ``jobs/*.py`` entry points."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from catdog.checkpoints import CheckpointError
from catdog.config import CatdogConfig, ConfigError, load_config
from catdog.data import DataError
from catdog.models import InitError
from catdog.runtime import ResourceError
from catdog.storage import StorageError

# Problems a user fixes by changing a config, an argument or their data: one line, exit 2.
USER_ERRORS = (ConfigError, DataError, InitError, ResourceError, StorageError, CheckpointError)


def job_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/local.yaml")
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


def run_job(args: argparse.Namespace, job: Callable[[CatdogConfig], str]) -> int:
    """Load the config, run ``job`` and print its result URI as the last stdout line."""
    configure_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        print(job(cfg), flush=True)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
