"""A dataset by name, as every job names one: `synthetic` (the built-in generator) or a file, folder or hub name.

Not in `rewardprism.data`: the generator builds `data.PreferencePair`s, so `data` importing it would be a circle.
"""
from __future__ import annotations

from collections.abc import Iterator

from rewardprism.data import PreferencePair, iter_pairs
from rewardprism.synthetic import SyntheticGenerator


def open_dataset(source: str, *, split: str = "train", fmt: str = "auto", limit: int | None = None,
                 group: str | None = None, synthetic_per_user: int = 500, seed: int = 0,
                 skip_bad_rows: bool = False) -> Iterator[PreferencePair]:
    """The pairs of `source` as a stream (`synthetic`: `synthetic_per_user` pairs per simulated user, `seed`)."""
    if source == "synthetic":
        pairs = SyntheticGenerator(seed).dataset(synthetic_per_user)
        return iter(pairs[:limit] if limit is not None else pairs)
    return iter_pairs(source, split=split, fmt=fmt, limit=limit, group=group, skip_bad_rows=skip_bad_rows)
