"""Exact row membership between two Arrow tables by their key columns, through 64-bit hashes.

An Acero semi join on string keys builds a hash table of the strings themselves: at a million
paths that is several hundred MiB of driver memory on top of the tables.  :func:`member` instead
hashes every key row to one ``uint64`` (vectorised over the Arrow buffers, no Python object per
row), finds the candidate row of the other table with ``index_in`` on those integers, and then
compares the real key values of each candidate pair, a bounded slice at a time.  A hash collision
can therefore never make two different keys match.  It could only hide a match when the other
table holds two *different* keys with the same hash; those (practically never seen) hashes are
found up front and their rows are resolved with an exact Acero join on the few rows concerned.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Bytes of string data hashed per step, and rows compared per step: bounds the temporaries
# (numpy's are 8 bytes per string byte of a step).
HASH_STEP_BYTES = 1 << 14
COMPARE_STEP_ROWS = 1 << 16
_K = 0x9E3779B97F4A7C15  # odd: invertible modulo 2**64, so a substring's sum can be re-based
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place: spreads every input bit over the 64 output bits."""
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """K**j and K**-j modulo 2**64 for j < at least n (numpy's uint64 products wrap)."""
    return _power_table(max(HASH_STEP_BYTES, 1 << (n - 1).bit_length()))


@functools.cache
def _power_table(n: int) -> tuple[np.ndarray, np.ndarray]:
    up = np.full(n, _K, dtype=np.uint64)
    up[0] = 1
    down = np.full(n, pow(_K, -1, 2**64), dtype=np.uint64)
    down[0] = 1
    return np.cumprod(up, dtype=np.uint64), np.cumprod(down, dtype=np.uint64)


def _string_hashes(array: pa.Array) -> np.ndarray:
    """Polynomial hash of each string's bytes (sum of byte * K**position), mixed with its length."""
    n = len(array)
    wide = pa.types.is_large_string(array.type) or pa.types.is_large_binary(array.type)
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64 if wide else np.int32)
    offsets = offsets[array.offset : array.offset + n + 1]
    data = array.buffers()[2]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, dtype=np.uint8)
    out = np.empty(n, dtype=np.uint64)
    row = 0
    while row < n:
        # Rows whose bytes fit one step (at least one row, however long).
        end = max(row + 1, int(np.searchsorted(offsets, offsets[row] + HASH_STEP_BYTES, side="right")) - 1)
        end = min(end, n)
        base = int(offsets[row])
        starts, stops = offsets[row:end] - base, offsets[row + 1 : end + 1] - base
        size = int(stops[-1])
        up, down = _powers(size + 1)
        weighted = data[base : base + size].astype(np.uint64) * up[:size]
        sums = np.concatenate([np.zeros(1, dtype=np.uint64), np.cumsum(weighted, dtype=np.uint64)])
        out[row:end] = (sums[stops] - sums[starts]) * down[starts]
        out[row:end] ^= (stops - starts).astype(np.uint64) * np.uint64(_K)
        row = end
    return _mix(out)


def _column_hashes(column: pa.ChunkedArray) -> np.ndarray:
    parts = []
    for chunk in column.chunks:
        if pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type):
            parts.append(_string_hashes(chunk))
        elif pa.types.is_integer(chunk.type):
            values = pc.fill_null(chunk, 0).to_numpy().astype(np.int64)  # a copy: _mix works in place
            parts.append(_mix(values.view(np.uint64)))
        else:
            raise TypeError(f"cannot hash a {chunk.type} key column")
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def key_hashes(table: pa.Table) -> np.ndarray:
    """One ``uint64`` per row over every column of ``table`` (null values hash as a fixed value;
    they never compare equal, as in a join)."""
    hashes = np.zeros(table.num_rows, dtype=np.uint64)
    for column in table.columns:
        hashes *= np.uint64(_K)
        hashes += _column_hashes(column)
        _mix(hashes)
    return hashes


def _equal_at(left: pa.Table, right: pa.Table, at: np.ndarray) -> np.ndarray:
    """For each row i of ``left``: is it equal, column by column, to ``right``'s row ``at[i]``
    (-1: no row)?  Compared a bounded slice at a time."""
    equal = np.zeros(left.num_rows, dtype=bool)
    for start in range(0, left.num_rows, COMPARE_STEP_ROWS):
        index = at[start : start + COMPARE_STEP_ROWS]
        if not (index >= 0).any():
            continue
        taken = pa.array(index, mask=index < 0)
        same = None
        for name in left.column_names:
            step = pc.equal(left[name].slice(start, len(index)), right[name].take(taken))
            same = step if same is None else pc.and_(same, step)
        equal[start : start + len(index)] = pc.fill_null(same, False).to_numpy(zero_copy_only=False)
    return equal


def _first_with_hash(hashes: np.ndarray, value_set: np.ndarray) -> np.ndarray:
    """For each hash, the first row of ``value_set`` holding it, or -1."""
    found = pc.index_in(pa.array(hashes), value_set=pa.array(value_set))
    return pc.fill_null(found, -1).to_numpy()


def _colliding(right: pa.Table, hashes: np.ndarray) -> np.ndarray:
    """Hashes that ``right`` holds for two rows with different keys."""
    if pc.count_distinct(pa.array(hashes)).as_py() == len(hashes):
        return np.zeros(0, dtype=np.uint64)
    same = _equal_at(right, right, _first_with_hash(hashes, hashes))
    return np.unique(hashes[~same])


def member(left: pa.Table, right: pa.Table) -> np.ndarray:
    """For each row of ``left``: does ``right`` hold a row equal to it in every column of ``left``
    (nulls never equal)?  Exact, as a ``left semi`` join on those columns would say."""
    keys = left.column_names
    right = right.select(keys)
    left_hashes, right_hashes = key_hashes(left), key_hashes(right)
    found = _equal_at(left, right, _first_with_hash(left_hashes, right_hashes))
    colliding = _colliding(right, right_hashes)
    if colliding.size:
        suspect = np.flatnonzero(np.isin(left_hashes, colliding))
        rows = left.take(suspect).append_column("_row", pa.array(suspect))
        candidates = right.filter(pa.array(np.isin(right_hashes, colliding)))
        joined = rows.join(candidates, keys=keys, join_type="left semi")
        found[suspect] = False
        found[joined["_row"].to_numpy()] = True
    return found
