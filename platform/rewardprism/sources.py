"""A dataset by name, as every job names one: `synthetic` (the built-in generator) or a file, folder or hub name.

Not in `rewardprism.data`: the generator builds `data.PreferencePair`s, so `data` importing it would be a circle.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

from rewardprism.data import DataError, PreferencePair, is_data_file, iter_pairs, read_records
from rewardprism.synthetic import DEFAULT_USERS, SyntheticGenerator


def open_dataset(source: str, *, split: str = "train", fmt: str = "auto", limit: int | None = None,
                 group: str | None = None, synthetic_per_user: int = 500, seed: int = 0,
                 skip_bad_rows: bool = False) -> Iterator[PreferencePair]:
    """The pairs of `source` as a stream (`synthetic`: `synthetic_per_user` pairs per simulated user, `seed`)."""
    if source == "synthetic":
        pairs = SyntheticGenerator(seed).dataset(synthetic_per_user)
        return iter(pairs[:limit] if limit is not None else pairs)
    return iter_pairs(source, split=split, fmt=fmt, limit=limit, group=group, skip_bad_rows=skip_bad_rows)


def first_checked(pairs: Iterator[PreferencePair], source: str) -> Iterator[PreferencePair]:
    """The same stream, its first pair read now: a missing file, an unreachable hub dataset or a malformed first
    row fails here, before a backbone is loaded or an output folder made."""
    first = next(pairs, None)
    if first is None:
        raise DataError("no pairs", source=source)
    return itertools.chain([first], pairs)


def size_hint(source: str, *, limit: int | None = None, synthetic_per_user: int = 500) -> int | None:
    """How many pairs `open_dataset` yields, where that is known before embedding (a progress bar's total): the
    synthetic set's size, a local file's or folder's record count (rows skipped as bad make it an upper bound),
    else `limit` (None for a hub dataset without one)."""
    path = Path(source)
    if source == "synthetic":
        size = len(DEFAULT_USERS) * synthetic_per_user
    elif path.is_file() or path.is_dir():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and is_data_file(p))
        size = sum(1 for f in files for _ in read_records(f))
    else:
        return limit
    return size if limit is None else min(size, limit)
