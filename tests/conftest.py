"""Shared fixtures: a session-scoped Ray, the real data folder, synthetic images, one quick run.

``CATDOG_REQUIRE=data,chromium,moto,mlflow`` (set by ``.ci/run``) turns the skips for a missing
component into failures: the session stops at start with a line naming what is missing, and any
test that still skips for another reason than the ``gpu`` marker is reported as failed.
"""

from __future__ import annotations

import csv
import functools
import importlib
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "dogs-vs-cats"
# Each test module's seconds in the last stored xdist pass (under the rootdir): the order
# pytest_xdist_make_scheduler starts them in.
DURATIONS = Path("tests", "durations.json")
STORE_DURATIONS = os.environ.get("CATDOG_STORE_DURATIONS") == "1"
_module_seconds: dict[str, float] = {}


VENV_BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def real_data_dir() -> Path | None:
    path = Path(os.environ.get("CATDOG_DATA", DEFAULT_DATA))
    return path if (path / "train").is_dir() and (path / "test1").is_dir() else None


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure means the component is unusable
        return False
    return True


def missing_data() -> str | None:
    if real_data_dir() is None:
        where = os.environ.get("CATDOG_DATA", DEFAULT_DATA)
        return f"CATDOG_DATA: real Kaggle images not found in {where} (needs train/ and test1/)"
    return None


def missing_chromium() -> str | None:
    return None if CHROMIUM else "chromium: no chromium or chromium-browser on PATH (.ci/run installs it)"


def missing_moto() -> str | None:
    if not (VENV_BIN / "moto_server").exists() or not _importable("moto"):
        return f"moto: {VENV_BIN / 'moto_server'} or the moto package is missing (install the dev extras)"
    return None


def missing_mlflow() -> str | None:
    if not (VENV_BIN / "mlflow").exists() or not _importable("mlflow"):
        return f"mlflow: {VENV_BIN / 'mlflow'} or the mlflow package is missing (install the dev extras)"
    return None


REQUIREMENTS = {"data": missing_data, "chromium": missing_chromium, "moto": missing_moto, "mlflow": missing_mlflow}


def required() -> set[str]:
    return {name.strip() for name in os.environ.get("CATDOG_REQUIRE", "").split(",") if name.strip()}


def pytest_sessionstart(session):
    """With CATDOG_REQUIRE set, stop at once (not after 30 minutes of other tests) naming what is missing."""
    wanted = required()
    unknown = wanted - REQUIREMENTS.keys()
    problems = [f"CATDOG_REQUIRE: unknown component {name!r} (known: {', '.join(REQUIREMENTS)})" for name in unknown]
    problems += [problem for name in sorted(wanted & REQUIREMENTS.keys()) if (problem := REQUIREMENTS[name]())]
    if problems:
        pytest.exit("required component missing: " + "; ".join(problems), returncode=3)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """With CATDOG_REQUIRE set, only the gpu marker may skip: every other skip is a failure."""
    report = yield
    if report.skipped and required() and item.get_closest_marker("gpu") is None and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CATDOG_REQUIRE={os.environ['CATDOG_REQUIRE']}: {reason}"
    return report


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (``make test`` runs ``-n 2``) a module runs whole on one worker, so its module
    fixtures are built once; the modules that read the trained ``quick_run`` share a worker (it trains
    once per worker), and so do the ``cluster`` modules (one multi-node cluster at a time).  xdist's
    own ``xdist_group`` marks do not work with pytest 9 (they rename ``_nodeid``, which pytest 9 no
    longer reads), hence a scheduler that groups by module instead.

    The groups start longest first (their seconds in ``tests/durations.json``), so that the last one
    to start is short and the two workers finish together.  xdist's own order, most tests first, had
    put the 250-second GPU-kit module near the end."""
    from xdist.scheduler import LoadScopeScheduling

    stored = config.rootpath / DURATIONS
    seconds = json.loads(stored.read_text()) if stored.exists() else {}

    class ModuleGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return module_group(config.rootpath / nodeid.split("::")[0])

        def _assign_work_unit(self, node) -> None:
            longest = max(self.workqueue, key=lambda scope: group_seconds(self.workqueue[scope], seconds))
            self.workqueue.move_to_end(longest, last=False)
            super()._assign_work_unit(node)

    return ModuleGroups(config, log)


def group_seconds(nodeids, seconds: dict[str, float]) -> float:
    """A scheduling group's expected seconds: its modules' last recorded times (a new module: 0)."""
    return sum(seconds.get(module, 0.0) for module in {nodeid.split("::")[0] for nodeid in nodeids})


def pytest_runtest_logreport(report) -> None:
    if STORE_DURATIONS:
        module = report.nodeid.split("::")[0]
        _module_seconds[module] = _module_seconds.get(module, 0.0) + report.duration


def pytest_sessionfinish(session) -> None:
    """``CATDOG_STORE_DURATIONS=1 make test`` rewrites ``tests/durations.json`` from the xdist pass
    (the controller sees every worker's reports; the ``serial`` pass is not scheduled)."""
    controller = getattr(session.config.option, "numprocesses", None) and not hasattr(session.config, "workerinput")
    if STORE_DURATIONS and controller and _module_seconds:
        rounded = {module: round(s, 1) for module, s in sorted(_module_seconds.items())}
        (session.config.rootpath / DURATIONS).write_text(json.dumps(rounded, indent=1) + "\n")


@functools.cache
def module_group(path: Path) -> str:
    source = path.read_text()
    if "pytest.mark.cluster" in source:
        return "cluster"
    return "quick_run" if "quick_run" in source else str(path)


def require_or_skip(component: str) -> None:
    """Skip a test whose component is missing (a failure when CATDOG_REQUIRE names it)."""
    problem = REQUIREMENTS[component]()
    if problem is None:
        return
    if component in required():
        pytest.fail(f"required by CATDOG_REQUIRE: {problem}")
    pytest.skip(problem)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    require_or_skip("data")
    return real_data_dir()


@pytest.fixture(scope="session")
def faults_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(autouse=True)
def disarmed_faults(request):
    """Every test starts and ends with no fault armed and no fault-hook records (a fault that never
    fired must not kill a process in a later test).  Only touches the folder when a test uses it."""
    if "faults_dir" not in request.fixturenames:
        yield
        return
    folder = request.getfixturevalue("faults_dir")
    _clear(folder)
    yield
    _clear(folder)


def _clear(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink(missing_ok=True)


# The dummy credentials of the tests' local moto servers (tests/test_s3.py), the only AWS credentials
# a test ever uses.  The session Ray's workers get them so that jobs run in-process can read s3://
# (Ray workers take their environment from the runtime_env, not from the driver's os.environ).
S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "catdog-test-key", "AWS_SECRET_ACCESS_KEY": "catdog-test-secret"}


@pytest.fixture(scope="session")
def ray_session(faults_dir):
    """One local Ray for the whole test session.  4 logical CPUs on 2 cores on purpose: a Train
    worker holds one for the whole run and Ray Data must still have slots to decode."""
    import ray

    from catdog.runtime import start_local_ray

    if not ray.is_initialized():
        # The fault-injection hook (tests/faults.py) is inert until a test arms a fault.  Started as
        # the jobs start theirs: again if Ray's start times out while the other xdist worker is busy.
        # No dashboard: nothing in-process reads Ray's State API, and Train's placement-group cleaner
        # cannot reach it anyway while two xdist workers each run a Ray ("Found multiple active Ray
        # instances").  Idle, the dashboard process costs 0.87 CPU-s a minute (bench/idle_ray.py), in
        # each of the two session Rays for the whole run.  The jobs' own Rays keep their choice.
        start_local_ray(
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=True,
            runtime_env={
                "env_vars": {
                    "PYTHONPATH": f"{REPO}:{REPO / 'tests'}:${{PYTHONPATH}}",
                    "CATDOG_FAULTS_DIR": str(faults_dir),
                    **S3_TEST_CREDENTIALS,
                },
                "worker_process_setup_hook": "faults.install",
            },
        )
    yield ray
    ray.shutdown()


# Ray forwards worker and raylet log lines to the driver's stdout ("(raylet) WARNING ...",
# often wrapped in colour codes), sometimes after the job's own last print.
_RAY_LOG_LINE = re.compile(r"^(\x1b\[[0-9;]*m)*\(")


def printed_result(stdout: str) -> str:
    """The last line a job printed itself, skipping log lines that Ray forwarded."""
    own = [line for line in stdout.splitlines() if line.strip() and not _RAY_LOG_LINE.match(line)]
    assert own, f"the job printed nothing of its own:\n{stdout[-2000:]}"
    return own[-1].strip()


def jpeg_bytes(color=(200, 30, 30), size=(48, 40), mode="RGB", **save) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format="JPEG", **save)
    return out.getvalue()


def write_image(path: Path, color=(200, 30, 30), size=(48, 40), mode="RGB", fmt="JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new(mode, size, color)
    image.save(path, format=fmt)
    return path


@pytest.fixture
def kaggle_folder(tmp_path) -> Path:
    """20 cats (reddish) and 20 dogs (bluish) with Kaggle names, plus noise the reader must ignore."""
    folder = tmp_path / "train"
    for i in range(20):
        write_image(folder / f"cat.{i}.jpg", color=(200, 40 + i, 40))
        write_image(folder / f"dog.{i}.jpg", color=(40, 40 + i, 200))
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.jpg").write_bytes(jpeg_bytes())
    return folder


def epochs_of(metrics_csv: Path) -> list[int]:
    """The epoch numbers a run's ``metrics.csv`` holds, in order."""
    with open(metrics_csv, newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def copy_images(src: Path, dst: Path, names: list[str]) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope="session")
def small_real_data(tmp_path_factory, data_dir) -> Path:
    """A few hundred real images: 200 cats + 200 dogs in train/, 120 test1 images."""
    root = tmp_path_factory.mktemp("real")
    copy_images(data_dir / "train", root / "train", [f"{kind}.{i}.jpg" for kind in ("cat", "dog") for i in range(200)])
    copy_images(data_dir / "test1", root / "test1", [f"{i}.jpg" for i in range(1, 121)])
    return root


def quick_overrides(data: Path, root: Path, run_name: str = "quick", **extra) -> list[str]:
    """The quick config on ``data``; no validation study or report unless ``train.report=true`` is passed."""
    sets = {
        "data.train": str(data / "train"),
        "data.test": str(data / "test1"),
        "storage.root": str(root),
        "run_name": run_name,
        "data.limit": None,
        "train.report": False,
        **extra,
    }
    return [f"{k}={'null' if v is None else v}" for k, v in sets.items()]


def set_args(overrides: list[str]) -> list[str]:
    """A job's ``--set`` arguments for ``overrides`` (one ``--set`` per override)."""
    return [arg for item in overrides for arg in ("--set", item)]


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory, small_real_data, ray_session):
    """One real quick-config training run (all three architectures), shared by many tests."""
    from catdog.config import load_config
    from catdog.train_job import run_training

    root = tmp_path_factory.mktemp("runs")
    # The report and validation-study tests read this run: keep both, with a second test-time size for
    # the study to choose from.  fp32 throughout (quick.yaml's amp: false): tests compare accuracies of
    # the same images scored twice, and bf16 (CPUs with AMX) would move near ties.
    study = {"train.report": True, "train.test_size_factors": "[1.0, 1.25]"}
    cfg = load_config(REPO / "configs" / "quick.yaml", quick_overrides(small_real_data, root, **study))
    best_uri = run_training(cfg)
    return cfg, best_uri


def require_mlflow():
    """The one place tests ask for mlflow (the ``tracking`` extra): a clear skip without it, which
    ``CATDOG_REQUIRE=mlflow`` turns into a failure."""
    require_or_skip("mlflow")
    from catdog.tracking import without_mlflow_telemetry

    without_mlflow_telemetry()  # as the jobs do, before this process imports mlflow
    import mlflow

    return mlflow


class MlflowServer:
    """``mlflow server`` in its own process on a loopback port: SQLite backend and a proxied
    artifact store (``mlflow-artifacts:``), both under ``root``."""

    def __init__(self, root: Path):
        import socket
        import subprocess
        import sys
        import time
        import urllib.request

        require_mlflow()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = open(root / "mlflow-server.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                "--host=127.0.0.1",
                f"--port={self.port}",
                f"--backend-store-uri=sqlite:///{root / 'mlflow.db'}",
                f"--artifacts-destination={root / 'artifacts'}",
                "--workers=1",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 300  # slow to import on a busy 2-core machine
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"mlflow server did not start on {self.uri}; see {root}") from None
                time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except Exception:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()
