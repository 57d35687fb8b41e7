"""A real two-node Ray cluster on this machine (head + worker node, token auth on), driven through the same
scripts as `make cluster-up / submit-train / submit-predict / cluster-down`.

Everything Ray happens in subprocesses with a scrubbed environment, on its own ports and temp dir, so the
session's embedded Ray (``ray_session``) and the cluster never see each other.  The cluster is always
torn down, also when a test fails.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import posixpath
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import printed_result

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "cluster" / "scripts"
HEAD_CPUS, WORKER_CPUS = 2, 3


@dataclass
class Cluster:
    env: dict[str, str]  # for the cluster scripts
    address: str  # dashboard / job server
    token_file: Path
    head_pid: int
    worker_pid: int
    ray_tmp: str


def free_port_base() -> int:
    """A base port P with P..P+4 free (the scripts' fixed ports), below the ephemeral range."""
    for base in range(24800, 31800, 100):
        ok = True
        for port in range(base, base + 5):
            with socket.socket() as s:
                try:
                    s.bind(("0.0.0.0", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    pytest.fail("no free port range for the test cluster")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any RAY_* setting (ray.init() in this process may have set some)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    sys.stdout.write(f"$ {' '.join(cmd)}  -> {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}\n")
    return result


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def leftovers(ray_tmp: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if ray_tmp.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def api(cluster: Cluster, path: str, token: str | None):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(cluster.address + path, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def overrides(values: dict[str, object]) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def submit(cluster: Cluster, job: str, sets: list[str]) -> subprocess.CompletedProcess:
    """What ``make submit-<job> CONFIG=configs/quick.yaml`` runs."""
    cmd = ["bash", str(SCRIPTS / "submit.sh"), job, "--config", "configs/quick.yaml", *sets]
    return run(cmd, cluster.env, timeout=600)


@contextlib.contextmanager
def started_cluster(cluster_dir: Path, **extra_env: str):
    """Start the two-node cluster through up.sh (``extra_env``: more settings for the scripts and the
    head node's environment) and always tear it down, checking that nothing of it is left."""
    # Short on purpose: Ray's socket paths under it must stay below the 107-byte Unix limit.
    ray_tmp = tempfile.mkdtemp(prefix="catdog-ray-test-")
    env = clean_env(
        CLUSTER_DIR=str(cluster_dir),
        CLUSTER_PORT=str(free_port_base()),
        CLUSTER_TMP=ray_tmp,
        CLUSTER_HEAD_CPUS=str(HEAD_CPUS),
        CLUSTER_WORKER_CPUS=str(WORKER_CPUS),
        CLUSTER_OBJECT_STORE_MB="512",
        CLUSTER_VENV_BIN=str(Path(sys.executable).parent),
        **extra_env,
    )
    state: dict[str, str] = {}
    try:
        up = run(["bash", str(SCRIPTS / "up.sh")], env, timeout=240)
        assert up.returncode == 0, f"cluster-up failed:\n{up.stdout}\n{up.stderr}"
        state = dict(line.split("=", 1) for line in (cluster_dir / "cluster.env").read_text().splitlines() if line)
        yield Cluster(
            env=env,
            address=state["CLUSTER_ADDRESS"],
            token_file=Path(state["TOKEN_FILE"]),
            head_pid=int(state["HEAD_PID"]),
            worker_pid=int(state["WORKER_PID"]),
            ray_tmp=ray_tmp,
        )
    finally:
        down = run(["bash", str(SCRIPTS / "down.sh")], env, timeout=120)
        pids = [int(state[k]) for k in ("HEAD_PID", "WORKER_PID") if k in state]
        deadline = time.monotonic() + 30
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.5)
        survivors = [p for p in pids if alive(p)] + leftovers(ray_tmp + "/")
        for pid in survivors:  # only processes of this cluster: they name its temp dir
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert down.returncode == 0, f"cluster-down failed:\n{down.stdout}\n{down.stderr}"
        assert not survivors, f"cluster-down left processes behind: {survivors}"


WEIGHTS = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
# urllib (torch.hub's downloader) goes through the proxy and finds nothing listening; Ray's own
# connections are local and not proxied.
OFFLINE = "https_proxy=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 no_proxy=127.0.0.1,localhost"


@dataclass
class NodeHomes:
    head: Path  # TORCH_HOME of the head node (and the driver): MobileNetV2's ImageNet weights
    worker: Path  # TORCH_HOME of the worker node: empty


@pytest.fixture(scope="module")
def torch_homes(tmp_path_factory) -> NodeHomes:
    homes = NodeHomes(tmp_path_factory.mktemp("torch-head"), tmp_path_factory.mktemp("torch-worker"))
    weights = homes.head / "hub" / "checkpoints" / posixpath.basename(WEIGHTS.url)
    weights.parent.mkdir(parents=True)
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), weights)  # right shapes, random values
    return homes


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, torch_homes):
    """One cluster for the module (each start is two Ray nodes).  Only the head node has the ImageNet
    weights: the worker node gets its own empty ``TORCH_HOME`` and no way out to download them, as an
    air-gapped GPU node would (the per-node ``init`` check's case); every other test trains from scratch."""
    with started_cluster(
        tmp_path_factory.mktemp("cluster"),
        TORCH_HOME=str(torch_homes.head),
        CLUSTER_WORKER_ENV=f"TORCH_HOME={torch_homes.worker} {OFFLINE}",
    ) as running:
        yield running


def test_two_nodes_behind_token_auth(cluster, tmp_path):
    token = cluster.token_file.read_text().strip()
    assert cluster.token_file.stat().st_mode & 0o077 == 0, "token file must be private"
    assert cluster.address.startswith("http://127.0.0.1:")

    nodes = api(cluster, "/api/v0/nodes?limit=100&detail=true", token)["data"]["result"]["result"]
    alive_nodes = [n for n in nodes if n["state"] == "ALIVE"]
    assert len(alive_nodes) == 2
    assert sum(n["resources_total"].get("CPU", 0) for n in alive_nodes) == HEAD_CPUS + WORKER_CPUS
    assert sum(bool(n["is_head_node"]) for n in alive_nodes) == 1

    # Raw HTTP without a token, and with a wrong one.
    for bad in (None, "0" * 64):
        with pytest.raises(urllib.error.HTTPError) as refused:
            api(cluster, "/api/jobs/", bad)
        assert refused.value.code in (401, 403)

    # The ray CLI: no token anywhere (empty HOME, so no ~/.ray/auth_token), then a wrong token.
    home = tmp_path / "home"
    home.mkdir()
    ray_cli = str(Path(sys.executable).parent / "ray")
    unauthenticated = [ray_cli, "job", "submit", "--address", cluster.address, "--no-wait", "--", "echo", "hi"]
    for extra in ({}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}):
        result = run(unauthenticated, clean_env(HOME=str(home), **extra), timeout=60)
        assert result.returncode != 0
        assert "Authentication" in result.stdout + result.stderr
    jobs = api(cluster, "/api/jobs/", token)
    assert not [job for job in jobs if job["entrypoint"] == "echo hi"], "a refused submit created a job"


def test_train_and_predict_jobs(cluster, small_real_data, tmp_path):
    storage = tmp_path / "runs"
    sets = overrides(
        {
            "data.train": small_real_data / "train",
            "data.test": small_real_data / "test1",
            "storage.root": storage,
            "run_name": "cluster",
            "models": "[sequential_cnn]",  # one architecture keeps this test short
            "train.report": "false",
            # What runs where does not depend on how much: 96 images at 32 px, a short epoch.
            "data.limit": 96,
            "data.image_size": 32,
        }
    )

    train = submit(cluster, "train", sets)
    assert train.returncode == 0, "train job did not succeed"
    best = storage / "cluster" / "best.json"
    assert printed_result(train.stdout) == str(best)
    assert json.loads(best.read_text())
    # Two nodes in name only would prove nothing: some of the job's work ran on the worker node.
    token = cluster.token_file.read_text().strip()
    nodes = api(cluster, "/api/v0/nodes?limit=100&detail=true", token)["data"]["result"]["result"]
    worker_node = next(n["node_id"] for n in nodes if n["state"] == "ALIVE" and not n["is_head_node"])
    tasks = api(cluster, "/api/v0/tasks?limit=10000&detail=true", token)["data"]["result"]["result"]
    on_worker = sorted({t["name"] for t in tasks if t.get("node_id") == worker_node})
    assert on_worker, "no task or actor of the train job ran on the worker node"
    # Jobs on a cluster keep Ray Train's defaults: only an embedded Ray drops the preemption watcher.
    actors = api(cluster, "/api/v0/actors?limit=10000&detail=true", token)["data"]["result"]["result"]
    assert "PreemptionWatcher" in {actor["class_name"] for actor in actors}

    predict = submit(cluster, "predict", sets)
    assert predict.returncode == 0, "predict job did not succeed"
    submission = storage / "cluster" / "submission.csv"
    assert printed_result(predict.stdout) == str(submission)
    with submission.open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "label"]
    test_ids = sorted(int(p.stem) for p in (small_real_data / "test1").glob("*.jpg"))
    assert sorted(int(r[0]) for r in rows[1:]) == test_ids
    assert {r[1] for r in rows[1:]} <= {"0", "1"}


PLACEMENT_PROBE = """
import json, logging, os
import ray
from catdog.config import CatdogConfig
from catdog.runtime import ResourceError, check_predict_resources, check_train_resources

warnings = []
handler = logging.Handler()
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger("catdog.runtime").addHandler(handler)
logging.getLogger("catdog.runtime").setLevel(logging.WARNING)
ray.init()


def attempt(check, autoscaling=False, **sections):
    warnings.clear()
    os.environ.pop("CATDOG_AUTOSCALING_CLUSTER", None)
    if autoscaling:
        os.environ["CATDOG_AUTOSCALING_CLUSTER"] = "1"
    try:
        check(CatdogConfig.model_validate(sections))
        outcome = "ok"
    except ResourceError as exc:
        outcome = f"refused: {exc}"
    return {"outcome": outcome, "warnings": list(warnings)}


print("PROBE " + json.dumps({
    "train 1x4": attempt(check_train_resources, train={"cpus_per_worker": 4}),
    "train 1x4 autoscaling": attempt(check_train_resources, True, train={"cpus_per_worker": 4}),
    "predict 1x4": attempt(check_predict_resources, predict={"cpus_per_actor": 4}),
    "predict 1x4 autoscaling": attempt(check_predict_resources, True, predict={"cpus_per_actor": 4}),
    "train 1x3": attempt(check_train_resources, train={"cpus_per_worker": 3}),
    "train 2x1": attempt(check_train_resources, train={"num_workers": 2}),
    "train 5x1": attempt(check_train_resources, train={"num_workers": 5}),
    "predict 5x1": attempt(check_predict_resources, predict={"concurrency": 5}),
    "predict decode 4": attempt(check_predict_resources, data={"decode_threads": 4}),
    "predict decode 4 autoscaling": attempt(check_predict_resources, True, data={"decode_threads": 4}),
    "train 3x1 decode 3": attempt(check_train_resources, train={"num_workers": 3}, data={"decode_threads": 3}),
}))
"""


def test_train_that_fits_the_cluster_total_but_no_single_node_fails_naming_it(cluster, small_real_data, tmp_path):
    """5 CPUs in all (2 + 3), but no node has the 4 one worker asks for: exit 2 up front, not a wait
    forever, and the job's failure fails ``ray job submit``."""
    sets = overrides(
        {
            "data.train": small_real_data / "train",
            "storage.root": tmp_path / "runs",
            "models": "[sequential_cnn]",
            "train.cpus_per_worker": 4,
        }
    )
    result = submit(cluster, "train", sets)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "FAILED" in result.stderr
    assert "error: train needs a node with 4 CPUs and 0 GPUs for each worker but the Ray cluster has 5 CPUs" in output
    assert "CATDOG_AUTOSCALING_CLUSTER=1" in output
    assert not (tmp_path / "runs" / "quick" / "sequential_cnn").exists()


def test_placement_checks_on_two_nodes_autoscaling_bypass_and_no_cpu_left_warning(cluster, tmp_path):
    """The placement rules on a real two-node cluster (probe job through the job server)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "probe.py").write_text(PLACEMENT_PROBE)
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(cluster.token_file))
    ray_cli = str(Path(sys.executable).parent / "ray")
    cmd = [ray_cli, "job", "submit", "--address", cluster.address, "--working-dir", str(probe), "--", "python"]
    result = run([*cmd, "probe.py"], env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("PROBE "))
    found = json.loads(line[len("PROBE ") :])
    for job, unit in (("train", "worker"), ("predict", "predictor actor")):
        refused = found[f"{job} 1x4"]["outcome"]
        assert refused.startswith(f"refused: {job} needs a node with 4 CPUs and 0 GPUs for each {unit}"), refused
        assert "the Ray cluster has 5 CPUs and 0 GPUs" in refused
        assert found[f"{job} 1x4 autoscaling"] == {"outcome": "ok", "warnings": []}
    assert found["train 1x3"] == {"outcome": "ok", "warnings": []}  # fits the 3-CPU worker node
    assert found["train 2x1"] == {"outcome": "ok", "warnings": []}
    for case, who in (("train 5x1", "Train workers"), ("predict 5x1", "Predictor actors")):
        assert found[case]["outcome"] == "ok"
        assert [w.split(";")[0] for w in found[case]["warnings"]] == [f"{who} take all 5 CPUs"], found[case]
        assert "Ray Data will have none left to decode images" in found[case]["warnings"][0]
    # A decode task reserves a CPU per data.decode_threads: 4 fit neither node, 3 fit the worker node
    # but not beside three 1-CPU workers.
    refused = found["predict decode 4"]["outcome"]
    assert refused.startswith("refused: predict needs a node with 4 CPUs and 0 GPUs for each decode task"), refused
    assert "lower data.decode_threads" in refused
    assert found["predict decode 4 autoscaling"] == {"outcome": "ok", "warnings": []}
    [warning] = found["train 3x1 decode 3"]["warnings"]
    assert found["train 3x1 decode 3"]["outcome"] == "ok"
    assert warning.startswith("Train workers leave 2 of 5 CPUs, fewer than the 3 each decode task reserves"), warning


def test_init_weights_missing_on_a_worker_node_stop_the_job_before_training(
    cluster, torch_homes, small_real_data, tmp_path
):
    """The driver runs on the head, where the weights are, so only a check on every node can see the
    problem before ``fit()``."""
    storage = tmp_path / "runs"
    sets = overrides(
        {
            "data.train": small_real_data / "train",
            "data.test": small_real_data / "test1",
            "storage.root": storage,
            "run_name": "init-check",
            "models": "[mobilenet_v2]",
            "train.init": "imagenet",
            "train.max_failures": 2,
        }
    )
    result = submit(cluster, "train", sets)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    # One line, exit code 2 (`ray job submit` repeats the job's last log lines when it fails).
    errors = sorted({line for line in output.splitlines() if "error:" in line})
    assert len(errors) == 1, output[-4000:]
    assert str(torch_homes.worker) in errors[0] and "[on node " in errors[0] and "1 of 2 nodes" in errors[0]
    assert "failed with exit code 2" in output
    # Stopped before the run folder was made: no Train worker started, no retry was spent.
    assert not (storage / "init-check").exists()
    assert "training 1 epochs" not in output and "Worker group" not in output
