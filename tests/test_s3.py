"""Object storage end to end against a real S3 API: ``moto_server`` in its own process on a loopback port.

Nothing is mocked inside the test process.  Every job (prepare, train, predict, evaluate) runs on S3
at least once as a real job subprocess (``jobs/*.py``) that starts its own embedded Ray, so its Ray
workers inherit the (dummy) AWS credentials from the job's environment; so do the jobs whose exit
code, error line or environment a test checks.  The other steps of the pipeline call the same catdog
function in the session Ray (``ray_session``; a job subprocess costs some 25-35 CPU seconds of
start-up), whose workers get the same dummy credentials from its runtime_env
(``conftest.S3_TEST_CREDENTIALS``) and this process from :func:`s3_credentials`.  The credentials
are only ever environment variables, never config files or arguments.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, S3_TEST_CREDENTIALS, printed_result, set_args, write_image

from catdog.config import load_config
from catdog.models import build_model, check_init, load_weights_file
from catdog.predict_job import run_predict
from catdog.shards import run_prepare
from catdog.storage import S3_REQUEST_TIMEOUT_S, Storage, StorageError, StorageNotFound
from catdog.train_job import prepare_run, run_training

MOTO_SERVER = Path(sys.executable).parent / "moto_server"
REGION = "us-east-1"
# Dummy credentials for the local moto server; they exist only in the environment of these tests.
CREDENTIALS = S3_TEST_CREDENTIALS
_AWS_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """``moto_server`` as a separate process; ``auth=True`` enforces IAM, so unknown keys are refused."""

    def __init__(self, log: Path, auth: bool = False):
        if not MOTO_SERVER.exists():
            pytest.skip(f"{MOTO_SERVER} not found: install the dev extras (moto[server])")
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if auth else {})}
        self.log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.port)], stdout=self.log, stderr=self.log, env=env
        )
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # any HTTP answer (403 with auth on) means it is up
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not start on {self.endpoint}; see {log}") from None
                time.sleep(0.2)

    def fs(self) -> pafs.S3FileSystem:
        """A filesystem for the test's own checks (explicit dummy keys, bucket creation allowed)."""
        return pafs.S3FileSystem(
            access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region=REGION,
            endpoint_override=f"127.0.0.1:{self.port}",
            scheme="http",
            allow_bucket_creation=True,
        )

    def bucket(self, prefix: str = "catdog") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.fs().create_dir(name)
        return name

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto_server.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3_auth_server(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto-auth") / "moto_server.log", auth=True)
    yield server
    server.stop()


def job_env() -> dict[str, str]:
    """The environment of a job subprocess: ours, plus the dummy credentials, and no cluster to join."""
    env = {k: v for k, v in os.environ.items() if k not in (*_AWS_UNSET, "RAY_ADDRESS")}
    return {**env, **CREDENTIALS, "AWS_DEFAULT_REGION": REGION}


@contextlib.contextmanager
def s3_credentials(cwd: Path | None = None):
    """This process's environment as a job's (:func:`job_env`) while a job runs in-process, in
    ``cwd`` if given.  The session Ray's workers have the credentials from its runtime_env."""
    with pytest.MonkeyPatch.context() as patch:
        for key in (*_AWS_UNSET, "AWS_DEFAULT_REGION"):
            patch.delenv(key, raising=False)
        for key, value in {**CREDENTIALS, "AWS_DEFAULT_REGION": REGION}.items():
            patch.setenv(key, value)
        if cwd is not None:
            patch.chdir(cwd)
        yield


@pytest.fixture
def s3_env():
    with s3_credentials():
        yield


@pytest.fixture
def bucket(s3_server, s3_env) -> str:
    return s3_server.bucket()


def keys(server: MotoServer, prefix: str) -> list[str]:
    """Every object key under ``bucket/prefix`` (relative), straight from the server."""
    infos = server.fs().get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(i.path[len(prefix) :].lstrip("/") for i in infos if i.type == pafs.FileType.File)


def read_object(server: MotoServer, path: str) -> bytes:
    with server.fs().open_input_stream(path) as stream:
        return stream.read()


def run_job(
    job: str, *args: str, cwd: Path, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / job), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env or job_env(),
    )


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


# -- the storage layer against S3 (no Ray) ----------------------------------------------------------


def test_storage_round_trip_and_atomic_writes_on_s3(s3_server, bucket):
    storage = Storage(endpoint_url=s3_server.endpoint)
    uri = f"s3://{bucket}/run/sub/best.json"
    storage.write_text(uri, '{"a": 1}')
    storage.write_text(uri, '{"a": 2}')  # overwrite through a temporary key
    assert storage.read_text(uri) == '{"a": 2}'
    assert storage.exists(uri) and storage.is_dir(f"s3://{bucket}/run") and not storage.exists(uri + "x")
    # Only the object itself: no temporary keys left, no folder marker objects.
    assert keys(s3_server, bucket) == ["run/sub/best.json"]
    assert [storage.uri_of(uri, i.path) for i in storage.list_files(f"s3://{bucket}/run")] == [uri]
    with pytest.raises(StorageNotFound, match=f"s3://{bucket}/nope.json: not found"):
        storage.read_text(f"s3://{bucket}/nope.json")


def test_replace_dir_on_s3_replaces_every_object_and_leaves_no_temporary(s3_server, bucket):
    storage = Storage(endpoint_url=s3_server.endpoint)
    final, tmp = f"s3://{bucket}/out/predictions", f"s3://{bucket}/out/predictions.tmp-1234"
    storage.write_text(f"{final}/part-a.parquet", "old a")
    storage.write_text(f"{final}/part-old.parquet", "old, not in the new output")
    storage.write_text(f"{tmp}/part-a.parquet", "new a")
    storage.write_text(f"{tmp}/part-b.parquet", "new b")
    storage.replace_dir(tmp, final)
    assert keys(s3_server, f"{bucket}/out") == ["predictions/part-a.parquet", "predictions/part-b.parquet"]
    assert storage.read_text(f"{final}/part-a.parquet") == "new a"


def test_restart_moves_the_run_aside_on_s3(s3_server, bucket):
    cfg = load_config(
        REPO / "configs" / "quick.yaml",
        [f"storage.root=s3://{bucket}/runs", f"storage.endpoint_url={s3_server.endpoint}", "run_name=r"],
    )
    storage = Storage.from_config(cfg.storage)
    prepare_run(cfg, storage, restart=False)
    storage.write_text(f"{cfg.run_uri}/resnet18/result.json", "{}")
    prepare_run(cfg, storage, restart=False)  # a plain re-run keeps everything
    assert keys(s3_server, f"{bucket}/runs") == ["r/config.yaml", "r/resnet18/result.json"]
    prepare_run(cfg, storage, restart=True)
    found = keys(s3_server, f"{bucket}/runs")
    aside = [k for k in found if k.startswith("r.old-")]
    assert sorted(k.split("/", 1)[1] for k in aside) == ["config.yaml", "resnet18/result.json"]
    assert [k for k in found if k.startswith("r/")] == ["r/config.yaml"]


def test_init_weights_from_s3(s3_server, bucket):
    storage = Storage(endpoint_url=s3_server.endpoint)
    model = build_model("sequential_cnn")
    out = io.BytesIO()
    torch.save(model.state_dict(), out)
    storage.write_bytes(f"s3://{bucket}/weights/cnn.pt", out.getvalue())
    storage.write_bytes(f"s3://{bucket}/ckpt/epoch_001/model.pt", out.getvalue())
    check_init("sequential_cnn", f"s3://{bucket}/weights/cnn.pt", storage)
    for uri in (f"s3://{bucket}/weights/cnn.pt", f"s3://{bucket}/ckpt/epoch_001"):  # a file or a checkpoint folder
        state = load_weights_file(storage, uri)
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# -- clear, bounded errors -------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["wrong endpoint", "missing bucket", "bad credentials"])
def test_storage_errors_are_one_line_naming_the_uri(case, s3_server, s3_auth_server, bucket):
    endpoint = {
        "wrong endpoint": f"http://127.0.0.1:{free_port()}",
        "missing bucket": s3_server.endpoint,
        "bad credentials": s3_auth_server.endpoint,
    }[case]
    where = f"s3://catdog-no-such-bucket-{uuid.uuid4().hex[:6]}" if case == "missing bucket" else f"s3://{bucket}"
    storage = Storage(endpoint_url=endpoint)
    expected = {"wrong endpoint": "cannot reach the S3 endpoint", "missing bucket": "does not exist"}.get(
        case, "access denied"
    )
    for call in (
        lambda: storage.check_bucket(f"{where}/runs"),
        lambda: storage.read_text(f"{where}/runs/best.json"),
        lambda: storage.write_text(f"{where}/runs/x.txt", "x"),
    ):
        start = time.monotonic()
        with pytest.raises(StorageError) as info:
            call()
        assert time.monotonic() - start < 30
        message = str(info.value)
        assert message.startswith(f"{where}/runs") and expected in message and "\n" not in message
        assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in message


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
def test_endpoint_and_region_come_from_the_environment(variable, s3_server, bucket, monkeypatch):
    monkeypatch.setenv(variable, s3_server.endpoint)
    storage = Storage()  # nothing from the config
    storage.write_text(f"s3://{bucket}/env/x.json", "{}")
    assert keys(s3_server, bucket) == ["env/x.json"] and storage.read_text(f"s3://{bucket}/env/x.json") == "{}"
    assert storage.resolve(f"s3://{bucket}/env")[0].region == "us-east-1"  # AWS_DEFAULT_REGION (s3_env)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    assert Storage().resolve(f"s3://{bucket}/env")[0].region == "eu-west-3"
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    assert Storage().resolve(f"s3://{bucket}/env")[0].region == "us-east-1"  # the default
    assert Storage(region="ap-south-1").resolve(f"s3://{bucket}/env")[0].region == "ap-south-1"


def test_an_endpoint_that_accepts_connections_and_never_answers_fails_in_about_26_s(s3_env):
    """README: each request is bounded (5 s to connect, 8 s without progress, 3 attempts)."""
    accepted: list[socket.socket] = []
    stop = threading.Event()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        server.settimeout(0.2)

        def accept_and_say_nothing():
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    accepted.append(server.accept()[0])

        thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
        thread.start()
        storage = Storage(endpoint_url=f"http://127.0.0.1:{server.getsockname()[1]}")
        start = time.monotonic()
        try:
            with pytest.raises(StorageError) as info:
                storage.check_bucket("s3://catdog-silent/runs")
        finally:
            elapsed = time.monotonic() - start
            stop.set()
            thread.join(timeout=5)
            for conn in accepted:
                conn.close()
    assert len(accepted) >= 3, "the client did not retry on a new connection"
    assert 3 * S3_REQUEST_TIMEOUT_S <= elapsed < 40, elapsed
    message = str(info.value)
    assert message.startswith("s3://catdog-silent/runs") and "\n" not in message


@pytest.fixture(scope="module")
def tiny_bucket(s3_server, tmp_path_factory) -> str:
    """A bucket holding 10 cats and 10 dogs in train/ and 4 unlabelled images in test1/."""
    name = s3_server.bucket("catdog-tiny")
    folder = tmp_path_factory.mktemp("tiny")
    for i in range(10):
        write_image(folder / "train" / f"cat.{i}.jpg", color=(200, 40 + i, 40))
        write_image(folder / "train" / f"dog.{i}.jpg", color=(40, 40 + i, 200))
    for i in range(1, 5):
        write_image(folder / "test1" / f"{i}.jpg")
    pafs.copy_files(str(folder), name, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3_server.fs())
    return name


# Every job and every kind of error once (each kind is checked on every storage call above); train twice
# because a missing bucket stops it at the run root, the other errors at the data folder.
@pytest.mark.parametrize(
    "job, case",
    [
        ("train.py", "missing bucket"),
        ("train.py", "bad credentials"),
        ("predict.py", "wrong endpoint"),
        ("prepare.py", "missing bucket"),
    ],
)
def test_jobs_stop_with_one_error_line_naming_the_uri(job, case, s3_server, s3_auth_server, tiny_bucket, tmp_path):
    endpoint = {
        "wrong endpoint": f"http://127.0.0.1:{free_port()}",
        "missing bucket": s3_server.endpoint,
        "bad credentials": s3_auth_server.endpoint,
    }[case]
    missing = f"catdog-no-such-bucket-{uuid.uuid4().hex[:6]}"
    root = f"s3://{missing if case == 'missing bucket' else tiny_bucket}/runs"
    common = ["--config", str(REPO / "configs" / "quick.yaml"), "--set", f"storage.endpoint_url={endpoint}"]
    if job == "train.py":
        args = [*common, "--set", f"data.train=s3://{tiny_bucket}/train", "--set", f"storage.root={root}"]
        uri = f"{root}/quick" if case == "missing bucket" else f"s3://{tiny_bucket}/train"
    elif job == "predict.py":
        args = [*common, "--set", f"storage.root={root}"]
        uri = f"{root}/quick/best.json"
    else:
        args = [*common, "--input", f"s3://{tiny_bucket}/train", "--output", f"{root}/shards"]
        uri = f"{root}/shards" if case == "missing bucket" else f"s3://{tiny_bucket}/train"
    start = time.monotonic()
    proc = run_job(job, *args, cwd=tmp_path, timeout=120)
    elapsed = time.monotonic() - start
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert uri in lines[0], lines[0]
    expected = {
        "wrong endpoint": "cannot reach the S3 endpoint",
        "missing bucket": f"bucket '{missing}' does not exist",
    }
    assert expected.get(case, "access denied") in lines[0], lines[0]
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in proc.stderr + proc.stdout
    assert elapsed < 60
    assert list(tmp_path.iterdir()) == []  # nothing written to the working folder


# -- prepare -> train -> predict -> evaluate, all on s3:// ---------------------------------------------


def quick_job_args(overrides: list[str]) -> list[str]:
    """A job's command-line arguments for the quick config with ``overrides``."""
    return ["--config", str(REPO / "configs" / "quick.yaml"), *set_args(overrides)]


def s3_config(run: dict, *extra: str):
    """The config that ``python jobs/<job>.py *run["sets"]`` (plus ``--set`` of ``extra``) loads."""
    return load_config(REPO / "configs" / "quick.yaml", [*run["overrides"], *extra])


@pytest.fixture(scope="module")
def s3_run(s3_server, small_real_data, tmp_path_factory, ray_session):
    """Upload the real images, pack them into shards on S3, and train from the shards with every
    output on S3.  Jobs run with an empty working folder, which must stay empty.

    The training images' prepare and the training are job subprocesses (the tests read what they
    print); the test images' prepare runs in-process in the session Ray."""
    name = s3_server.bucket("catdog-e2e")
    fs = s3_server.fs()
    for part in ("train", "test1"):
        pafs.copy_files(
            str(small_real_data / part),
            f"{name}/data/{part}",
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=fs,
        )
    with fs.open_output_stream(f"{name}/data/train/cat.9999.jpg") as stream:
        stream.write(b"\xff\xd8\xff\xe0 truncated")  # one corrupt image: rejected by prepare
    cwd = tmp_path_factory.mktemp("cwd")
    bucket = f"s3://{name}"
    config = [f"storage.endpoint_url={s3_server.endpoint}", "train.report=false"]  # no test here reads the report
    timings = {}
    start = time.monotonic()
    proc = run_job(
        "prepare.py",
        *quick_job_args(config),
        "--input",
        f"{bucket}/data/train",
        "--output",
        f"{bucket}/shards/train",
        "--shard-size",
        "64",
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    timings["prepare train"] = time.monotonic() - start
    prepared = {"train": proc.stdout}
    start = time.monotonic()
    with s3_credentials(cwd):
        test_shards = run_prepare(
            load_config(REPO / "configs" / "quick.yaml", config), f"{bucket}/data/test1", f"{bucket}/shards/test1", 64
        )
    assert test_shards == f"{bucket}/shards/test1"
    timings["prepare test1"] = time.monotonic() - start
    overrides = [
        *config,
        f"storage.root={bucket}/runs",
        "run_name=s3run",
        f"data.train={bucket}/shards/train",
        f"data.test={bucket}/data/test1",
        "data.limit=null",
        "models=[sequential_cnn]",
        "data.image_size=32",  # cheaper epochs and scoring; nothing here depends on the size
    ]
    sets = quick_job_args(overrides)
    start = time.monotonic()
    proc = run_job("train.py", *sets, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    timings["train"] = time.monotonic() - start
    # What the first training left, read now: a later test may train this run further.
    arch = f"{name}/runs/s3run/sequential_cnn"
    trained = {
        "keys": keys(s3_server, f"{name}/runs/s3run"),
        "best": json.loads(read_object(s3_server, f"{name}/runs/s3run/best.json")),
        "meta": json.loads(read_object(s3_server, f"{arch}/epoch_001/meta.json")),
        "metrics": read_object(s3_server, f"{arch}/metrics.csv").decode(),
        "model_mtime": fs.get_file_info(f"{arch}/epoch_001/model.pt").mtime,
    }
    return {
        "bucket": name,
        "cwd": cwd,
        "overrides": overrides,
        "sets": sets,
        "train": proc,
        "trained": trained,
        "prepared": prepared,
        "timings": timings,
    }


def assert_nothing_local(run: dict) -> None:
    assert list(run["cwd"].iterdir()) == [], "a job wrote into its working folder"
    assert not (REPO / "runs" / "s3run").exists()


@pytest.mark.slow
def test_prepare_on_s3_packs_validates_and_reports(s3_server, s3_run):
    name = s3_run["bucket"]
    train_keys = keys(s3_server, f"{name}/shards/train")
    assert train_keys == ["_catdog_shards.json", "rejected.parquet"] + [f"shard-{i:05d}.parquet" for i in range(7)]
    marker = json.loads(read_object(s3_server, f"{name}/shards/train/_catdog_shards.json"))
    assert marker["images"] == 400 and marker["rejected"] == 1 and marker["source"] == f"s3://{name}/data/train"
    rejected = pq.read_table(io.BytesIO(read_object(s3_server, f"{name}/shards/train/rejected.parquet")))
    assert rejected.column("name").to_pylist() == ["cat.9999.jpg"] and rejected.column("reason")[0].as_py()
    assert "400 packed in 7 shards" in s3_run["prepared"]["train"] and "1 rejected" in s3_run["prepared"]["train"]
    assert "rejected: cat.9999.jpg: " in s3_run["prepared"]["train"]
    assert_nothing_local(s3_run)


@pytest.mark.slow
def test_train_from_shards_on_s3_writes_every_output_to_the_bucket(s3_server, s3_run):
    name = s3_run["bucket"]
    assert printed_result(s3_run["train"].stdout) == f"s3://{name}/runs/s3run/best.json"
    found = s3_run["trained"]["keys"]
    for key in (
        "config.yaml",
        "leaderboard.csv",
        "best.json",
        "sequential_cnn/metrics.csv",
        "sequential_cnn/result.json",
        "sequential_cnn/epoch_001/model.pt",
        "sequential_cnn/epoch_001/meta.json",
        "sequential_cnn/epoch_001/train_state.pt",
    ):
        assert key in found, (key, found)
    best = s3_run["trained"]["best"]
    assert best["checkpoint"] == f"s3://{name}/runs/s3run/sequential_cnn/epoch_001"
    meta = s3_run["trained"]["meta"]
    assert meta["arch"] == "sequential_cnn" and [h["epoch"] for h in meta["history"]] == [1]
    assert not [k for k in found if ".tmp-" in k]
    assert_nothing_local(s3_run)


@pytest.mark.slow
def test_predict_and_evaluate_on_s3_folder_and_shards_agree(s3_server, s3_run):
    """Both predicts run in-process (the session Ray); evaluate is this file's evaluate job subprocess."""
    name, cwd, sets = s3_run["bucket"], s3_run["cwd"], s3_run["sets"]
    bucket = f"s3://{name}"
    submission = f"{bucket}/runs/s3run/submission.csv"
    with s3_credentials(cwd):
        assert run_predict(s3_config(s3_run)) == submission
    from_folder = read_object(s3_server, f"{name}/runs/s3run/submission.csv").decode()
    assert from_folder.splitlines()[0] == "id,label" and len(from_folder.splitlines()) == 121
    # The same model over the test shards, into the same run: predictions/ is replaced, not appended to.
    with s3_credentials(cwd):
        assert run_predict(s3_config(s3_run), input_uri=f"{bucket}/shards/test1") == submission
    assert read_object(s3_server, f"{name}/runs/s3run/submission.csv").decode() == from_folder
    parts = [k for k in keys(s3_server, f"{name}/runs/s3run/predictions") if k.endswith(".parquet")]
    rows = sum(
        pq.read_metadata(io.BytesIO(read_object(s3_server, f"{name}/runs/s3run/predictions/{k}"))).num_rows
        for k in parts
    )
    assert parts and rows == 120
    evaluate = run_job("evaluate.py", *sets, "--input", f"{bucket}/shards/train", cwd=cwd)
    assert evaluate.returncode == 0, evaluate.stderr[-4000:]
    metrics = json.loads(read_object(s3_server, f"{name}/runs/s3run/evaluate/metrics.json"))
    assert metrics["n_images"] == 400 and metrics["n_unreadable"] == 1 and 0 <= metrics["accuracy"] <= 1
    assert metrics["input"] == f"{bucket}/shards/train"
    assert not [k for k in keys(s3_server, name) if ".tmp-" in k]
    assert_nothing_local(s3_run)


@pytest.mark.slow
def test_predict_with_model_and_output_on_s3_and_the_endpoint_from_the_environment(s3_server, s3_run):
    """This file's predict job subprocess: the endpoint and region come from the job's environment."""
    name, cwd = s3_run["bucket"], s3_run["cwd"]
    bucket = f"s3://{name}"
    sets = [a for pair in zip(s3_run["sets"][::2], s3_run["sets"][1::2]) if "endpoint_url" not in pair[1] for a in pair]
    assert sets != s3_run["sets"]
    env = {k: v for k, v in job_env().items() if k != "AWS_DEFAULT_REGION"}
    env.update(AWS_ENDPOINT_URL_S3=s3_server.endpoint, AWS_REGION=REGION)
    model = f"{bucket}/runs/s3run/sequential_cnn/epoch_001"
    output = f"{bucket}/elsewhere/scored"
    in_run_before = keys(s3_server, f"{name}/runs/s3run")
    proc = run_job(
        "predict.py", *sets, "--model", model, "--input", f"{bucket}/data/test1", "--output", output, cwd=cwd, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert printed_result(proc.stdout) == f"{output}/submission.csv"
    found = keys(s3_server, f"{name}/elsewhere/scored")
    assert "submission.csv" in found and any(k.startswith("predictions/") and k.endswith(".parquet") for k in found)
    submission = read_object(s3_server, f"{name}/elsewhere/scored/submission.csv").decode().splitlines()
    assert submission[0] == "id,label" and len(submission) == 121
    parts = [k for k in found if k.endswith(".parquet")]
    models = set()
    for part in parts:
        models |= set(
            pq.read_table(io.BytesIO(read_object(s3_server, f"{name}/elsewhere/scored/{part}")))
            .column("model")
            .to_pylist()
        )
    assert models == {"sequential_cnn:epoch_001"}
    assert keys(s3_server, f"{name}/runs/s3run") == in_run_before  # nothing written into the run
    assert_nothing_local(s3_run)


@pytest.mark.slow
def test_rerun_with_one_more_epoch_resumes_from_the_checkpoint_in_the_bucket(s3_server, s3_run):
    arch = f"{s3_run['bucket']}/runs/s3run/sequential_cnn"

    def metrics() -> list[dict]:
        return list(csv.DictReader(io.StringIO(read_object(s3_server, f"{arch}/metrics.csv").decode())))

    first = list(csv.DictReader(io.StringIO(s3_run["trained"]["metrics"])))
    assert [int(r["epoch"]) for r in first] == [1]
    stamp = s3_run["trained"]["model_mtime"]
    with s3_credentials(s3_run["cwd"]):  # in-process, in the session Ray
        best_uri = run_training(s3_config(s3_run, "train.epochs=2"))
    assert best_uri == f"s3://{s3_run['bucket']}/runs/s3run/best.json"
    second = metrics()
    assert [int(r["epoch"]) for r in second] == [1, 2] and second[:1] == first
    assert s3_server.fs().get_file_info(f"{arch}/epoch_001/model.pt").mtime == stamp
    assert "epoch_002/model.pt" in keys(s3_server, arch)
    assert json.loads(read_object(s3_server, f"{arch}/result.json"))["epochs"] == 2
    assert_nothing_local(s3_run)


@pytest.mark.slow
def test_train_from_an_image_folder_on_s3(s3_server, s3_run):
    """The same training straight from the uploaded image folder, no prepare step: same split as the
    shards.  In-process, in the session Ray (the shards' training is the job subprocess)."""
    name = s3_run["bucket"]
    with s3_credentials(s3_run["cwd"]):
        best_uri = run_training(s3_config(s3_run, "run_name=s3folder", f"data.train=s3://{name}/data/train"))
    assert best_uri == f"s3://{name}/runs/s3folder/best.json"
    best = json.loads(read_object(s3_server, f"{name}/runs/s3folder/best.json"))
    assert best["checkpoint"] == f"s3://{name}/runs/s3folder/sequential_cnn/epoch_001"

    def first_epoch(run: str) -> dict:
        text = read_object(s3_server, f"{name}/runs/{run}/sequential_cnn/metrics.csv").decode()
        return next(csv.DictReader(io.StringIO(text)))

    folder, shards = first_epoch("s3folder"), first_epoch("s3run")
    # The corrupt cat.9999.jpg is skipped and counted either way (shards keep rejects as error rows).
    for run in (folder, shards):
        assert int(run["unreadable_images"]) == 1
        assert int(run["train_images"]) + int(run["val_images"]) == 400
    assert folder["val_images"] == shards["val_images"]
    assert_nothing_local(s3_run)
