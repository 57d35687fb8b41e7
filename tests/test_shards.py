"""Parquet shard sets (jobs/prepare.py): validation, rejects, duplicates, determinism, and parity with
the folder reader (same split, same decoded tensors, same error rows)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, jpeg_bytes, write_image
from PIL import Image

from catdog.data import decode_batch, image_dataset, list_entries, load_split
from catdog.images import DataError, list_images
from catdog.presets import EvalPreset
from catdog.shards import (
    MARKER,
    REJECTED,
    SHARD_SCHEMA,
    ShardSet,
    image_size,
    open_shard_set,
    pack_shard,
    parquet_bytes,
    prepare_shards,
    select_rows,
    shard_file,
)
from catdog.storage import Storage

STORAGE = Storage()


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def messy_folder(folder: Path) -> Path:
    """Kaggle names, a class-folder layout would work the same; three corrupt files and a duplicate."""
    for i in range(12):
        write_image(folder / f"cat.{i}.jpg", color=(200, 40 + 9 * i, 40), size=(60 + i, 40))
        write_image(folder / f"dog.{i}.jpg", color=(40, 40 + 9 * i, 200), size=(40, 50 + i))
    (folder / "cat.100.jpg").write_bytes(jpeg_bytes()[:150])  # truncated
    (folder / "dog.101.jpg").write_bytes(b"")  # empty
    (folder / "dog.102.jpg").write_text("<html>404</html>")  # not an image
    (folder / "dog.103.jpg").write_bytes((folder / "dog.3.jpg").read_bytes())  # exact duplicate
    (folder / "notes.txt").write_text("ignored")
    return folder


# -- fast: no Ray ----------------------------------------------------------------------------------


def test_pack_shard_validates_hashes_and_writes_identical_bytes(tmp_path):
    folder = messy_folder(tmp_path / "train")
    names = sorted(p.name for p in folder.glob("*.jpg"))
    batch = {"index": np.array([3]), "names": np.array([names], dtype=object)}
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    summary = pack_shard(batch, STORAGE, str(folder), str(out_a))
    pack_shard(batch, STORAGE, str(folder), str(out_b))
    assert (out_a / shard_file(3)).read_bytes() == (out_b / shard_file(3)).read_bytes()
    table = pq.read_table(out_a / shard_file(3))
    assert table.schema.equals(SHARD_SCHEMA)
    assert table.column("name").to_pylist() == [
        n for n in names if n not in ("cat.100.jpg", "dog.101.jpg", "dog.102.jpg")
    ]
    row = table.filter(pa.compute.equal(table.column("name"), "dog.4.jpg")).to_pylist()[0]
    assert row["bytes"] == (folder / "dog.4.jpg").read_bytes() and row["label"] == 1 and row["id"] is None
    assert (row["width"], row["height"]) == (40, 54)
    rejected = {n: r for n, ok, r in zip(summary["name"], summary["ok"], summary["reason"]) if not ok}
    assert set(rejected) == {"cat.100.jpg", "dog.101.jpg", "dog.102.jpg"}
    assert "empty file" in rejected["dog.101.jpg"] and "UnidentifiedImageError" in rejected["dog.102.jpg"]
    hashes = dict(zip(summary["name"], summary["sha256"]))
    assert hashes["dog.3.jpg"] == hashes["dog.103.jpg"] != hashes["dog.4.jpg"]


def test_image_size_is_upright():
    image = Image.new("RGB", (60, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 to display
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif.tobytes())
    assert image_size(out.getvalue()) == (20, 60)


def test_parquet_bytes_are_deterministic():
    rows = [
        {"name": "cat.1.jpg", "label": 0, "id": None, "bytes": jpeg_bytes(), "width": 48, "height": 40, "sha256": "x"}
    ]
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    assert parquet_bytes(table) == parquet_bytes(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA))


def test_select_rows_keeps_only_the_wanted_images_with_their_fields():
    shards = ShardSet(uri="/s", source="/src", files=(), images=3)
    table = pa.table({"name": ["a.jpg", "b.jpg", "c.jpg"], "bytes": [b"1", b"2", b"3"]})
    wanted = pa.table({"path": ["/src/c.jpg", "/src/a.jpg"], "id": pa.array([None, 7], pa.int64())})
    out = select_rows(table, shards, wanted)
    assert out.to_pydict() == {
        "path": ["/src/a.jpg", "/src/c.jpg"],
        "bytes": [b"1", b"3"],
        "error": ["", ""],
        "id": [7, None],
    }


def test_decode_batch_reads_the_bytes_column_with_the_same_decoder(tmp_path):
    data = [jpeg_bytes(color=(10, 200, 30), size=(50, 40)), b"", jpeg_bytes(color=(0, 0, 250))]
    batch = {
        "path": np.array(["/x/1.jpg", "/x/2.jpg", "/x/3.jpg"], dtype=object),
        "bytes": np.array(data, dtype=object),
        "error": np.array(["", "", "ValueError: rejected by prepare"], dtype=object),
    }
    out = decode_batch(batch, STORAGE, {"image": EvalPreset(16)})
    assert "bytes" not in out
    assert list(out["error"]) == ["", "ValueError: empty file", "ValueError: rejected by prepare"]
    expected = EvalPreset(16)(Image.open(io.BytesIO(data[0])).convert("RGB"))
    assert np.array_equal(out["image"][0], expected)


def test_a_folder_without_a_marker_is_an_image_folder(tmp_path):
    folder = messy_folder(tmp_path / "train")
    assert open_shard_set(STORAGE, str(folder)) is None
    entries, shards = list_entries(STORAGE, str(folder))
    assert shards is None and len(entries) == 28
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MARKER).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="not a usable shard-set marker"):
        open_shard_set(STORAGE, str(tmp_path / "bad"))


def test_prepare_job_without_a_folder_fails_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "prepare.py"), "--input", f"{tmp_path}/nope", "--output", f"{tmp_path}/o"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [
        f"error: {tmp_path}/nope: image folder not found"
    ]


# -- slow: Ray Data ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_prepare_reports_rejects_and_duplicates_and_is_deterministic(tmp_path, ray_session):
    folder = messy_folder(tmp_path / "train")
    out = tmp_path / "shards"
    report = prepare_shards(STORAGE, str(folder), str(out), shard_size=5)
    assert (report.images, report.packed, report.shards) == (28, 25, 6)
    assert report.classes == {"cat": 12, "dog": 13, "unlabelled": 0}
    assert report.duplicates == [["dog.103.jpg", "dog.3.jpg"]]
    rejected = pq.read_table(out / REJECTED).to_pylist()
    assert [r["name"] for r in rejected] == ["cat.100.jpg", "dog.101.jpg", "dog.102.jpg"]
    assert all(r["reason"] for r in rejected) and "empty file" in rejected[1]["reason"]
    marker = json.loads((out / MARKER).read_text())
    assert marker["images"] == 25 and marker["rejected"] == 3 and marker["duplicates"] == report.duplicates
    assert [s["file"] for s in marker["shards"]] == [shard_file(i) for i in range(6)]
    first = files_of(out)
    # Same input, same files, byte for byte; a larger shard size then the old one again leaves no stale shard.
    prepare_shards(STORAGE, str(folder), str(out), shard_size=5)
    assert files_of(out) == first
    prepare_shards(STORAGE, str(folder), str(out), shard_size=100)
    assert sorted(p.name for p in out.glob("shard-*")) == [shard_file(0)]
    prepare_shards(STORAGE, str(folder), str(tmp_path / "again"), shard_size=5)
    assert files_of(tmp_path / "again") == first
    # Every shard mixes the classes (the packing order is a hash of the name, not the name).
    labels = [pq.read_table(out.parent / "again" / shard_file(i)).column("label").to_pylist() for i in range(5)]
    assert sum(len(set(ls)) == 2 for ls in labels) >= 3


@pytest.mark.slow
def test_shards_give_the_same_split_tensors_and_error_rows_as_the_folder(small_real_data, tmp_path, ray_session):
    folder = tmp_path / "train"
    folder.mkdir()
    for path in sorted((small_real_data / "train").iterdir())[::4]:  # 100 real images, both classes
        shutil.copy(path, folder / path.name)
    (folder / "cat.9000.jpg").write_bytes(jpeg_bytes()[:200])  # rejected by prepare, error row in both readers
    shards_uri = str(tmp_path / "shards")
    prepare_shards(STORAGE, str(folder), shards_uri, shard_size=16)

    a = load_split(STORAGE, str(folder), 0.25, seed=0)
    b = load_split(STORAGE, shards_uri, 0.25, seed=0)
    assert a.shards is None and isinstance(b.shards, ShardSet)
    assert a.train == b.train and a.val == b.val  # same rows, same paths, same labels

    preset = EvalPreset(48)
    rows = [{"path": p, "label": 0} for p in list_images(STORAGE, str(folder))]

    def decoded(shards) -> dict:
        out = {}
        for batch in image_dataset(STORAGE, rows, preset, batch_size=16, shards=shards).iter_batches(
            batch_size=32, batch_format="numpy"
        ):
            for path, image, error in zip(batch["path"], batch["image"], batch["error"]):
                out[path] = (image, error)
        return out

    from_folder, from_shards = decoded(None), decoded(b.shards)
    assert sorted(from_folder) == sorted(from_shards) and len(from_folder) == 101
    bad = next(path for path in from_folder if path.endswith("/cat.9000.jpg"))
    assert from_folder[bad][1] and from_shards[bad][1]
    for path, (image, error) in from_folder.items():
        if not error:
            assert not from_shards[path][1] and np.array_equal(image, from_shards[path][0]), path


@pytest.mark.slow
def test_report_reads_images_from_the_shards_after_the_source_folder_is_gone(tmp_path, ray_session):
    from catdog.report import report_image_bytes

    folder = messy_folder(tmp_path / "train")
    shards_uri = str(tmp_path / "shards")
    prepare_shards(STORAGE, str(folder), shards_uri, shard_size=5)
    wanted = ["cat.3.jpg", "dog.7.jpg"]
    original = {name: (folder / name).read_bytes() for name in wanted}
    paths = [open_shard_set(STORAGE, shards_uri).path_of(name) for name in wanted]
    from_folder = report_image_bytes(STORAGE, str(folder), paths)
    shutil.rmtree(folder)
    from_shards = report_image_bytes(STORAGE, shards_uri, paths)
    assert from_shards == from_folder == {path: original[Path(path).name] for path in paths}
