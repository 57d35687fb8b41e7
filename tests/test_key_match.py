"""Key membership through 64-bit hashes is exactly a semi join: layouts, nulls, odd strings, collisions."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from catdog import key_match
from catdog.key_match import HASH_STEP_BYTES, key_hashes, member

ODD_STRINGS = ["", "a", "a\x00", "\x00a", "ab", "ba", "é", "x" * (3 * HASH_STEP_BYTES)]


def random_keys(rng: random.Random, n: int) -> pa.Table:
    """Few distinct values, so that rows repeat and match often; some nulls."""
    pool = ODD_STRINGS + [f"/data/{i}.jpg" for i in range(400)]
    return pa.table(
        {
            "path": [None if rng.random() < 0.02 else rng.choice(pool) for _ in range(n)],
            "size": pa.array([rng.choice([0, 1, 2**40, None]) for _ in range(n)], pa.int64()),
            "version": [rng.choice(["1", "2", ""]) for _ in range(n)],
        }
    )


def semi_join(left: pa.Table, right: pa.Table) -> np.ndarray:
    """What Acero says: the reference."""
    numbered = left.append_column("_row", pa.array(np.arange(left.num_rows)))
    joined = numbered.join(right.select(left.column_names), keys=left.column_names, join_type="left semi")
    found = np.zeros(left.num_rows, dtype=bool)
    found[joined["_row"].to_numpy()] = True
    return found


@pytest.mark.parametrize("large", [False, True])
@pytest.mark.parametrize("keys", [["path"], ["path", "size", "version"]])
def test_member_equals_a_semi_join(keys, large):
    rng = random.Random(len(keys) + large)
    # Several chunks, one of them a slice (non-zero offset): hashes must not depend on the layout.
    left = pa.concat_tables([random_keys(rng, 3000), random_keys(rng, 2500).slice(700)])
    right = random_keys(rng, 2000)
    if large:
        left, right = (t.set_column(0, "path", t["path"].cast(pa.large_string())) for t in (left, right))
    found = member(left.select(keys), right)
    assert found.sum() > 50 and (~found).sum() > 50  # both outcomes are exercised
    assert np.array_equal(found, semi_join(left.select(keys), right))


def test_member_stays_exact_when_every_hash_collides(monkeypatch):
    """With 3 possible hash values, most pairs of different keys collide: no false match, none missed."""
    rng = random.Random(5)
    left, right = random_keys(rng, 2000), random_keys(rng, 1500)
    real = key_hashes
    monkeypatch.setattr(key_match, "key_hashes", lambda table: real(table) % np.uint64(3))
    for keys in (["path"], ["path", "size", "version"]):
        assert np.array_equal(member(left.select(keys), right), semi_join(left.select(keys), right))


def test_hashes_follow_values_not_layout():
    paths = [f"/bucket/d{i // 256:05d}/{i % 256:03d}.jpg" for i in range(50_000)] + ODD_STRINGS
    whole = key_hashes(pa.table({"path": paths}))
    assert len(set(whole.tolist())) == len(paths)
    pieces = pa.table({"path": pa.chunked_array([paths[:10], paths[10:30_000], paths[30_000:]])})
    assert np.array_equal(key_hashes(pieces), whole)
    assert np.array_equal(key_hashes(pa.table({"path": paths}).slice(123)), whole[123:])
