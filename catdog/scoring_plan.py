"""Resumable, incremental batch scoring: what to score, what to reuse, committed parts, promotion.

Everything here works on Arrow columns (a listing is ``path, size, version, id``), never on one
Python object per file, so planning ten million images costs Arrow memory, not dicts.

An output folder holds ``predictions/`` (the last complete result, one row per image with the
``size``/``version`` it was scored at and the ``scoring`` fingerprint of the model and options)
and, while a run is unfinished, ``predictions.partial/``::

    predictions.partial/state.json     the scoring fingerprint the parts were made with
    predictions.partial/parts/*.parquet one file per scored batch, each written all-or-nothing

A run plans against both: an image whose path, size and version match a row of ``predictions/``
made with the same fingerprint, or a committed part, is reused; the rest is scored, batch by batch,
and every batch is committed as a part as soon as it is scored.  A run killed at any point loses at
most the batches in flight.  Only when every image is scored are the reused rows and the parts
merged into a new ``predictions/``, which replaces the old one all-or-nothing
(:meth:`~catdog.storage.Storage.replace_dir`); then ``predictions.partial/`` is deleted.

Rows whose ``error`` is set are decode failures: deterministic, so they are committed and reused
like any other result.  A storage read failure fails its task and the job, and commits nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import sys
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from catdog.key_match import member
from catdog.storage import Storage, join

logger = logging.getLogger(__name__)

PREDICTION_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("path", pa.string()),
        ("prob_dog", pa.float32()),
        ("label", pa.int8()),
        ("model", pa.string()),
        ("error", pa.string()),
        # What the row was scored from and with: an incremental rerun reuses it while these hold.
        ("size", pa.int64()),
        ("version", pa.string()),
        ("scoring", pa.string()),
    ]
)
PARTIAL = "predictions.partial"
STATE_FILE = "state.json"
PARTS = "parts"
KEYS = ["path", "size", "version"]
PROGRESS_EVERY_S = 10.0
ROWS_PER_OUTPUT_FILE = 1_000_000


def scoring_fingerprint(
    storage: Storage, checkpoints: list[str], tta: bool, amp: bool, scales: list[tuple[float, float]] | None = None
) -> str:
    """What decides a probability: every checkpoint's files (name, size, version: listing
    metadata), each one's (temperature, weight) in ``scales`` (None: all (1.0, 1.0)), TTA and AMP.
    The threshold is not in it: labels are recomputed at promotion."""
    items = []
    for uri in checkpoints:
        files = storage.list_versions(uri)
        names = [posixpath.basename(p) for p in files["path"].to_pylist()]
        items.append(sorted(zip(names, files["size"].to_pylist(), files["version"].to_pylist())))
    scales = [[float(t), float(w)] for t, w in scales] if scales is not None else [[1.0, 1.0]] * len(checkpoints)
    text = json.dumps({"checkpoints": items, "scales": scales, "tta": tta, "amp": amp}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parquet_dataset(storage: Storage, uri: str, columns: list[str]) -> pads.Dataset | None:
    """Every Parquet file under ``uri`` as one dataset; None when there is none, or when the files
    lack one of ``columns`` (outputs written before these columns existed)."""
    fs, _ = storage.resolve(uri)
    files = [info.path for info in storage.list_files(uri) if info.path.endswith(".parquet")]
    if not files:
        return None
    with storage.errors(uri):
        dataset = pads.dataset(files, filesystem=fs, format="parquet")
    return dataset if all(name in dataset.schema.names for name in columns) else None


def read_parquet_folder(storage: Storage, uri: str, columns: list[str]) -> pa.Table | None:
    """``columns`` of every Parquet file under ``uri`` (see :func:`parquet_dataset`)."""
    dataset = parquet_dataset(storage, uri, columns)
    if dataset is None:
        return None
    with storage.errors(uri):
        return dataset.to_table(columns=columns)


@dataclass
class ScoringPlan:
    """What one run does: ``to_score`` (listing rows), and how many rows it keeps or drops."""

    output_uri: str
    fingerprint: str
    listing: pa.Table  # path, size, version, id (+ any other listing columns)
    to_score: pa.Table
    reused: int  # listed rows with a still-valid row in predictions/ (complete earlier runs)
    resumed: int  # rows committed as parts by an interrupted run
    removed: int  # rows of predictions/ whose file is gone

    @property
    def partial_uri(self) -> str:
        return join(self.output_uri, PARTIAL)

    @property
    def parts_uri(self) -> str:
        return join(self.output_uri, PARTIAL, PARTS)

    @property
    def predictions_uri(self) -> str:
        return join(self.output_uri, "predictions")


def _semi(left: pa.Table, right: pa.Table | None, keys: list[str], anti: bool = False) -> pa.Table:
    """The rows of ``left`` whose ``keys`` equal some row of ``right`` (``anti``: equal none), in
    ``left``'s order.  Matched on 64-bit key hashes, then confirmed on the values (:mod:`catdog.key_match`):
    a fraction of the memory of a join on the strings, and exact."""
    if right is None or not right.num_rows:
        return left if anti else left.slice(0, 0)
    found = member(left.select(keys), right.select(keys))
    return left.filter(pa.array(~found if anti else found))


def make_plan(storage: Storage, listing: pa.Table, output_uri: str, fingerprint: str, full: bool) -> ScoringPlan:
    """Compare the listing with ``predictions/`` and ``predictions.partial/`` of ``output_uri``.

    ``full``: ignore both (a complete re-score).  Parts made with another fingerprint are deleted.
    Only key columns are read, and each step's tables are dropped before the next one: the driver
    holds the listing plus one earlier table's keys at a time."""
    partial = join(output_uri, PARTIAL)
    state_uri = join(partial, STATE_FILE)
    state = json.loads(storage.read_text(state_uri)) if storage.exists(state_uri) else {}
    if full or state.get("scoring") != fingerprint:
        storage.delete_dir(partial)
    keys = listing.select(KEYS)
    predictions = join(output_uri, "predictions")
    removed = _removed(storage, predictions, keys)
    done, reused = (None, 0) if full else _still_valid(storage, predictions, keys, fingerprint)
    parts = None if full else read_parquet_folder(storage, join(partial, PARTS), KEYS)
    resumed = 0
    if parts is not None:
        parts = _semi(parts, keys, KEYS)
        if done is not None:  # a path reused from predictions/ is not taken from a part as well
            parts = _semi(parts, keys.filter(pa.array(done)).select(["path"]), ["path"], anti=True)
        resumed = pc.count_distinct(parts["path"]).as_py()
        in_parts = member(keys, parts) if parts.num_rows else np.zeros(keys.num_rows, dtype=bool)
        done = in_parts if done is None else done | in_parts
    storage.write_text(state_uri, json.dumps({"scoring": fingerprint}) + "\n")
    to_score = listing if done is None else listing.filter(pa.array(~done))
    return ScoringPlan(output_uri, fingerprint, listing, to_score.sort_by("path"), reused, resumed, removed)


def _removed(storage: Storage, uri: str, keys: pa.Table) -> int:
    """Rows of ``predictions/`` whose path is no longer listed (their path column only is read)."""
    earlier = parquet_dataset(storage, uri, [*KEYS, "scoring"])
    if earlier is None:
        return 0
    with storage.errors(uri):
        paths = earlier.to_table(columns=["path"])
    return int((~member(paths, keys.select(["path"]))).sum())


def _still_valid(storage: Storage, uri: str, keys: pa.Table, fingerprint: str) -> tuple[np.ndarray | None, int]:
    """Which listed rows ``predictions/`` holds a result for, made with ``fingerprint`` at the same
    path, size and version (a mask over ``keys``), and how many listed rows that is.
    Only its rows with this fingerprint, and only their key columns, are read."""
    earlier = parquet_dataset(storage, uri, [*KEYS, "scoring"])
    if earlier is None:
        return None, 0
    with storage.errors(uri):
        valid = earlier.to_table(columns=KEYS, filter=pc.field("scoring") == fingerprint)
    done = member(keys, valid)
    return done, int(done.sum())


def part_name(paths: pa.Array) -> str:
    """The same batch always gets the same name: a retried task overwrites its own part."""
    digest = hashlib.sha256("\n".join(paths.to_pylist()).encode()).hexdigest()[:24]
    return f"part-{digest}.parquet"


def commit_part(table: pa.Table, storage: Storage, parts_uri: str, fingerprint: str) -> pa.Table:
    """Ray Data ``map_batches`` function after the predictor: write the scored rows as one part
    (all-or-nothing), and pass on only their count."""
    if table.num_rows:
        table = table.append_column("scoring", pa.array([fingerprint] * table.num_rows, pa.string()))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.write_bytes(join(parts_uri, part_name(table["path"].combine_chunks())), sink.getvalue().to_pybytes())
    return pa.table({"scored": pa.array([table.num_rows], pa.int64())})


@dataclass
class Progress:
    """Images scored so far by this run, reported every ``PROGRESS_EVERY_S`` (a bar on a TTY)."""

    total: int
    started: float = field(default_factory=time.monotonic)
    scored: int = 0
    first_batch_s: float | None = None
    last_report: float = field(default_factory=time.monotonic)

    def add(self, n: int) -> None:
        now = time.monotonic()
        self.scored += n
        if self.first_batch_s is None:
            self.first_batch_s = now - self.started
        tty = sys.stderr.isatty()
        if tty or now - self.last_report >= PROGRESS_EVERY_S or self.scored == self.total:
            self.last_report = now
            self.report(tty)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.scored / elapsed
        eta = (self.total - self.scored) / rate if rate else float("inf")
        pct = 100.0 * self.scored / self.total if self.total else 100.0
        return f"scored {self.scored}/{self.total} images ({pct:.1f}%), {rate:.1f} img/s, ETA {eta:.0f} s"

    def report(self, tty: bool) -> None:
        if tty:
            end = "\n" if self.scored == self.total else ""
            print(f"\r{self.line()}", end=end, file=sys.stderr, flush=True)
        else:
            logger.info("%s", self.line())


def score_and_commit(ds, plan: ScoringPlan) -> Progress:
    """Run the pipeline that ends in :func:`commit_part`; only part counts reach the driver."""
    progress = Progress(plan.to_score.num_rows)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        progress.add(int(pc.sum(batch["scored"]).as_py() or 0))
    return progress


def promote(storage: Storage, plan: ScoringPlan, threshold: float) -> int:
    """Merge every committed part and the still-valid rows of ``predictions/`` into a new
    ``predictions/`` (one row per path, labels recomputed at ``threshold``, rows sorted by path),
    replace the old one all-or-nothing, then drop ``predictions.partial/``.  Returns the row count.

    A part wins over an earlier row of the same path: it is this run's result (``--full`` re-scores
    images that ``predictions/`` holds).  Earlier rows are read only when the plan reused some, and
    repeated paths among them are dropped too: an S3 copy killed half-way leaves old and new objects
    of ``predictions/`` side by side (:meth:`~catdog.storage.Storage.replace_dir`)."""
    columns = PREDICTION_SCHEMA.names
    keys = plan.listing.select(KEYS)
    tables = [PREDICTION_SCHEMA.empty_table()]
    parts = read_parquet_folder(storage, plan.parts_uri, columns)
    if parts is not None:
        tables.append(_semi(parts, keys, KEYS))
    previous = read_parquet_folder(storage, plan.predictions_uri, columns) if plan.reused else None
    if previous is not None:
        tables.append(_semi(previous.filter(pc.equal(previous["scoring"], plan.fingerprint)), keys, KEYS))
    merged = first_per_path(pa.concat_tables([t.select(columns).cast(PREDICTION_SCHEMA) for t in tables]))
    merged = relabel(merged.sort_by("path"), threshold)
    missing = _semi(keys, merged, KEYS, anti=True).num_rows
    if missing:
        raise RuntimeError(f"{plan.output_uri}: {missing} listed images have no committed result; run again")
    write_predictions(storage, merged, plan.predictions_uri)
    storage.delete_dir(plan.partial_uri)
    return merged.num_rows


def first_per_path(table: pa.Table) -> pa.Table:
    """The first row of each path (a batch retried by Ray after its part was written may be
    committed twice; :func:`promote` puts parts before earlier results)."""
    if pc.count_distinct(table["path"]).as_py() == table.num_rows:
        return table
    indexed = table.append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    first = indexed.group_by("path").aggregate([("_row", "min")])["_row_min"]
    return table.take(first)


def relabel(table: pa.Table, threshold: float) -> pa.Table:
    label = pc.cast(pc.greater_equal(table["prob_dog"], pa.scalar(threshold, pa.float32())), pa.int8())
    return table.set_column(table.schema.get_field_index("label"), "label", label)


def write_predictions(storage: Storage, table: pa.Table, uri: str) -> None:
    """Write ``table`` beside ``uri`` and move it into place (see :meth:`Storage.replace_dir`)."""
    tmp = f"{uri.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
    fs, tmp_path = storage.resolve(tmp)
    try:
        storage.makedirs(tmp)
        for index, start in enumerate(range(0, max(table.num_rows, 1), ROWS_PER_OUTPUT_FILE)):
            with storage.errors(tmp):
                pq.write_table(
                    table.slice(start, ROWS_PER_OUTPUT_FILE), f"{tmp_path}/part-{index:05d}.parquet", filesystem=fs
                )
        storage.replace_dir(tmp, uri)
    finally:
        storage.delete_dir(tmp)
