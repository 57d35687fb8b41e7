"""Ray Data image ingestion: list, label, split and decode image folders or Parquet shard sets.

Listing and labelling happen on the driver from file *names* only (cheap, and lets a job fail
before starting workers when a folder is unusable).  Reading and decoding happen in Ray Data
tasks, one task per block of files, so no image bytes ever pass through the driver.

What a file's name says (label, id), a folder's listing, and reading and decoding one file live
in :mod:`catdog.images`, below both this module and :mod:`catdog.shards`; this module chooses
between a folder and a shard set, splits, and builds the Ray Data pipelines.

Wherever a job takes an image folder it also takes a shard set written by ``jobs/prepare.py``
(``catdog.shards``): the driver then reads only the ``name``/``label``/``id`` columns, Ray Data
reads the ``bytes`` column with ``read_parquet``, and the same :func:`decode_batch` decodes them.

Stock ``ray.data.read_images`` fails the whole read on one corrupt file; here a file that cannot
be decoded becomes a row with an ``error`` message.  Training keeps those rows (every DDP rank
must take the same number of steps) but leaves them out of the forward pass; predict and
evaluate report them.

Reading is not decoding: a file whose bytes cannot be read (S3 5xx or throttling, a timeout, a
reset, an object listed but gone) is retried with backoff (:func:`catdog.storage.read_with_retries`);
if it still fails the Ray Data task raises :class:`~catdog.storage.ReadError`, Ray Data retries
the task (:data:`READ_TASK_RETRIES`), and then the job fails naming the object.  It never becomes
an error row.
"""

from __future__ import annotations

import hashlib
import logging
import math
import posixpath
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from catdog.images import CLASS_NAMES, DataError, decode_rgb, error_text, image_listing, label_from_path, read_uri
from catdog.presets import EvalPreset, TrainPreset
from catdog.shards import open_shard_set, shard_listing, shard_rows_dataset
from catdog.storage import READ_FAILED, ReadError, Storage

logger = logging.getLogger(__name__)

# Rows per block that the driver puts into the object store (listings, plans).
DRIVER_BLOCK_ROWS = 16384
# Ray Data re-runs a decode task this many times when it failed with a ReadError.
READ_TASK_RETRIES = 2


def split_key(name: str, seed: int) -> str:
    """Order of a file within its class for the split: a seeded hash of its name only."""
    return hashlib.sha256(f"{seed}:{posixpath.basename(name)}".encode()).hexdigest()


def list_table(storage: Storage, uri: str):
    """A :data:`~catdog.images.LISTING_SCHEMA` table of every image in a folder or a shard set, sorted by path,
    from the listing only (names, sizes, versions; never image bytes), and the
    :class:`~catdog.shards.ShardSet` when ``uri`` is one (else None).

    A shard set's labels and ids come from its columns; a folder's from its file names."""
    shards = open_shard_set(storage, uri)
    if shards is not None:
        return shard_listing(storage, shards), shards
    return image_listing(storage, uri), None


def list_entries(storage: Storage, uri: str):
    """``({"path", "label", "id"}, ...)`` for every image in a folder or a shard set (training's
    split works on these), and the shard set when ``uri`` is one (else None)."""
    table, shards = list_table(storage, uri)
    return table.select(["path", "label", "id"]).to_pylist(), shards


@dataclass
class Split:
    """Labelled rows (``{"path", "label"}``) for training and validation, plus what was skipped.

    ``shards`` is the shard set the rows come from (None: the paths are image files)."""

    train: list[dict]
    val: list[dict]
    unlabeled: list[str] = field(default_factory=list)
    shards: object | None = None

    def class_counts(self, rows: list[dict]) -> dict[str, int]:
        counts = {name: 0 for name in CLASS_NAMES}
        for row in rows:
            counts[CLASS_NAMES[row["label"]]] += 1
        return counts


def split_rows(paths: list[str] | list[dict], val_fraction: float, seed: int, limit: int | None = None) -> Split:
    """Deterministic, stratified split: in each class, files ordered by hashed name; the first
    ``val_fraction`` go to validation.  Listing order and worker count do not matter.

    ``paths`` are file URIs (labelled from their names) or ``{"path", "label"}`` entries (a shard
    set's label column); either way the order within a class depends on the base name only, so an
    image folder and its shard set split identically."""
    by_class: dict[int, list[str]] = {0: [], 1: []}
    unlabeled = []
    for entry in paths:
        if isinstance(entry, dict):
            path, label = entry["path"], entry["label"]
        else:
            path, label = entry, label_from_path(entry)
        if label is None:
            unlabeled.append(path)
        else:
            by_class[label].append(path)
    train, val = [], []
    for label, members in by_class.items():
        members.sort(key=lambda p: split_key(p, seed))
        if limit is not None:
            members = members[: math.ceil(limit / 2)]
        n_val = round(len(members) * val_fraction)
        val += [{"path": p, "label": label} for p in members[:n_val]]
        train += [{"path": p, "label": label} for p in members[n_val:]]
    return Split(train=train, val=val, unlabeled=unlabeled)


def load_split(storage: Storage, uri: str, val_fraction: float, seed: int, limit: int | None = None) -> Split:
    """List a labelled folder or shard set and split it; fail with one line when it cannot train a classifier."""
    entries, shards = list_entries(storage, uri)
    split = split_rows(entries, val_fraction, seed, limit)
    split.shards = shards
    if split.unlabeled:
        shown = ", ".join(posixpath.basename(p) for p in split.unlabeled[:10])
        more = f" and {len(split.unlabeled) - 10} more" if len(split.unlabeled) > 10 else ""
        logger.warning("%s: skipped %d files whose names carry no label: %s%s", uri, len(split.unlabeled), shown, more)
    counts = split.class_counts(split.train + split.val)
    missing = [name for name, n in counts.items() if n == 0]
    if missing:
        found = ", ".join(f"{n} {name}" for name, n in counts.items())
        raise DataError(
            f"{uri}: no labelled {' or '.join(missing)} images found ({found}); "
            "expected cat.N.jpg / dog.N.jpg names or cat(s)/ dog(s)/ folders"
        )
    if not split.train or not split.val:
        raise DataError(f"{uri}: too few images to split ({len(split.train)} train, {len(split.val)} val)")
    if shards is None:  # prepare already validated every image of a shard set
        probe_decodable(storage, uri, [row["path"] for row in split.train + split.val])
    return split


def probe_decodable(storage: Storage, uri: str, paths: list[str], sample: int = 64) -> None:
    """Decode up to ``sample`` evenly spread files; if none is an image, stop before any worker starts."""
    step = max(1, len(paths) // sample)
    first_error = None
    for path in paths[::step][:sample]:
        data = read_uri(storage, path)  # a storage fault is not an undecodable image: it raises
        try:
            decode_rgb(data, 32)
            return
        except Exception as exc:  # any decode failure: keep looking for one usable image
            first_error = first_error or f"{posixpath.basename(path)}: {type(exc).__name__}"
    checked = len(paths[::step][:sample])
    raise DataError(f"{uri}: no usable image: none of {checked} sampled files could be decoded (e.g. {first_error})")


Presets = dict[str, TrainPreset | EvalPreset]


def batch_bytes(batch: dict[str, np.ndarray], storage: Storage):
    """The byte source of a batch: its ``bytes`` column (rows read from Parquet shards), else the
    files named in ``path``, each read (with retries) when asked for."""
    if "bytes" in batch:
        column = batch["bytes"]
        return lambda i: column[i]
    paths = batch["path"]
    return lambda i: read_uri(storage, paths[i])


def decode_batch(
    batch: dict[str, np.ndarray],
    storage: Storage,
    presets: Presets,
    drop_errors: bool = False,
    threads: int = 1,
) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: decode the images of a batch.

    The bytes come from :func:`batch_bytes`: the ``bytes`` column when the rows were read from
    shards (the column is dropped from the output), else the files named in ``path``.  A row that
    arrives with ``error`` already set (a file that ``prepare`` rejected) is not decoded.
    Each image is decoded once and put through every preset in ``presets`` (column name → preset),
    giving uint8 N×S×S×3 columns, plus ``error``: why the image is unusable, or "" (a string either
    way, so the column keeps one Arrow type in every block).
    With ``threads`` > 1 the rows are split across that many threads of one pool per process
    (Pillow releases the GIL while it decodes and resizes).
    With ``drop_errors`` unusable rows are removed; either way they are logged by name.
    Only bytes that fail to decode make error rows: files that cannot be read (after retries) fail
    the whole task with one :class:`ReadError` naming each of them, for Ray Data to retry.
    """
    paths = batch["path"]
    read = batch_bytes(batch, storage)
    batch = {key: value for key, value in batch.items() if key != "bytes"}
    images = {col: np.zeros((len(paths), p.size, p.size, 3), dtype=np.uint8) for col, p in presets.items()}
    errors = np.full(len(paths), "", dtype=object)
    read_failures: list[str] = []
    known = batch.get("error")

    def decode_rows(rows: range) -> None:
        rng = np.random.default_rng()
        source_size = max(p.source_size for p in presets.values())
        for i in rows:
            if known is not None and known[i]:
                errors[i] = known[i]
                continue
            try:
                data = read(i)
            except ReadError as exc:  # not a bad image: the whole task fails below
                read_failures.append(str(exc))
                continue
            try:
                rgb = decode_rgb(data, source_size)
                for col, preset in presets.items():
                    images[col][i] = preset(rgb, rng)
            except Exception as exc:  # an undecodable file becomes an error row, never a failed job
                errors[i] = error_text(exc)

    edges = np.linspace(0, len(paths), min(threads, len(paths)) + 1).astype(int)
    spans = [range(a, b) for a, b in zip(edges[:-1], edges[1:])]
    if len(spans) > 1:
        list(_decode_pool(threads).map(decode_rows, spans))
    else:
        decode_rows(range(len(paths)))
    if read_failures:
        raise ReadError("; ".join(sorted(read_failures)))
    out = {**batch, **images, "error": errors}
    bad = errors != ""
    if bad.any():
        logger.warning(
            "%d unreadable images: %s",
            int(bad.sum()),
            "; ".join(f"{paths[i]} ({errors[i]})" for i in np.flatnonzero(bad)),
        )
        if drop_errors:
            out = {key: value[~bad] for key, value in out.items()}
    return out


_DECODE_POOLS: dict = {}


def _decode_pool(threads: int):
    """One thread pool per process and size, made on first use (never at import)."""
    from concurrent.futures import ThreadPoolExecutor

    if threads not in _DECODE_POOLS:
        _DECODE_POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="catdog-decode")
    return _DECODE_POOLS[threads]


def image_dataset(
    storage: Storage,
    rows: pa.Table | list[dict],
    presets: Presets | TrainPreset | EvalPreset,
    *,
    batch_size: int = 64,
    drop_errors: bool = False,
    shards=None,
    threads: int = 1,
    shuffle_blocks: bool = False,
):
    """A Ray Dataset of decoded images from rows (an Arrow table, or dicts) that each name an image URI in ``path``.

    A single preset gives an ``image`` column.  From a folder: one block per ``batch_size`` files,
    decoded by one task (with ``threads`` decode threads): large enough to amortise task overhead,
    small enough that several tasks run side by side.  Each task reserves ``threads`` CPUs, one per
    thread it runs: reserving one let Ray start a task per CPU, each with all its threads, and on 2
    cores that oversubscription cost a fifth to a third of the ingest rate (bench/NOTES.md, "Decode
    tasks reserve a CPU per thread").  With ``shards`` (the :class:`~catdog.shards.ShardSet` the rows
    were listed from) the images are read from its Parquet files instead, keeping only ``rows``.

    ``shuffle_blocks``: a new block order at every execution (each training epoch): the blocks of
    paths (or the shard files) are shuffled *before* the decode, which therefore streams.  Shuffled
    after it, the shuffle (an all-to-all step) waited for the whole epoch's decode before the first
    batch and held every decoded image of the epoch in the object store (spilled at scale).
    """
    import ray.data

    if not isinstance(rows, pa.Table):
        rows = pa.Table.from_pylist(rows)
    if not rows.num_rows:
        raise DataError("no images to read")
    if not isinstance(presets, dict):
        presets = {"image": presets}
    if shards is not None:
        return retry_read_failures(
            shard_rows_dataset(storage, shards, rows, shuffle_files=shuffle_blocks).map_batches(
                decode_batch,
                fn_args=(storage, presets, drop_errors, threads),
                batch_size=batch_size,
                batch_format="numpy",
                num_cpus=threads,
            )
        )
    # Few large blocks cross the driver (one object each); streaming repartition cuts them into one
    # block per decode task inside the pipeline, so planning a million rows stays cheap.
    ds = ray.data.from_arrow(table_blocks(rows, DRIVER_BLOCK_ROWS))
    if rows.num_rows > batch_size:
        ds = ds.repartition(target_num_rows_per_block=batch_size)
    if shuffle_blocks:
        ds = ds.randomize_block_order()
    return retry_read_failures(
        ds.map_batches(
            decode_batch,
            fn_args=(storage, presets, drop_errors, threads),
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=threads,
        )
    )


def retry_read_failures(ds):
    """Ray Data re-runs a map task that failed with a :class:`ReadError` (and only then) up to
    ``READ_TASK_RETRIES`` times; datasets derived from ``ds`` inherit its context."""
    ds.context.retried_map_errors = [READ_FAILED]
    ds.context.max_map_retries = READ_TASK_RETRIES
    return ds


def table_blocks(table: pa.Table, rows_per_block: int) -> list[pa.Table]:
    """Zero-copy slices of ``rows_per_block`` rows: one Ray Data block (one decode task) each."""
    table = table.combine_chunks()
    return [table.slice(start, rows_per_block) for start in range(0, table.num_rows, rows_per_block)]
