"""Parquet shard sets: an image folder packed once by ``jobs/prepare.py``, then read by every job.

A shard set is a folder (local or ``s3://``) holding::

    shard-00000.parquet ...   name, label, id, bytes, width, height, sha256 — one row per valid image
    rejected.parquet          name, label, id, reason, size, sha256 — every file that could not be decoded
    _catdog_shards.json       the marker: format, source folder, shard files and row counts,
                              class counts, duplicates; written last

``name`` is the image's path relative to the source folder (``cat.12.jpg``, ``dogs/x.jpg``);
``label`` is 0 (cat) / 1 (dog) or null when the name carries none; ``id`` is the numeric Kaggle id
of unlabelled names (``123.jpg``) or null; ``bytes`` is the original encoded file.

Packing is deterministic: the driver lists names only and orders them by a fixed hash of the name
(this interleaves the classes, so every shard holds both and block-level shuffling in training
mixes them), cuts that list into shards of ``shard_size``, and one Ray Data task per shard reads,
validates (with :func:`catdog.images.decode_rgb`, the decoder every job uses) and writes its shard.
The same folder always gives the same file names with the same rows in the same order.

Jobs detect a shard set by its marker.  They read the ``name``/``label``/``id`` columns on the
driver (names only) to split and list, and ``ray.data.read_parquet`` reads the ``bytes`` column
in Ray Data tasks: image bytes never pass through the driver.  Rejected files are listed too, and
come out of the dataset as rows whose ``error`` is the reason, exactly as the folder reader gives
an undecodable file: a folder and its shard set give the same split and the same prediction rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from catdog.images import (
    LISTING_SCHEMA,
    DataError,
    decode_rgb,
    error_text,
    id_from_path,
    label_from_path,
    list_images,
    read_uri,
)
from catdog.storage import Storage, StorageError, basename, is_remote, join

logger = logging.getLogger(__name__)

MARKER = "_catdog_shards.json"
REJECTED = "rejected.parquet"
FORMAT = "catdog-shards"
VERSION = 1
DEFAULT_SHARD_SIZE = 256
# Validation decodes every image through decode_rgb at this size (JPEG draft still reads every scan,
# so truncated or corrupt data fails here just as it would in training).
VALIDATE_SIZE = 64
_SHARD_FILE = re.compile(r"^shard-(\d{5,})\.parquet$")

SHARD_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("label", pa.int8()),
        ("id", pa.int64()),
        ("bytes", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),
    ]
)
REJECTED_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("label", pa.int8()),
        ("id", pa.int64()),
        ("reason", pa.string()),
        ("size", pa.int64()),
        ("sha256", pa.string()),
    ]
)
# What the pack tasks send back to the driver: one small row per image, never its bytes.
_SUMMARY_COLUMNS = ("name", "shard", "ok", "reason", "size", "sha256", "label")


def shard_file(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def name_order(name: str) -> str:
    """The packing order: a fixed hash of the relative name (deterministic, classes interleaved)."""
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ShardSet:
    """An opened shard set: where it is, the folder it was packed from, and its shard files."""

    uri: str
    source: str  # the source folder as the folder reader names it (absolute path or s3:// URI)
    files: tuple[str, ...]
    images: int
    rejected: int = 0

    def file_uris(self) -> list[str]:
        return [join(self.uri, name) for name in self.files]

    def path_of(self, name: str) -> str:
        """The ``path`` of an image: the URI it had in the source folder, exactly as the folder
        reader gives it, so splits and predictions match between a folder and its shards."""
        return join(self.source, name)


def source_root(storage: Storage, uri: str) -> str:
    """The prefix that :func:`catdog.images.list_images` puts before relative names."""
    return uri.rstrip("/") if is_remote(uri) else storage.resolve(uri)[1]


def open_shard_set(storage: Storage, uri: str) -> ShardSet | None:
    """The shard set at ``uri``, or None when ``uri`` is not one (no marker)."""
    marker_uri = join(uri, MARKER)
    try:
        present = storage.exists(marker_uri)
    except StorageError as exc:  # name the folder the user gave, not the marker we probed for
        raise StorageError(str(exc).replace(marker_uri, uri, 1)) from None
    if not present:
        return None
    try:
        marker = json.loads(storage.read_text(marker_uri))
        if marker.get("format") != FORMAT:
            raise ValueError(f"format is {marker.get('format')!r}, expected {FORMAT!r}")
        if marker.get("version") != VERSION:
            raise ValueError(f"version {marker.get('version')!r} is not supported (expected {VERSION})")
        files = tuple(shard["file"] for shard in marker["shards"])
        return ShardSet(
            uri=uri.rstrip("/"),
            source=marker["source"],
            files=files,
            images=int(marker["images"]),
            rejected=int(marker.get("rejected", 0)),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{marker_uri}: not a usable shard-set marker ({exc}); run jobs/prepare.py again") from None


def _read_small_columns(storage: Storage, uri: str, columns: list[str], schema: pa.Schema) -> Iterator[dict]:
    """Rows of a few small columns of one Parquet file, batch by batch (never the ``bytes`` column)."""
    fs, path = storage.resolve(uri)
    with storage.errors(uri):
        handle = pq.ParquetFile(path, filesystem=fs)
        missing = [c for c in schema.names if c not in handle.schema_arrow.names]
        if missing:
            raise DataError(f"{uri}: not a catdog shard file (missing columns {', '.join(missing)})")
        for batch in handle.iter_batches(columns=columns, batch_size=8192):
            yield from batch.to_pylist()


def shard_listing(storage: Storage, shards: ShardSet) -> pa.Table:
    """A :data:`~catdog.images.LISTING_SCHEMA` table of every image file of the source folder, packed
    or rejected, sorted by path as :func:`catdog.images.image_listing` gives it, read from the small
    columns only (names, never bytes).  ``version`` is the file's sha256; ``size`` is 0 for packed
    images (their shards do not keep it)."""
    parts = []
    for uri in shards.file_uris():
        table = _read_columns(storage, uri, ["name", "label", "id", "sha256"], SHARD_SCHEMA)
        parts.append(_as_listing(shards, table, pa.array(np.zeros(table.num_rows, dtype=np.int64))))
    if shards.rejected:
        columns = ["name", "label", "id", "sha256", "size"]
        table = _read_columns(storage, join(shards.uri, REJECTED), columns, REJECTED_SCHEMA)
        parts.append(_as_listing(shards, table, table["size"]))
    listing = pa.concat_tables(parts) if parts else LISTING_SCHEMA.empty_table()
    if not listing.num_rows:
        raise DataError(f"{shards.uri}: shard set holds no images")
    return listing.sort_by("path")


def _read_columns(storage: Storage, uri: str, columns: list[str], schema: pa.Schema) -> pa.Table:
    fs, path = storage.resolve(uri)
    with storage.errors(uri):
        handle = pq.ParquetFile(path, filesystem=fs)
        missing = [c for c in schema.names if c not in handle.schema_arrow.names]
        if missing:
            raise DataError(f"{uri}: not a catdog shard file (missing columns {', '.join(missing)})")
        return handle.read(columns=columns)


def _as_listing(shards: ShardSet, table: pa.Table, size) -> pa.Table:
    prefix = shards.path_of("")
    paths = pc.binary_join_element_wise(pa.scalar(prefix.rstrip("/")), table["name"], "/")
    columns = {"path": paths, "size": size, "version": table["sha256"], "id": table["id"], "label": table["label"]}
    return pa.table(columns, schema=LISTING_SCHEMA)


def rejected_rows(storage: Storage, shards: ShardSet) -> dict[str, dict]:
    """name → ``{"label", "id", "reason"}`` for every file that prepare rejected."""
    if not shards.rejected:
        return {}
    columns = ["name", "label", "id", "reason"]
    return {
        row["name"]: row for row in _read_small_columns(storage, join(shards.uri, REJECTED), columns, REJECTED_SCHEMA)
    }


def _rows_table(paths, data, errors, wanted: pa.Table, positions) -> pa.Table:
    """``path``, ``bytes``, ``error`` and the other columns of ``wanted`` at ``positions``."""
    columns = {"path": paths, "bytes": data, "error": errors}
    for name in wanted.column_names:
        if name != "path":
            columns[name] = wanted[name].take(positions)
    return pa.table(columns)


def select_rows(table: pa.Table, shards: ShardSet, wanted: pa.Table) -> pa.Table:
    """Ray Data ``map_batches`` function on shard rows: keep the images named in ``wanted`` (a table
    with ``path`` and the fields to attach), and pass ``bytes`` on to the decoder."""
    paths = pc.binary_join_element_wise(pa.scalar(shards.path_of("").rstrip("/")), table["name"], "/")
    positions = pc.index_in(paths, value_set=wanted["path"])
    keep = pc.is_valid(positions)
    positions = positions.filter(keep)
    n = len(positions)
    return _rows_table(
        paths.filter(keep), table["bytes"].filter(keep), pa.array([""] * n, pa.string()), wanted, positions
    )


def shard_rows_dataset(storage: Storage, shards: ShardSet, rows: pa.Table, shuffle_files: bool = False):
    """A Ray Dataset of ``path``, ``bytes``, ``error`` and the other columns of ``rows``, from the shards
    (``shuffle_files``: read in a new file order at every execution).

    Only ``rows`` (a split, a limit, what is left to score) are kept; the filter runs in the read
    tasks, so the driver ships one Arrow table of names and small fields, never bytes.  Rows naming
    a rejected file come out with empty ``bytes`` and the rejection reason in ``error``, so they
    are not decoded."""
    import ray.data

    fs, _ = storage.resolve(shards.uri)
    paths = [storage.resolve(uri)[1] for uri in shards.file_uris()]
    wanted = rows.combine_chunks()
    shuffle = "files" if shuffle_files else None
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=["name", "bytes"], shuffle=shuffle).map_batches(
        select_rows, fn_args=(shards, wanted), batch_size=None, batch_format="pyarrow"
    )
    rejected = rejected_rows(storage, shards)
    if rejected:
        names = list(rejected)
        paths = pa.array([shards.path_of(name) for name in names], pa.string())
        positions = pc.index_in(paths, value_set=wanted["path"])
        keep = pc.is_valid(positions)
        if pc.any(keep).as_py():
            reasons = pa.array([rejected[name]["reason"] for name in names], pa.string()).filter(keep)
            kept = positions.filter(keep)
            empty = pa.array([b""] * len(kept), pa.binary())
            ds = ds.union(ray.data.from_arrow(_rows_table(paths.filter(keep), empty, reasons, wanted, kept)))
    return ds


# -- packing ---------------------------------------------------------------------------------------


def image_size(data: bytes) -> tuple[int, int]:
    """Upright width and height of an encoded image, from its header (EXIF rotation applied)."""
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    try:
        orientation = image.getexif().get(0x0112)
    except Exception:
        orientation = None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def validate_image(data: bytes) -> tuple[int, int]:
    """Decode ``data`` with the decoder every job uses; return its upright size or raise."""
    decode_rgb(data, VALIDATE_SIZE)
    return image_size(data)


def shard_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)


def parquet_bytes(table: pa.Table, image_column: str | None = "bytes") -> bytes:
    """Deterministic Parquet bytes: same table, same file.  Encoded images are stored as they are."""
    out = io.BytesIO()
    compression = {name: "snappy" for name in table.schema.names}
    if image_column:
        compression[image_column] = "none"  # JPEG/PNG data does not compress
    pq.write_table(
        table,
        out,
        compression=compression,
        use_dictionary=[name for name in table.schema.names if name != image_column],
        write_statistics=[name for name in table.schema.names if name != image_column],
        row_group_size=max(1, table.num_rows),
    )
    return out.getvalue()


def pack_shard(batch: dict[str, np.ndarray], storage: Storage, source: str, output_uri: str) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: one row per shard (``index``, ``names``).  Reads, validates
    and hashes each image, writes the shard all-or-nothing, and returns one summary row per image."""
    summary: dict[str, list] = {key: [] for key in _SUMMARY_COLUMNS}
    for index, names in zip(batch["index"], batch["names"]):
        rows = []
        for name in names:
            uri = join(source, name)
            label = label_from_path(uri)
            data, ok, reason, width, height = b"", True, "", 0, 0
            data = read_uri(storage, uri)  # a read that fails every retry fails the task (ReadError)
            try:
                width, height = validate_image(data)
            except Exception as exc:  # any undecodable file is rejected with its reason
                ok, reason = False, error_text(exc)
            digest = hashlib.sha256(data).hexdigest() if data else ""
            if ok:
                rows.append(
                    {
                        "name": name,
                        "label": label,
                        "id": id_from_path(uri),
                        "bytes": data,
                        "width": width,
                        "height": height,
                        "sha256": digest,
                    }
                )
            for key, value in zip(
                _SUMMARY_COLUMNS, (name, int(index), ok, reason, len(data), digest, -1 if label is None else label)
            ):
                summary[key].append(value)
        storage.write_bytes(join(output_uri, shard_file(int(index))), parquet_bytes(shard_table(rows)))
    return {key: np.asarray(values) for key, values in summary.items()}


@dataclass
class PrepareReport:
    uri: str
    images: int
    packed: int
    rejected: list[tuple[str, str]]
    duplicates: list[list[str]]
    shards: int
    classes: dict[str, int]

    def line(self) -> str:
        dup_extra = sum(len(group) - 1 for group in self.duplicates)
        classes = ", ".join(f"{n} {name}" for name, n in self.classes.items())
        return (
            f"prepare: {self.images} images -> {self.packed} packed in {self.shards} shards ({classes}), "
            f"{len(self.rejected)} rejected, {len(self.duplicates)} groups of exact duplicates "
            f"({dup_extra} extra copies) -> {self.uri}"
        )


def prepare_shards(storage: Storage, input_uri: str, output_uri: str, shard_size: int = DEFAULT_SHARD_SIZE):
    """Pack the images under ``input_uri`` into a shard set at ``output_uri``; return a report.

    Re-running replaces the previous set: its marker is deleted first (so a half-rewritten folder is
    never taken for a complete set), every shard is rewritten all-or-nothing under the same name,
    shard files beyond the new count are deleted, and the marker is written last.
    """
    import ray.data

    if shard_size < 1:
        raise DataError(f"--shard-size must be positive (got {shard_size})")
    output_uri = output_uri.rstrip("/")
    source = source_root(storage, input_uri)
    paths = list_images(storage, input_uri)
    if not paths:
        raise DataError(f"{input_uri}: no .jpg/.jpeg/.png images found")
    _, out_path = storage.resolve(output_uri)
    if _inside(out_path, storage.resolve(input_uri)[1]):
        raise DataError(f"{output_uri}: the output must not be inside the input folder {input_uri}")
    names = sorted((p[len(source) :].lstrip("/") for p in paths), key=lambda n: (name_order(n), n))
    n_shards = math.ceil(len(names) / shard_size)
    storage.makedirs(output_uri)
    storage.delete_file(join(output_uri, MARKER))
    plan = [{"index": i, "names": names[i * shard_size : (i + 1) * shard_size]} for i in range(n_shards)]
    logger.info("packing %d images from %s into %d shards at %s", len(names), input_uri, n_shards, output_uri)
    ds = ray.data.from_items(plan, override_num_blocks=n_shards).map_batches(
        pack_shard, fn_args=(storage, source, output_uri), batch_size=1, batch_format="numpy"
    )
    summary: dict[str, list] = {key: [] for key in _SUMMARY_COLUMNS}
    for batch in ds.iter_batches(batch_size=4096, batch_format="numpy"):
        for key in _SUMMARY_COLUMNS:
            summary[key].extend(batch[key].tolist())

    rows = sorted(zip(*(summary[key] for key in _SUMMARY_COLUMNS)), key=lambda r: r[0])
    good = [r for r in rows if r[2]]
    bad = [r for r in rows if not r[2]]
    storage.write_bytes(
        join(output_uri, REJECTED),
        parquet_bytes(
            pa.Table.from_pylist(
                [
                    {
                        "name": r[0],
                        "label": None if r[6] < 0 else r[6],
                        "id": id_from_path(r[0]),
                        "reason": r[3],
                        "size": r[4],
                        "sha256": r[5] or None,
                    }
                    for r in bad
                ],
                schema=REJECTED_SCHEMA,
            ),
            image_column=None,
        ),
    )
    by_hash: dict[str, list[str]] = {}
    for r in good:
        by_hash.setdefault(r[5], []).append(r[0])
    duplicates = sorted(sorted(group) for group in by_hash.values() if len(group) > 1)
    per_shard = [0] * n_shards
    for r in good:
        per_shard[r[1]] += 1
    classes = {"cat": 0, "dog": 0, "unlabelled": 0}
    for r in good:
        classes[("cat", "dog")[r[6]] if r[6] in (0, 1) else "unlabelled"] += 1
    _delete_stale_shards(storage, output_uri, n_shards)
    marker = {
        "format": FORMAT,
        "version": VERSION,
        "source": source,
        "shard_size": shard_size,
        "images": len(good),
        "rejected": len(bad),
        "classes": classes,
        "shards": [{"file": shard_file(i), "rows": per_shard[i]} for i in range(n_shards)],
        "duplicates": duplicates,
        "columns": SHARD_SCHEMA.names,
        "rejected_file": REJECTED,
    }
    storage.write_text(join(output_uri, MARKER), json.dumps(marker, indent=2, sort_keys=True) + "\n")
    report = PrepareReport(
        uri=output_uri,
        images=len(rows),
        packed=len(good),
        rejected=[(r[0], r[3]) for r in bad],
        duplicates=duplicates,
        shards=n_shards,
        classes=classes,
    )
    if bad:
        logger.warning(
            "%d files rejected (see %s): %s",
            len(bad),
            join(output_uri, REJECTED),
            "; ".join(f"{name} ({reason})" for name, reason in report.rejected[:20]),
        )
    if duplicates:
        logger.warning(
            "%d groups of exact duplicate images (same sha256), kept as they are: %s",
            len(duplicates),
            "; ".join(" = ".join(group) for group in duplicates[:20]),
        )
    return report


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _delete_stale_shards(storage: Storage, output_uri: str, n_shards: int) -> None:
    for info in storage.list_files(output_uri, recursive=False):
        match = _SHARD_FILE.match(basename(info.path))
        if match and int(match.group(1)) >= n_shards:
            storage.delete_file(storage.uri_of(output_uri, info.path))


def run_prepare(cfg, input_uri: str, output_uri: str, shard_size: int = DEFAULT_SHARD_SIZE) -> str:
    """The prepare job: pack ``input_uri`` into shards at ``output_uri``; print counts, return its URI."""
    from catdog.runtime import init_ray

    storage = Storage.from_config(cfg.storage)
    if not storage.is_dir(input_uri):
        raise DataError(f"{input_uri}: image folder not found{storage.why_missing(input_uri)}")
    storage.makedirs(output_uri)  # fails early (bucket missing, access denied) before starting Ray
    init_ray(cfg)
    report = prepare_shards(storage, input_uri, output_uri, shard_size)
    print(report.line(), flush=True)
    for name, reason in report.rejected:
        print(f"rejected: {name}: {reason}", flush=True)
    for group in report.duplicates:
        print(f"duplicate: {' = '.join(group)}", flush=True)
    return report.uri
