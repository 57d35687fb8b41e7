"""Configuration: every shipped YAML validates; bad keys, types and values give one line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from catdog.config import CatdogConfig, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_folder_is_not_empty():
    assert {p.name for p in CONFIGS} >= {"local.yaml", "quick.yaml", "gpu.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, CatdogConfig)
    assert cfg.models, "a config must name at least one architecture"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_names_file_and_dotted_key(tmp_path):
    path = write(tmp_path, "train:\n  epochz: 3\n")
    assert error_of(path) == f"{path}: train.epochz: unknown key"


def test_unknown_section(tmp_path):
    path = write(tmp_path, "trian:\n  epochs: 3\n")
    assert error_of(path) == f"{path}: trian: unknown key"


def test_wrong_type_says_what_was_expected(tmp_path):
    path = write(tmp_path, "train:\n  epochs: many\n")
    assert (
        error_of(path) == f"{path}: train.epochs: Input should be a valid integer, unable to parse string as an "
        f"integer (got 'many')"
    )


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("data.val_fraction", "1.5", "data.val_fraction: Input should be less than 1 (got 1.5)"),
        ("data.val_fraction", "0", "data.val_fraction: Input should be greater than 0 (got 0)"),
        ("data.image_size", "-8", "data.image_size: Input should be greater than 0 (got -8)"),
        ("train.batch_size", "0", "train.batch_size: Input should be greater than 0 (got 0)"),
        (
            "models",
            "[{arch: resnet18, early_epochs: 2}]",
            "models.0.early_image_size: needs a size below image_size (128) when early_epochs is set",
        ),
        (
            "models",
            "[{arch: resnet18, epochs: 3, early_epochs: 3, early_image_size: 64}]",
            "models.0.early_epochs: must be fewer than the architecture's epochs (3), "
            "so that the last epochs train at image_size",
        ),
        (
            "models",
            "[resnet50]",
            "models.0.arch: expected 'mobilenet_v2', 'resnet18' or 'sequential_cnn' (got 'resnet50')",
        ),
    ],
)
def test_bad_values_from_overrides(tmp_path, key, value, expected):
    path = write(tmp_path, "run_name: t\n")
    assert error_of(path, [f"{key}={value}"]) == f"{path}: {expected}"


def test_sequential_cnn_with_imagenet_is_a_config_error(tmp_path):
    path = write(tmp_path, "models: [sequential_cnn]\ntrain:\n  init: imagenet\n")
    assert "sequential_cnn has no ImageNet weights" in error_of(path)


def test_missing_file_and_bad_yaml(tmp_path):
    assert error_of(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: config file not found"
    assert "is not valid YAML" in error_of(write(tmp_path, "train: [1, 2\n"))


def test_overrides_are_parsed_as_yaml_scalars(tmp_path):
    path = write(tmp_path, "models: [resnet18, mobilenet_v2]\n")
    cfg = load_config(
        path,
        [
            "train.epochs=7",
            "train.use_gpu=true",
            "train.lr=1e-3",
            "data.limit=null",
            "storage.root=s3://bucket/runs",
            "models.1.image_size=80",
            "run_name=exp-2",
        ],
    )
    assert cfg.train.epochs == 7 and cfg.train.use_gpu is True and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.data.limit is None
    assert cfg.models[1].arch == "mobilenet_v2" and cfg.models[1].image_size == 80
    assert cfg.run_uri == "s3://bucket/runs/exp-2"


def test_override_without_equals_sign(tmp_path):
    path = write(tmp_path, "run_name: t\n")
    assert "expected key=value" in error_of(path, ["train.epochs"])


def test_resolved_config_round_trips_and_hash_is_stable(tmp_path):
    cfg = load_config(REPO / "configs" / "quick.yaml")
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg and again.hash() == cfg.hash()
    assert load_config(REPO / "configs" / "quick.yaml", ["train.epochs=9"]).hash() != cfg.hash()
    assert yaml.safe_load(cfg.to_yaml())["run_name"] == "quick"


@pytest.mark.parametrize("job", ["train.py", "predict.py", "evaluate.py"])
def test_jobs_print_one_line_and_exit_2_on_bad_config(tmp_path, job):
    path = write(tmp_path, "train:\n  epochz: 3\n")
    args = [sys.executable, str(REPO / "jobs" / job), "--config", str(path)]
    if job == "evaluate.py":
        args += ["--input", str(tmp_path)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {path}: train.epochz: unknown key"]
    assert "Traceback" not in proc.stderr


def test_amp_is_set_per_architecture_and_reaches_the_train_loop():
    from catdog.storage import Storage
    from catdog.train_job import arch_params, loop_config

    models = "models=[{arch: mobilenet_v2, amp: false}, resnet18]"
    cfg = load_config(REPO / "configs" / "quick.yaml", [models, "train.amp=true"])
    assert cfg.train.amp is True
    loops = {spec.arch: loop_config(cfg, spec, Storage(), n_train=64) for spec in cfg.models}
    assert {arch: loop["amp"] for arch, loop in loops.items()} == {"mobilenet_v2": False, "resnet18": True}
    assert arch_params(cfg, loops["mobilenet_v2"])["model"]["amp"] is False  # what MLflow records
