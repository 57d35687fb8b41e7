"""Scaled batch scoring: a killed predict leaves the previous result whole and resumes, reruns score
only new or changed images, a model change re-scores everything, the same on S3 (ETags), and
planning holds no Python object per file."""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO
from PIL import Image

from catdog.checkpoints import save_checkpoint
from catdog.config import load_config
from catdog.data import image_dataset, list_table
from catdog.images import LISTING_SCHEMA, id_from_path, label_from_path
from catdog.models import build_model
from catdog.predict_job import run_predict
from catdog.presets import EvalPreset
from catdog.scoring_plan import PARTIAL, PARTS, PREDICTION_SCHEMA, commit_part, make_plan, promote
from catdog.storage import Storage

STORAGE = Storage()
SUMMARY = re.compile(r"^predict: scored (\d+), reused (\d+), removed (\d+) of (\d+) images")


def summary(stdout: str) -> dict[str, int]:
    """The counts of the job's own summary line."""
    for line in reversed(stdout.splitlines()):
        match = SUMMARY.match(line.strip())
        if match:
            return dict(zip(("scored", "reused", "removed", "total"), map(int, match.groups())))
    raise AssertionError(f"no summary line in:\n{stdout[-3000:]}")


def predicted(capsys, cfg, model: Path, images, out, **options) -> dict[str, int]:
    """``run_predict`` in this process and the session Ray: the counts of its summary line."""
    capsys.readouterr()
    run_predict(cfg, str(model), str(images), str(out), **options)
    return summary(capsys.readouterr().out)


def fresh_checkpoint(folder: Path, seed: int) -> Path:
    """An untrained Sequential CNN at 64 px: different seeds give different probabilities."""
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    model = build_model("sequential_cnn")
    cfg = {"arch": "sequential_cnn", "image_size": 64, "config_hash": f"seed{seed}", "run_name": "test"}
    save_checkpoint(
        str(folder), model, torch.optim.SGD(model.parameters(), lr=0.1), cfg=cfg, epoch=0, step=0, history=[{}]
    )
    return folder


def small_copies(src: Path, dst: Path, ids: range) -> Path:
    """Real test images, shrunk to 64 px so that scoring a few thousand stays cheap."""
    dst.mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.open(src / f"{i}.jpg").convert("RGB").resize((64, 64)).save(dst / f"{i}.jpg", quality=90)
    return dst


def config(root: Path, *extra: str):
    sets = [f"storage.root={root}", "predict.batch_size=32", "data.decode_batch_size=32", "ray.num_cpus=3", *extra]
    return load_config(REPO / "configs" / "quick.yaml", sets)


def submission(path: Path) -> dict[int, str]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    return {int(r[0]): r[1] for r in rows}


def assert_same_predictions(a: Path, b: Path) -> None:
    """The same rows, probabilities equal to within float tolerance, the same labels and errors."""
    left, right = pq.read_table(a).sort_by("path"), pq.read_table(b).sort_by("path")
    assert left["path"].to_pylist() == right["path"].to_pylist()
    assert left["error"].to_pylist() == right["error"].to_pylist()
    p, q = (np.array(t["prob_dog"].to_pylist(), dtype=float) for t in (left, right))
    assert np.allclose(p, q, atol=1e-5, equal_nan=True)
    assert left["label"].to_pylist() == right["label"].to_pylist()


# -- planning at scale (no images needed) ------------------------------------------------------------


def synthetic_listing(n: int, root: str = "/data/bucket") -> pa.Table:
    ids = np.arange(n, dtype=np.int64)
    paths = pa.array(np.char.add(np.char.add(f"{root}/", ids.astype(str)), ".jpg"))
    return pa.table(
        {
            "path": paths,
            "size": pa.array(np.full(n, 20_000, dtype=np.int64)),
            "version": pa.array(np.full(n, "1700000000000000000")),
            "id": pa.array(ids),
            "label": pa.nulls(n, pa.int8()),
        },
        schema=LISTING_SCHEMA,
    )


def test_planning_50k_entries_keeps_no_python_object_per_file(tmp_path, ray_session):
    """Plan 50k listed files against 45k earlier results and 2k committed parts, and hand the rest to
    Ray Data.  One dict per file would be ~15 MB of Python objects; Arrow buffers are not counted."""
    n = 50_000
    listing = synthetic_listing(n)
    out = tmp_path / "out"
    earlier = listing.slice(0, 45_000).select(["path", "size", "version"])
    (out / "predictions").mkdir(parents=True)
    pq.write_table(earlier.append_column("scoring", pa.array(np.full(45_000, "fp"))), out / "predictions" / "a.parquet")
    (out / PARTIAL / PARTS).mkdir(parents=True)
    (out / PARTIAL / "state.json").write_text('{"scoring": "fp"}\n')
    pq.write_table(
        listing.slice(45_000, 2_000).select(["path", "size", "version"]), out / PARTIAL / PARTS / "p.parquet"
    )
    image_dataset(STORAGE, listing.slice(0, 10), EvalPreset(64))  # imports and first-call set-up, not per row
    tracemalloc.start()
    plan = make_plan(STORAGE, listing.select(["path", "size", "version", "id"]), str(out), "fp", full=False)
    ds = image_dataset(STORAGE, plan.to_score, EvalPreset(64), batch_size=64)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert (plan.reused, plan.resumed, plan.removed, plan.to_score.num_rows) == (45_000, 2_000, 0, 3_000)
    assert plan.to_score["path"].to_pylist()[0] == "/data/bucket/47000.jpg"
    assert ds is not None and peak < 6 * 2**20, f"planning allocated {peak / 2**20:.1f} MiB of Python objects"


@pytest.mark.parametrize("collide", [False, True])
def test_a_changed_file_is_scored_again_even_when_key_hashes_collide(tmp_path, monkeypatch, collide):
    """Planning matches rows on 64-bit key hashes; with every hash equal (``collide``) it must still
    reuse only exact (path, size, version) matches."""
    from catdog import key_match

    if collide:
        monkeypatch.setattr(key_match, "key_hashes", lambda table: np.zeros(table.num_rows, dtype=np.uint64))
    listing = synthetic_listing(6).select(["path", "size", "version", "id"])
    earlier = synthetic_listing(7).select(["path", "size", "version"]).to_pylist()
    earlier[1]["version"] = "1700000000000000001"  # 1.jpg changed since
    earlier[2]["size"] = 1  # so did 2.jpg
    del earlier[4]  # 4.jpg is new; 6.jpg is gone
    out = tmp_path / "out"
    (out / "predictions").mkdir(parents=True)
    rows = [dict(r, scoring="other" if r["path"].endswith("/3.jpg") else "fp") for r in earlier]
    pq.write_table(pa.Table.from_pylist(rows), out / "predictions" / "a.parquet")
    plan = make_plan(STORAGE, listing, str(out), "fp", full=False)
    names = [Path(p).name for p in plan.to_score["path"].to_pylist()]
    assert names == ["1.jpg", "2.jpg", "3.jpg", "4.jpg"]
    assert (plan.reused, plan.resumed, plan.removed) == (2, 0, 1)


def scored_rows(listing: pa.Table, prob_dog: float) -> pa.Table:
    """What the predictor hands to ``commit_part`` for ``listing``: every row scored ``prob_dog``."""
    n = listing.num_rows
    columns = {
        "id": listing["id"],
        "path": listing["path"],
        "prob_dog": pa.array(np.full(n, prob_dog, dtype=np.float32)),
        "label": pa.array(np.zeros(n, dtype=np.int8)),
        "model": pa.array(["m"] * n),
        "error": pa.nulls(n, pa.string()),
        "size": listing["size"],
        "version": listing["version"],
    }
    return pa.table(columns, schema=pa.schema([f for f in PREDICTION_SCHEMA if f.name != "scoring"]))


def test_full_replaces_earlier_rows_and_a_merge_keeps_one_row_per_path(tmp_path):
    """``--full`` must keep this run's scores, not the earlier ones; and rows repeated in
    ``predictions/`` (old and new objects side by side after an S3 copy killed half-way) must not
    survive the next merge."""
    listing = synthetic_listing(4).select(["path", "size", "version", "id"])
    out = tmp_path / "out"
    (out / "predictions").mkdir(parents=True)
    earlier = scored_rows(listing, 0.1).append_column("scoring", pa.array(["fp"] * 4))
    pq.write_table(earlier, out / "predictions" / "part-00000.parquet")
    pq.write_table(earlier.slice(0, 2), out / "predictions" / "part-00001.parquet")  # the stale object

    plan = make_plan(STORAGE, listing, str(out), "fp", full=False)
    assert (plan.reused, plan.to_score.num_rows) == (4, 0)
    assert promote(STORAGE, plan, 0.5) == 4
    merged = pq.read_table(out / "predictions")
    assert sorted(merged["path"].to_pylist()) == sorted(listing["path"].to_pylist())

    plan = make_plan(STORAGE, listing, str(out), "fp", full=True)
    assert (plan.reused, plan.to_score.num_rows) == (0, 4)
    commit_part(scored_rows(plan.to_score, 0.9), STORAGE, plan.parts_uri, "fp")
    assert promote(STORAGE, plan, 0.5) == 4
    rescored = pq.read_table(out / "predictions")
    assert rescored["prob_dog"].to_pylist() == pytest.approx([0.9] * 4)
    assert rescored["label"].to_pylist() == [1] * 4


def test_listing_columns_match_the_per_name_rules(tmp_path):
    folder = tmp_path / "in"
    for name in (
        "1.jpg",
        "2.PNG",
        "cat.3.jpg",
        "Dog.4.jpeg",
        "cats/a.jpg",
        "12.tar.jpg",
        "x.txt",
        ".5.jpg",
        ".h/9.jpg",
        "000000000000000000000042.jpg",  # leading zeros: id 42
        "9223372036854775807.jpg",  # int64's largest
        "9223372036854775808.jpg",  # one more: no id
        "20240101120000123456.jpg",  # a 20-digit timestamp: no id, and no failed listing
    ):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x" * len(name))
    table, shards = list_table(STORAGE, str(folder))
    assert shards is None and table.schema.equals(LISTING_SCHEMA)
    rows = table.to_pylist()
    long_ids = ["000000000000000000000042.jpg", "9223372036854775807.jpg", "9223372036854775808.jpg"]
    names = ["1.jpg", "12.tar.jpg", "2.PNG", "20240101120000123456.jpg", "Dog.4.jpeg", "cat.3.jpg", "a.jpg"]
    assert [Path(r["path"]).name for r in rows] == sorted(long_ids + names[:4]) + names[4:]
    assert {Path(r["path"]).name: r["id"] for r in rows if Path(r["path"]).name in long_ids} == dict(
        zip(long_ids, [42, 2**63 - 1, None])
    )
    for row in rows:
        assert (row["id"], row["label"]) == (id_from_path(row["path"]), label_from_path(row["path"]))
        assert row["size"] == os.stat(row["path"]).st_size and row["version"] == str(os.stat(row["path"]).st_mtime_ns)


# -- real runs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ck")
    return fresh_checkpoint(root / "a", seed=0), fresh_checkpoint(root / "b", seed=1)


@pytest.mark.slow
def test_incremental_rerun_scores_only_new_images_drops_removed_ones_and_a_model_change_rescores_all(
    data_dir, checkpoints, tmp_path, ray_session, capsys
):
    # 100 images, then 50 added and 20 removed: several batches a run, and none of the 7 runs scores
    # more than 130 images.
    images = small_copies(data_dir / "test1", tmp_path / "in", range(1, 101))
    cfg, out = config(tmp_path), tmp_path / "out"

    def run(checkpoint: Path = checkpoints[0], **options) -> dict[str, int]:
        return predicted(capsys, cfg, checkpoint, images, out, **options)

    assert run() == {"scored": 100, "reused": 0, "removed": 0, "total": 100}
    first = pq.read_table(out / "predictions").sort_by("path")
    small_copies(data_dir / "test1", images, range(101, 151))
    removed = list(range(1, 21))
    for i in removed:
        (images / f"{i}.jpg").unlink()
    assert run() == {"scored": 50, "reused": 80, "removed": 20, "total": 130}
    rows = submission(out / "submission.csv")
    assert len(rows) == 130 and not set(removed) & set(rows) and set(range(101, 151)) <= set(rows)
    kept = pq.read_table(out / "predictions").sort_by("path")
    old = {p: v for p, v in zip(first["path"].to_pylist(), first["prob_dog"].to_pylist())}
    assert all(old[p] == v for p, v in zip(kept["path"].to_pylist(), kept["prob_dog"].to_pylist()) if p in old)
    # A changed file (same name, new bytes) is scored again; nothing else is.
    Image.open(data_dir / "test1" / "999.jpg").convert("RGB").resize((64, 64)).save(images / "100.jpg")
    assert run() == {"scored": 1, "reused": 129, "removed": 0, "total": 130}
    # A threshold change recomputes labels without scoring; --full scores everything.
    cfg = config(tmp_path, "predict.threshold=0.9")  # noqa: F841 - read by run()
    assert run() == {"scored": 0, "reused": 130, "removed": 0, "total": 130}
    table = pq.read_table(out / "predictions")
    probs, labels = table["prob_dog"].to_pylist(), table["label"].to_pylist()
    assert all(label == int(p >= np.float32(0.9)) for p, label in zip(probs, labels) if p is not None)
    assert run(full=True)["scored"] == 130
    assert not (out / PARTIAL).exists()
    # A model change re-scores everything, and so does turning TTA on with the new model.
    before = pq.read_table(out / "predictions").sort_by("path")
    assert run(checkpoints[1]) == {"scored": 130, "reused": 0, "removed": 0, "total": 130}
    after = pq.read_table(out / "predictions").sort_by("path")
    assert set(after["model"].to_pylist()) == {"sequential_cnn:b"}
    assert before["prob_dog"].to_pylist() != after["prob_dog"].to_pylist()
    assert run(checkpoints[1], tta=True)["scored"] == 130


def predict_command(cfg_file: Path, model: str, images: str, out: str) -> list[str]:
    job = str(REPO / "jobs" / "predict.py")
    return [sys.executable, job, "--config", str(cfg_file), "--model", model, "--input", images, "--output", out]


def committed_rows(parts: Path) -> int:
    if not parts.is_dir():
        return 0
    return sum(pq.read_metadata(p).num_rows for p in parts.glob("part-*.parquet"))


def seed_previous_result(out: Path) -> dict[str, bytes]:
    """A previous complete result in ``out``: submission.csv and predictions/ of one image,
    ``old/1.jpg``, that no input lists.  Returns its :func:`previous_result`."""
    (out / "predictions").mkdir(parents=True)
    (out / "submission.csv").write_text("id,label\n1,1\n")
    row = {"id": 1, "path": "old/1.jpg", "prob_dog": 0.9, "label": 1, "model": "old", "error": None}
    row |= {column: None for column in ("size", "version", "scoring")}
    pq.write_table(pa.Table.from_pylist([row], schema=PREDICTION_SCHEMA), out / "predictions" / "part-old.parquet")
    return previous_result(out)


def previous_result(out: Path) -> dict[str, bytes]:
    """The bytes of submission.csv and of every file in predictions/, by path under ``out``."""
    files = [out / "submission.csv", *(out / "predictions").iterdir()]
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


@pytest.mark.slow
def test_ids_past_2_to_the_53_stay_exact_beside_names_without_an_id(data_dir, checkpoints, tmp_path, ray_session):
    """A batch holding a name without an id once went through Ray's numpy batches as float64,
    which rounded a nanosecond-timestamp id to its neighbour."""
    big = 2**53 + 1
    images = tmp_path / "in"
    images.mkdir()
    for name in (f"{big}.jpg", "photo.jpg"):
        Image.open(data_dir / "test1" / "1.jpg").convert("RGB").resize((64, 64)).save(images / name)
    out = tmp_path / "out"
    run_predict(config(tmp_path), str(checkpoints[0]), str(images), str(out))
    ids = dict(zip(*pq.read_table(out / "predictions", columns=["path", "id"]).to_pydict().values()))
    assert ids == {str(images / f"{big}.jpg"): big, str(images / "photo.jpg"): None}
    assert list(submission(out / "submission.csv")) == [big]


@pytest.mark.slow
def test_killed_predict_leaves_the_previous_result_resumes_and_ends_equal_to_an_uninterrupted_run(
    data_dir, checkpoints, tmp_path, ray_session, capsys
):
    """SIGKILL the predict job once a third of 2,000 images are committed: the previous submission.csv
    and predictions/ of its output folder are left exactly as they were, never a partial or a mixed
    one; the rerun scores only the rest (its own summary says so) and its outputs equal an
    uninterrupted run's."""
    n = 2000
    images = small_copies(data_dir / "test1", tmp_path / "in", range(1, n + 1))
    cfg = config(tmp_path)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_predict(cfg, str(checkpoints[0]), str(images), str(whole))
    seeded = seed_previous_result(resumed)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(cfg.to_yaml())
    command = predict_command(cfg_file, str(checkpoints[0]), str(images), str(resumed))
    log = open(tmp_path / "killed.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while committed_rows(resumed / PARTIAL / PARTS) < n // 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        at_kill = committed_rows(resumed / PARTIAL / PARTS)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        log.close()
    tail = (tmp_path / "killed.log").read_text()[-3000:]
    assert proc.returncode == -signal.SIGKILL and n // 3 <= at_kill < n, (proc.returncode, at_kill, tail)
    assert previous_result(resumed) == seeded
    # The rerun in this process (what resumes is the folder, not the process): one job start fewer.
    # It drops the previous result's one row, of an image no longer listed.
    counts = predicted(capsys, cfg, checkpoints[0], images, resumed)
    assert counts["total"] == n and counts["scored"] + counts["reused"] == n and counts["removed"] == 1
    assert counts["reused"] >= at_kill and counts["scored"] <= n - at_kill
    assert_same_predictions(whole / "predictions", resumed / "predictions")
    assert submission(whole / "submission.csv") == submission(resumed / "submission.csv")
    assert not (resumed / PARTIAL).exists()


# -- the same on S3 (moto_server), where versions are ETags --------------------------------------------


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    from test_s3 import MotoServer

    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto_server.log")
    yield server
    server.stop()


def s3_committed_rows(fs, prefix: str) -> int:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    parts = [i.path for i in infos if i.type == pafs.FileType.File and i.base_name.startswith("part-")]
    return sum(pq.read_metadata(i, filesystem=fs).num_rows for i in parts)


@pytest.mark.slow
def test_on_s3_reruns_use_etags_and_a_killed_run_resumes(data_dir, checkpoints, moto, tmp_path, ray_session, capsys):
    import pyarrow.fs as pafs
    from test_s3 import job_env, s3_credentials

    fs, name = moto.fs(), moto.bucket("catdog-incr")
    local = small_copies(data_dir / "test1", tmp_path / "in", range(1, 651))
    pafs.copy_files(str(local), f"{name}/in", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    for i in range(601, 651):
        fs.delete_file(f"{name}/in/{i}.jpg")
    cfg = config(tmp_path, f"storage.endpoint_url={moto.endpoint}", "predict.batch_size=16")
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(cfg.to_yaml())
    bucket = f"s3://{name}"

    def predict(model: Path, out: str) -> dict[str, int]:
        """A predict in this process and the session Ray (only the killed one below is a job of its
        own: test_s3 runs predict on S3 as a job)."""
        with s3_credentials(tmp_path):
            return predicted(capsys, cfg, model, f"{bucket}/in", out)

    def read(out: str) -> pa.Table:
        return pq.read_table(f"{out[len('s3://') :]}/predictions", filesystem=fs).sort_by("path")

    out = f"{bucket}/out"
    assert predict(checkpoints[0], out) == {"scored": 600, "reused": 0, "removed": 0, "total": 600}
    # 50 new objects, 20 deleted, one overwritten with other bytes (a new ETag): exactly 51 are scored.
    # (every object is uploaded again: the same bytes keep their ETag and are not scored again)
    pafs.copy_files(str(local), f"{name}/in", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    for i in range(1, 21):
        fs.delete_file(f"{name}/in/{i}.jpg")
    with fs.open_output_stream(f"{name}/in/100.jpg") as stream:
        stream.write((local / "640.jpg").read_bytes())
    assert predict(checkpoints[0], out) == {"scored": 51, "reused": 579, "removed": 20, "total": 630}
    rows = read(out)
    assert rows.num_rows == 630 and not {f"{bucket}/in/{i}.jpg" for i in range(1, 21)} & set(rows["path"].to_pylist())
    with fs.open_input_stream(f"{name}/out/submission.csv") as stream:
        ids = [int(line.split(",")[0]) for line in stream.read().decode().splitlines()[1:]]
    assert len(ids) == 630 and not set(range(1, 21)) & set(ids)
    # A model change re-scores everything; killed once a third is committed, the rerun finishes the rest.
    command = predict_command(cfg_file, str(checkpoints[1]), f"{bucket}/in", out)
    log = open(tmp_path / "killed.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=job_env(), start_new_session=True)
    try:
        deadline = time.time() + 240
        while s3_committed_rows(fs, f"{name}/out/{PARTIAL}") < 210 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        at_kill = s3_committed_rows(fs, f"{name}/out/{PARTIAL}")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        log.close()
    assert 210 <= at_kill < 630, (at_kill, (tmp_path / "killed.log").read_text()[-3000:])
    counts = predict(checkpoints[1], out)
    assert counts["total"] == 630 and counts["reused"] >= at_kill and counts["scored"] == 630 - counts["reused"]
    # The uninterrupted run to compare with: the same model and settings over the same 630 objects'
    # bytes (100.jpg holds 640.jpg's), scored in this process from a local copy: one job start fewer
    # (the runs above are the S3 ones), and the prefix is all that differs between the two paths.
    whole = tmp_path / "whole-in"
    whole.mkdir()
    for i in range(21, 651):
        shutil.copyfile(local / ("640.jpg" if i == 100 else f"{i}.jpg"), whole / f"{i}.jpg")
    counts = predicted(capsys, config(tmp_path, "predict.batch_size=16"), checkpoints[1], whole, tmp_path / "whole")
    assert counts == {"scored": 630, "reused": 0, "removed": 0, "total": 630}
    left, right = read(out), pq.read_table(tmp_path / "whole" / "predictions").sort_by("path")
    assert [p[len(f"{bucket}/in/") :] for p in left["path"].to_pylist()] == [
        Path(p).name for p in right["path"].to_pylist()
    ]
    assert set(left["model"].to_pylist()) == set(right["model"].to_pylist()) == {"sequential_cnn:b"}
    assert left["error"].to_pylist() == right["error"].to_pylist()
    assert np.allclose(
        np.array(left["prob_dog"].to_pylist(), dtype=float),
        np.array(right["prob_dog"].to_pylist(), dtype=float),
        atol=1e-5,
    )
    assert left["label"].to_pylist() == right["label"].to_pylist()
    assert not [i for i in fs.get_file_info(pafs.FileSelector(f"{name}/out", recursive=True)) if PARTIAL in i.path]
