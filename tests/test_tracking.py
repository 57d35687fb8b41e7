"""MLflow tracking against a real ``mlflow server`` on loopback and a ``sqlite:///`` store:
one run per architecture with per-epoch metrics, a parent run with ``best_arch``, a registered
model version, predict/evaluate runs, and no duplicates when a run resumes (with a ``sqlite:///``
store: tests/test_training.py's rerun test, which trains the resume once for both)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO, quick_overrides, require_mlflow

from catdog import cli
from catdog.config import load_config
from catdog.tracking import flatten
from catdog.train_job import fingerprint_digest, run_fingerprint


def test_params_are_flattened_to_dotted_strings():
    flat = flatten({"train": {"lr": 0.002, "init": None}, "models": ["resnet18"], "run_name": "x"})
    assert flat == {"train.lr": "0.002", "train.init": "null", "models": "['resnet18']", "run_name": "x"}


def test_tracking_without_mlflow_stops_with_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow → ImportError
    code = cli.main(
        [
            "train",
            "--config",
            str(REPO / "configs" / "quick.yaml"),
            "--set",
            f"tracking.mlflow_uri=sqlite:///{tmp_path}/mlflow.db",
            "--set",
            f"storage.root={tmp_path}/runs",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [
        'error: tracking.mlflow_uri is set but mlflow is not installed: pip install -e ".[tracking]", '
        "or unset tracking.mlflow_uri"
    ]
    assert not (tmp_path / "runs").exists()


def test_jobs_turn_mlflow_telemetry_off_unless_the_user_chose(tmp_path):
    """Its thread edits os.environ while others read it (a tracked training died of the KeyError)."""
    require_mlflow()
    script = """
import os, sys
from catdog.config import CatdogConfig
from catdog.tracking import require_mlflow
require_mlflow(CatdogConfig.model_validate({"tracking": {"mlflow_uri": sys.argv[1]}}))
from mlflow.telemetry.utils import is_telemetry_disabled
print(os.environ["MLFLOW_DISABLE_TELEMETRY"], is_telemetry_disabled())
"""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, "-c", script, uri]
    chosen = {**env, "MLFLOW_DISABLE_TELEMETRY": "false"}
    outputs = [subprocess.run(command, capture_output=True, text=True, env=e, timeout=120) for e in (env, chosen)]
    assert [p.stdout.split()[0] for p in outputs] == ["true", "false"], [p.stderr[-2000:] for p in outputs]
    assert outputs[0].stdout.split()[1] == "True"


def runs_of(uri: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri, uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment}"
    return client, client.search_runs([found.experiment_id], max_results=1000)


def by_role(runs) -> dict:
    parent = [r for r in runs if r.data.tags.get("catdog.role") == "run"]
    archs = {r.data.tags["arch"]: r for r in runs if "arch" in r.data.tags}
    jobs = [r for r in runs if "job" in r.data.tags]
    return {"parent": parent, "archs": archs, "jobs": jobs}


def train(cfg):
    from catdog.train_job import run_training

    return run_training(cfg)


@pytest.mark.slow
def test_training_runs_in_mlflow_server_and_a_rerun_adds_none(mlflow_server, small_real_data, tmp_path, ray_session):
    from catdog.predict_job import run_predict

    overrides = quick_overrides(
        small_real_data,
        tmp_path,
        "tracked",
        models="[sequential_cnn, mobilenet_v2]",
        # 32 px: what the tracking records does not depend on the image size.
        **{
            "train.epochs": 2,
            "tracking.mlflow_uri": mlflow_server.uri,
            "train.report": True,
            "data.limit": 120,
            "data.image_size": 32,
        },
    )
    cfg = load_config(REPO / "configs" / "quick.yaml", overrides)
    train(cfg)
    client, runs = runs_of(mlflow_server.uri, "tracked")  # experiment defaults to run_name
    roles = by_role(runs)
    assert len(roles["parent"]) == 1 and set(roles["archs"]) == {"sequential_cnn", "mobilenet_v2"}
    parent = roles["parent"][0]
    best = (tmp_path / "tracked" / "leaderboard.csv").read_text().splitlines()[1].split(",")[0]
    assert parent.data.tags["best_arch"] == best
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"leaderboard.csv", "report.html"} <= artifacts
    for arch, run in roles["archs"].items():
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.step for m in history] == [1, 2], arch
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["run_name"] == "tracked" and run.data.tags["config_hash"] == cfg.hash()
        spec = next(s for s in cfg.models if s.arch == arch)
        assert run.data.tags["fingerprint"] == fingerprint_digest(run_fingerprint(cfg, spec))
        assert run.data.params["model.arch"] == arch and run.data.params["train.epochs"] == "2"
        assert {"train_loss", "val_loss", "val_log_loss", "images_per_s"} <= set(run.data.metrics)
        assert {"metrics.csv", "meta.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        assert run.info.status == "FINISHED"
    versions = client.search_model_versions("name='catdog-tracked'")
    assert len(versions) == 1 and versions[0].run_id == roles["archs"][best].info.run_id

    run_predict(cfg, input_uri=str(small_real_data / "test1"))
    # Every architecture already trained: resumes the same runs, adds none.  Without the report
    # (not part of any fingerprint), the rerun does not score the validation study again.
    train(load_config(REPO / "configs" / "quick.yaml", [*overrides, "train.report=false"]))
    client, again = runs_of(mlflow_server.uri, "tracked")
    roles_again = by_role(again)
    assert {r.info.run_id for r in roles_again["parent"]} == {parent.info.run_id}
    assert {a: r.info.run_id for a, r in roles_again["archs"].items()} == {
        a: r.info.run_id for a, r in roles["archs"].items()
    }
    assert len(client.search_model_versions("name='catdog-tracked'")) == 1
    [predict] = roles_again["jobs"]
    assert predict.data.tags["job"] == "predict" and predict.data.metrics["n_images"] == 120
    assert predict.data.metrics["images_per_s"] > 0
