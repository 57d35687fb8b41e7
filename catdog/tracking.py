"""Experiment tracking in MLflow (optional: ``pip install -e ".[tracking]"``, config ``tracking``).

A training run is one MLflow parent run plus one child run per architecture.  The driver creates
them and records their ids in ``<run>/mlflow.json``, so a resumed run (a re-run after a killed
driver, or Ray Train restarting workers) logs into the same MLflow runs and never duplicates
them; ``--restart`` moves that file aside with the rest of the run, so a fresh start gets fresh
runs.  Rank 0 logs each epoch's metrics (``step`` = epoch) once the epoch's checkpoint is stored.
Predict and evaluate log one run each to the same experiment.

Everything goes through ``MlflowClient`` with explicit run ids: no global active run, so nothing
leaks between architectures or into Ray workers.  ``mlflow`` is imported only when tracking is on.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time

from catdog.storage import Storage, join

logger = logging.getLogger(__name__)

IDS_FILE = "mlflow.json"
MAX_PARAM_LENGTH = 6000  # MLflow's limit for a param value


class TrackingError(Exception):
    """Tracking requested but impossible, phrased as one line."""


def enabled(cfg) -> bool:
    return cfg.tracking.mlflow_uri is not None


def without_mlflow_telemetry() -> None:
    """MLflow's usage telemetry off unless the user set ``MLFLOW_DISABLE_TELEMETRY`` themselves;
    called before mlflow is first imported.  Its background thread sets and deletes an environment
    variable while other threads iterate ``os.environ`` (requests does on every call): a tracked
    training in the test suite died of that ``KeyError``.  catdog has no use for the telemetry."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def require_mlflow(cfg) -> None:
    """Fail before any work when ``tracking.mlflow_uri`` is set and mlflow is not installed."""
    if not enabled(cfg):
        return
    without_mlflow_telemetry()
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise TrackingError(
            "tracking.mlflow_uri is set but mlflow is not installed: "
            'pip install -e ".[tracking]", or unset tracking.mlflow_uri'
        ) from None


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.1}}`` → ``{"train.lr": "0.1"}``: MLflow params are flat strings."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = ("null" if value is None else str(value))[:MAX_PARAM_LENGTH]
    return flat


def _client(uri: str):
    without_mlflow_telemetry()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created meanwhile by another job
        return client.get_experiment_by_name(name).experiment_id


def experiment_name(cfg) -> str:
    return cfg.tracking.experiment or cfg.run_name


def _log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in flatten(params).items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[start : start + 100])


def _log_metrics(client, run_id: str, metrics: dict, step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    numbers = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, int | float)]
    if numbers:
        client.log_batch(run_id, metrics=numbers)


def _log_text_artifact(client, run_id: str, name: str, text: str, artifact_path: str | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="catdog-mlflow-") as folder:
        path = os.path.join(folder, name)
        with open(path, "w") as handle:
            handle.write(text)
        client.log_artifact(run_id, path, artifact_path)


def log_epoch(target: dict, metrics: dict) -> None:
    """On rank 0: one epoch's metrics, ``step`` = epoch. ``target``: ``{"uri", "run_id"}``."""
    values = {k: v for k, v in metrics.items() if k != "epoch"}
    _log_metrics(_client(target["uri"]), target["run_id"], values, step=int(metrics["epoch"]))


class TrainingTracker:
    """The MLflow runs of one training run; their ids live in ``<run>/mlflow.json``."""

    def __init__(self, cfg, storage: Storage, config_hash: str):
        self.cfg, self.storage, self.config_hash = cfg, storage, config_hash
        self.uri = cfg.tracking.mlflow_uri
        self.client = _client(self.uri)
        self.ids_uri = join(cfg.run_uri, IDS_FILE)
        ids = json.loads(storage.read_text(self.ids_uri)) if storage.exists(self.ids_uri) else {}
        if ids.get("tracking_uri") != self.uri or not self._alive(ids.get("parent")):
            ids = {"tracking_uri": self.uri, "experiment_id": _experiment_id(self.client, experiment_name(cfg))}
        self.ids = ids
        self.ids.setdefault("runs", {})
        if "parent" not in self.ids:
            self.ids["parent"] = self._create(cfg.run_name, {"catdog.role": "run"})
            _log_params(self.client, self.ids["parent"], {k: v for k, v in cfg.model_dump(mode="json").items()})
            self._save()
        else:
            logger.info("MLflow: continuing run %s in experiment %s", self.ids["parent"], experiment_name(cfg))

    def _alive(self, run_id: str | None) -> bool:
        from mlflow.exceptions import MlflowException

        if not run_id:
            return False
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    def _create(self, name: str, tags: dict) -> str:
        tags = {"run_name": self.cfg.run_name, "config_hash": self.config_hash, **tags}
        run = self.client.create_run(self.ids["experiment_id"], run_name=name, tags=tags)
        return run.info.run_id

    def _save(self) -> None:
        self.storage.write_text(self.ids_uri, json.dumps(self.ids, indent=2, sort_keys=True) + "\n")

    def arch_run(self, arch: str, params: dict, fingerprint: str) -> dict:
        """The child run of ``arch`` (created once, params logged then); what rank 0 needs to log to it.
        ``fingerprint``: a digest of the settings that shaped this architecture's model."""
        run_id = self.ids["runs"].get(arch)
        if not self._alive(run_id):
            tags = {"arch": arch, "mlflow.parentRunId": self.ids["parent"], "fingerprint": fingerprint}
            run_id = self._create(arch, tags)
            _log_params(self.client, run_id, params)
            self.ids["runs"][arch] = run_id
            self._save()
        self.client.update_run(run_id, status="RUNNING")
        return {"uri": self.uri, "run_id": run_id}

    def arch_done(self, arch: str, arch_uri: str, checkpoint_uri: str) -> None:
        """Attach ``metrics.csv`` and the best checkpoint's ``meta.json``; close the child run."""
        run_id = self.ids["runs"][arch]
        _log_text_artifact(self.client, run_id, "metrics.csv", self.storage.read_text(join(arch_uri, "metrics.csv")))
        _log_text_artifact(self.client, run_id, "meta.json", self.storage.read_text(join(checkpoint_uri, "meta.json")))
        self.client.set_terminated(run_id, "FINISHED")

    def finish(self, rows: list[dict], run_uri: str, report_uri: str | None, leaderboard: str) -> None:
        """Parent run: leaderboard, report (unless ``train.report`` is off), ``best_arch``; register
        the best checkpoint."""
        parent, best = self.ids["parent"], rows[0]
        _log_text_artifact(self.client, parent, "leaderboard.csv", leaderboard)
        if report_uri is not None:
            _log_text_artifact(self.client, parent, "report.html", self.storage.read_text(report_uri))
        self.client.set_tag(parent, "best_arch", best["arch"])
        _log_metrics(self.client, parent, {"best_val_acc": best["val_acc"], "best_val_log_loss": best["val_log_loss"]})
        if best["arch"] in self.ids["runs"]:
            self.register(best)
        self.client.set_terminated(parent, "FINISHED")

    def register(self, best: dict) -> None:
        """The best checkpoint as a version of model ``catdog-<run_name>``, once per checkpoint;
        skipped (with a note) where the tracking backend has no model registry."""
        from mlflow.exceptions import MlflowException

        name, run_id = f"catdog-{self.cfg.run_name}", self.ids["runs"][best["arch"]]
        artifact_path = f"checkpoint/{best['checkpoint'].rstrip('/').rsplit('/', 1)[-1]}"
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
        try:
            if any(v.source == source for v in self.client.search_model_versions(f"name='{name}'")):
                return
            with tempfile.TemporaryDirectory(prefix="catdog-mlflow-") as folder:
                for info in self.storage.list_files(best["checkpoint"], recursive=False):
                    relative = info.path.rsplit("/", 1)[-1]
                    if relative == "train_state.pt":  # optimizer state: for resuming, not for serving
                        continue
                    with open(os.path.join(folder, relative), "wb") as handle:
                        handle.write(self.storage.read_bytes(join(best["checkpoint"], relative)))
                self.client.log_artifacts(run_id, folder, artifact_path)
            try:
                self.client.create_registered_model(name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            version = self.client.create_model_version(name, source, run_id=run_id, tags={"arch": best["arch"]})
            logger.info("MLflow: registered %s version %s (%s)", name, version.version, best["arch"])
        except MlflowException as exc:
            logger.warning("MLflow: not registering the best checkpoint (%s)", str(exc).splitlines()[0])


def log_job_run(cfg, job: str, metrics: dict, params: dict) -> None:
    """One MLflow run for a predict or evaluate invocation, in the training run's experiment."""
    if not enabled(cfg):
        return
    client = _client(cfg.tracking.mlflow_uri)
    run = client.create_run(
        _experiment_id(client, experiment_name(cfg)), run_name=job, tags={"run_name": cfg.run_name, "job": job}
    )
    _log_params(client, run.info.run_id, params)
    _log_metrics(client, run.info.run_id, metrics)
    client.set_terminated(run.info.run_id, "FINISHED")
