"""The adaptation protocol over head scores (Luo et al. 2025, arXiv:2502.13131, §5), shared by the evaluation
report (`rewardprism.evaluate`) and the hyperprior calibration (`rewardprism.calibrate`).

Each group of pairs stands for a user: per seed, n of its pairs are sampled as labelled feedback, a profile is
adapted from them, and the profile's accuracy (chosen scored above rejected) is measured on the group's pairs —
with the adaptation pairs left in (the reference's protocol) and removed (honest).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rewardprism.adapt import Method, adapt_users
from rewardprism.heads import HeadSet

SEEDS = tuple(range(20))


@dataclass(frozen=True)
class ScoredPairs:
    """Head scores of labelled pairs, with each pair's group."""

    chosen: np.ndarray  # (N, H)
    rejected: np.ndarray  # (N, H)
    groups: np.ndarray  # (N,) group names

    def __post_init__(self) -> None:
        if self.chosen.ndim != 2 or self.chosen.shape != self.rejected.shape \
                or self.groups.shape != (len(self.chosen),):
            raise ValueError(f"scores must be (N, H) each with N groups, got {self.chosen.shape}, "
                             f"{self.rejected.shape}, {self.groups.shape}")

    @classmethod
    def of(cls, heads: np.ndarray | HeadSet, chosen: np.ndarray, rejected: np.ndarray,
           groups: np.ndarray) -> ScoredPairs:
        """Score (N, d) features with a head set, or with a bare (H, d) weight matrix (random baselines)."""
        if isinstance(heads, HeadSet):
            return cls(heads.scores(chosen), heads.scores(rejected), np.asarray(groups))
        return cls(np.asarray(chosen) @ heads.T, np.asarray(rejected) @ heads.T, np.asarray(groups))

    @property
    def group_names(self) -> list[str]:
        return sorted(set(self.groups.tolist()))

    def indices(self, group: str) -> np.ndarray:
        return np.flatnonzero(self.groups == group)


def sample_adaptation(pairs: ScoredPairs, n: int, seeds: Sequence[int] = SEEDS,
                      groups: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Per group, (S, n) indices of the pairs each seed labels: n distinct pairs by `default_rng(seed)`."""
    if n < 1:
        raise ValueError(f"n (adaptation pairs per group) must be at least 1, got {n}")
    out = {}
    for group in pairs.group_names if groups is None else groups:
        members = pairs.indices(group)
        if len(members) == 0:
            raise ValueError(f"group {group!r} has no pairs to adapt from")
        if n > len(members):
            raise ValueError(f"n={n} adaptation pairs but group {group!r} has only {len(members)}")
        out[group] = np.stack([members[np.random.default_rng(seed).choice(len(members), n, replace=False)]
                               for seed in seeds])
    return out


def pair_accuracy(chosen: np.ndarray, rejected: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(N, P): whether each of P profiles (weights (P, H)) scores a pair's chosen response (N, H) higher.

    A profile's bias cancels within a pair; a tie counts as wrong.
    """
    weights = np.atleast_2d(weights)
    return chosen @ weights.T > rejected @ weights.T


@dataclass
class AdaptationResult:
    """Correct pairs and pairs scored, (G, S) per group and seed; `honest_*` leave out the adaptation pairs.

    Adapted results keep what was scored: per group, the (S, n) indices of the pairs each seed adapted from
    (`picks`, into the source's pairs) and the (S, H) profiles adapted from them (`profiles`).
    """

    label: str
    groups: list[str]
    correct: np.ndarray
    total: np.ndarray
    honest_correct: np.ndarray | None = None
    honest_total: np.ndarray | None = None
    picks: dict[str, np.ndarray] | None = None
    profiles: dict[str, np.ndarray] | None = None

    def summary(self, honest: bool = False) -> dict[str, tuple[float, float]]:
        """Mean (std over seeds) per group; "overall" averages the groups per seed, "all pairs" pools them."""
        correct, total = (self.honest_correct, self.honest_total) if honest else (self.correct, self.total)
        if correct is None:
            return {}
        acc = correct / total  # (G, S)
        out = {g: (float(a.mean()), float(a.std())) for g, a in zip(self.groups, acc)}
        overall, pooled = acc.mean(0), correct.sum(0) / total.sum(0)  # (S,)
        out["overall"] = (float(overall.mean()), float(overall.std()))
        out["all pairs"] = (float(pooled.mean()), float(pooled.std()))
        return out


def evaluate_adaptation(test: ScoredPairs, n: int, *, method: Method, prior: np.ndarray | None = None,
                        source: ScoredPairs | None = None, seeds: Sequence[int] = SEEDS, label: str = "",
                        **opts: Any) -> AdaptationResult:
    """Adapt one profile per (group, seed) from n pairs of `source` (default: `test` itself), score `test`.

    From another `source` (another annotator's pairs) no test pair is an adaptation pair, so the honest accuracy
    is the reference one.

    All seeds of a group adapt in one batched call. The result keeps the picks and the profiles.
    """
    same = source is None
    source = test if same else source
    if source.chosen.shape[1] != test.chosen.shape[1]:
        raise ValueError(f"source has {source.chosen.shape[1]} heads, test {test.chosen.shape[1]}")
    spent = [g for g in test.group_names if len(test.indices(g)) == n] if same else []
    if spent:  # the reference variant could still score them, the honest one has nothing left
        raise ValueError(f"n={n} adaptation pairs would leave none of group {spent[0]!r}'s {n} pairs to test on")
    picks = sample_adaptation(source, n, seeds, test.group_names)
    profiles = {group: adapt_users(source.chosen[idx], source.rejected[idx], prior, method=method, **opts)[0]
                for group, idx in picks.items()}
    result = score_profiles(test, picks, profiles, label or method, honest=same)
    if not same:  # the adaptation pairs are another folder's: no test pair was adapted on, both variants agree
        result.honest_correct, result.honest_total = result.correct, result.total
    return result


def score_profiles(test: ScoredPairs, picks: dict[str, np.ndarray], profiles: dict[str, np.ndarray], label: str,
                   honest: bool) -> AdaptationResult:
    """Accuracy of each group's (S, H) profiles on its test pairs; `honest` also leaves out the picked pairs."""
    correct, total, honest_correct, honest_total = [], [], [], []
    for group, chosen_idx in picks.items():
        members = test.indices(group)
        hits = pair_accuracy(test.chosen[members], test.rejected[members], profiles[group])  # (N_g, S)
        correct.append(hits.sum(0))
        total.append(np.full(len(chosen_idx), len(members)))
        if honest:
            kept = np.stack([~np.isin(members, picked) for picked in chosen_idx], axis=1)  # (N_g, S)
            honest_correct.append((hits & kept).sum(0))
            honest_total.append(kept.sum(0))
    return AdaptationResult(label, list(picks), np.array(correct), np.array(total),
                            np.array(honest_correct) if honest else None, np.array(honest_total) if honest else None,
                            picks, profiles)


def fixed_profile(test: ScoredPairs, weights: np.ndarray, label: str, per_group: bool = False) -> AdaptationResult:
    """Profiles that need no feedback (population profile, single heads) in the same table shape.

    `weights` is one profile (H,), or with `per_group` one row per group (G, H) (the best-head oracle).
    """
    groups = test.group_names
    weights = np.asarray(weights)
    correct = np.array([[pair_accuracy(test.chosen[m], test.rejected[m], weights[i] if per_group else weights).sum()]
                        for i, m in enumerate(map(test.indices, groups))])  # (G, 1)
    total = np.array([[len(m)] for m in map(test.indices, groups)])
    return AdaptationResult(label, groups, correct, total, correct, total)
