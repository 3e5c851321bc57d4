"""Re-adapting users onto a head set, and the shadow evaluation that compares two head sets on their own pairs.

Feedback is the source of truth: a user's profile over any head set is a function of their pairs, the head set
(its heads, population profile and calibrated hyperprior) and the adaptation method. `adapt_on_head_set` is that
function, for the service's feedback path (one user) and for a migration (thousands at once, padded into one
vectorized `adapt_users` call). No database here: the shells read pairs and write profiles.

Shadow evaluation (`shadow_evaluate`): for every user with at least `min_pairs` pairs, k-fold cross-validated
accuracy on their own pairs, adapting on the other folds; the folds depend only on the pair's position in the
user's history, so the old and the new head set see exactly the same splits.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rewardprism.adapt import Method, Profiles, adapt_users
from rewardprism.data import Prompt, render
from rewardprism.embed import EmbeddingExtractor
from rewardprism.heads import HeadSet

PairText = tuple[Prompt, str, str]  # (prompt, chosen, rejected), as stored


def pair_head_scores(heads: HeadSet, extractor: EmbeddingExtractor, pairs: Sequence[PairText]) -> np.ndarray:
    """(n, 2, H) head scores of each pair's chosen and rejected response, in one length-sorted pass."""
    if extractor.backbone.dim != heads.dim:
        raise ValueError(f"backbone {extractor.backbone.name!r} gives {extractor.backbone.dim}-dim features, "
                         f"head set {heads.name}@{heads.version} needs {heads.dim}")
    tok = extractor.backbone.tokenizer
    texts = [render(p, chosen, tok) for p, chosen, _ in pairs] + [render(p, rejected, tok) for p, _, rejected in pairs]
    scores = heads.scores(extractor.embed_texts(texts)[0])
    return np.stack([scores[:len(pairs)], scores[len(pairs):]], axis=1)


def scores_per_user(heads: HeadSet, extractor: EmbeddingExtractor,
                    pairs: Sequence[Sequence[PairText]]) -> list[np.ndarray]:
    """Each user's (n_u, 2, H) pair scores, all users' texts embedded in one length-sorted pass."""
    flat = pair_head_scores(heads, extractor, [pair for user_pairs in pairs for pair in user_pairs])
    return np.split(flat, np.cumsum([len(p) for p in pairs])[:-1])


def padded(user_scores: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-user (n_u, 2, H) scores → chosen, rejected (U, n, H) padded with zeros, and the (U, n) mask."""
    longest, heads = max(len(s) for s in user_scores), user_scores[0].shape[-1]
    chosen, rejected = np.zeros((2, len(user_scores), longest, heads))
    mask = np.zeros((len(user_scores), longest), dtype=bool)
    for u, scores in enumerate(user_scores):
        chosen[u, :len(scores)], rejected[u, :len(scores)], mask[u, :len(scores)] = scores[:, 0], scores[:, 1], True
    return chosen, rejected, mask


def adapt_on_head_set(heads: HeadSet, user_scores: Sequence[np.ndarray], method: Method = "default",
                      **opts) -> Profiles:
    """Profiles (weights (U, H), bias (U,)) of users from their pairs' (n_u, 2, H) head scores, adapted with
    `method` toward the head set's population profile and calibrated hyperprior; `opts` go to the method."""
    if not user_scores:
        return np.zeros((0, heads.num_heads)), np.zeros(0)
    chosen, rejected, mask = padded(user_scores)
    return adapt_users(chosen, rejected, heads.default_weights, None if mask.all() else mask, method=method,
                       center=heads.hyperprior_center, **opts)


# ----------------------------------------------------------------------------------------------- shadow evaluation


@dataclass(frozen=True)
class ShadowReport:
    """Per-user cross-validated accuracies under the old and the new head set, and the activation gate."""

    users: list[str]
    old_accuracy: np.ndarray  # (U,) in [0, 1]
    new_accuracy: np.ndarray
    pairs: np.ndarray  # (U,) pairs each user was evaluated on
    skipped: int  # users with fewer than min_pairs pairs
    max_drop_points: float  # a user "loses" when their accuracy drops by more than this many points

    @classmethod
    def merged(cls, parts: Sequence[ShadowReport], max_drop_points: float) -> ShadowReport:
        """One report from the reports of disjoint groups of users."""
        def joined(field: str) -> np.ndarray:
            return np.concatenate([getattr(p, field) for p in parts]) if parts else np.zeros(0)
        return cls([u for p in parts for u in p.users], joined("old_accuracy"), joined("new_accuracy"),
                   joined("pairs"), sum(p.skipped for p in parts), max_drop_points)

    @property
    def differences_points(self) -> np.ndarray:
        return 100 * (self.new_accuracy - self.old_accuracy)

    @property
    def population_old(self) -> float:
        return float(np.average(self.old_accuracy, weights=self.pairs)) if len(self.users) else float("nan")

    @property
    def population_new(self) -> float:
        return float(np.average(self.new_accuracy, weights=self.pairs)) if len(self.users) else float("nan")

    @property
    def losing_share(self) -> float:
        return float(np.mean(self.differences_points < -self.max_drop_points)) if len(self.users) else 0.0

    def gate_failures(self, max_losing_share: float) -> list[str]:
        """Why activating the new head set would be a regression (empty: it passes)."""
        failures = []
        if self.population_new < self.population_old:
            failures.append(f"population accuracy falls from {self.population_old:.1%} to {self.population_new:.1%}")
        if self.losing_share > max_losing_share:
            failures.append(f"{self.losing_share:.1%} of users lose more than {self.max_drop_points:g} points "
                            f"(at most {max_losing_share:.1%} may)")
        return failures

    def lines(self) -> list[str]:
        """The report as text: population accuracies, the distribution of differences, the losing share."""
        if not self.users:
            return [f"no user has enough pairs to evaluate ({self.skipped} skipped)"]
        q = np.percentile(self.differences_points, [0, 10, 25, 50, 75, 90, 100])
        return [f"users evaluated   {len(self.users)} ({self.skipped} with too few pairs skipped)",
                f"population acc.   old {self.population_old:.1%}   new {self.population_new:.1%}",
                "per-user change   min {:+.1f}  p10 {:+.1f}  p25 {:+.1f}  median {:+.1f}  p75 {:+.1f}  "
                "p90 {:+.1f}  max {:+.1f} points".format(*q),
                f"losing > {self.max_drop_points:g} pts  {self.losing_share:.1%} of users"]


def cross_validated_accuracy(heads: HeadSet, user_scores: Sequence[np.ndarray], folds: int,
                             method: Method = "default") -> np.ndarray:
    """(U,) accuracy of each user's profile on their held-out pairs, pair i in fold i % folds (ties count ½).

    Every user needs at least `folds` pairs, so that each fold trains on the rest and tests on one or more.
    """
    if any(len(s) < folds for s in user_scores):
        raise ValueError(f"every user needs at least {folds} pairs for {folds}-fold cross-validation")
    chosen, rejected, present = padded(user_scores)
    fold_of = np.arange(chosen.shape[1]) % folds
    correct = np.zeros(len(user_scores))
    for fold in range(folds):
        test = present & (fold_of == fold)
        weights, bias = adapt_users(chosen, rejected, heads.default_weights, present & ~test, method=method,
                                    center=heads.hyperprior_center)
        margin = np.einsum("unh,uh->un", chosen - rejected, weights)  # the bias cancels in a comparison
        correct += np.where(test, (margin > 0) + 0.5 * (margin == 0), 0).sum(axis=1)
    return correct / present.sum(axis=1)


def shadow_evaluate(users: Sequence[str], old: tuple[HeadSet, Sequence[np.ndarray]],
                    new: tuple[HeadSet, Sequence[np.ndarray]], *, min_pairs: int = 5, folds: int = 5,
                    max_drop_points: float = 10.0, method: Method = "default") -> ShadowReport:
    """Compare two head sets on each user's own pairs: `old` and `new` are (head set, per-user (n_u, 2, H)
    scores) for the same users, in the same order."""
    if min_pairs < folds:
        raise ValueError(f"min_pairs ({min_pairs}) must be at least folds ({folds})")
    keep = [i for i, s in enumerate(old[1]) if len(s) >= min_pairs]
    if not keep:
        return ShadowReport([], np.zeros(0), np.zeros(0), np.zeros(0), len(users), max_drop_points)
    accuracy = [cross_validated_accuracy(heads, [scores[i] for i in keep], folds, method)
                for heads, scores in (old, new)]
    return ShadowReport([users[i] for i in keep], accuracy[0], accuracy[1],
                        np.array([len(old[1][i]) for i in keep]), len(users) - len(keep), max_drop_points)
