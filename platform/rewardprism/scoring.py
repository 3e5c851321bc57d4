"""Personalized scoring, the service's core: no Ray, no HTTP, no database.

The backbone does not depend on the user, so the (prompt, response) texts of many requests, from many users,
share one token-budget batched forward pass (`rewardprism.embed`). Each text then gets its own request's
profile: with head scores S = φ Wᵀ + b (B, H), one profile row per text P (B, H) and biases c (B,),

    score_i = S_i · P_i + c_i

that is one (B, d) × (d, H) product and a row-wise dot for the whole batch, whatever the mix of users. Per-user
models are never loaded or multiplexed: a user is just H + 1 numbers.

Also here: per-head explanations, Bradley-Terry preference probabilities, NaN guards, and the per-replica
profile cache keyed by (user, revision).
"""
from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

import numpy as np

from rewardprism.backbone import Backbone
from rewardprism.bounds import MAX_ABS_WEIGHT
from rewardprism.data import Prompt, render
from rewardprism.embed import EmbeddingExtractor
from rewardprism.heads import HeadSet

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class NonFiniteScores(ArithmeticError):
    """A score came out NaN or infinite; it is never returned (a backbone or head-set fault, not user input)."""


@dataclass(frozen=True)
class Profile:
    """What scoring needs of a user: weights (H,) over raw head scores and a bias, for one head set.

    `version` is the store's optimistic-lock version (None for the head set's default profile), so a response
    can say which profile produced it. `created_at` tells two profiles at the same version apart: a user
    deleted and created again (or re-imported) starts again at version 1.
    """

    weights: np.ndarray  # (H,)
    bias: float
    head_set: str  # content hash of the head set the weights are over
    version: int | None = None
    created_at: datetime | None = None

    @classmethod
    def default(cls, heads: HeadSet) -> Profile:
        return cls(np.asarray(heads.default_weights, dtype=np.float64), 0.0, heads.content_hash)

    def problem(self, heads: HeadSet) -> str | None:
        """Why this profile cannot score with `heads` (None when it can)."""
        weights = np.asarray(self.weights)
        if self.head_set != heads.content_hash:
            return "other_head_set"
        if weights.shape != (heads.num_heads,):
            return "invalid_profile"
        if not (np.isfinite(weights).all() and math.isfinite(self.bias)):
            return "invalid_profile"
        if np.abs(weights).max(initial=0.0) > MAX_ABS_WEIGHT or abs(self.bias) > MAX_ABS_WEIGHT:
            return "invalid_profile"
        return None


def personalize(head_scores: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """(B, H) head scores, (B, H) per-row weights, (B,) biases → (B,) scores, in float64; never NaN."""
    scores = np.einsum("bh,bh->b", head_scores.astype(np.float64), weights.astype(np.float64)) + bias
    if not np.isfinite(scores).all():
        raise NonFiniteScores(f"{int((~np.isfinite(scores)).sum())} of {len(scores)} scores are not finite")
    return scores


@dataclass(frozen=True)
class Contribution:
    head: str
    head_score: float
    weight: float
    contribution: float  # weight × head_score; a response's contributions plus the bias sum to its score


def explain(head_scores: np.ndarray, weights: np.ndarray, head_names: list[str],
            top: int | None = None) -> list[Contribution]:
    """Each head's part of one response's score, largest |contribution| first: all of them (they sum to the
    score less the bias), or the `top` first among those that contribute (a head weighted 0 explains nothing)."""
    parts = np.asarray(head_scores, dtype=np.float64) * weights  # (H,)
    order = np.argsort(-np.abs(parts), kind="stable")
    if top is not None:
        order = order[parts[order] != 0][:top]
    return [Contribution(head_names[h], float(head_scores[h]), float(weights[h]), float(parts[h])) for h in order]


def preference_probability(score_a: float, score_b: float) -> float:
    """Bradley-Terry P(a ≻ b) = σ(score_a − score_b), stable for any finite scores."""
    margin = score_a - score_b
    if margin >= 0:
        return 1.0 / (1.0 + math.exp(-margin))
    z = math.exp(margin)
    return z / (1.0 + z)


# ---------------------------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class ScoreJob:
    """One request's (prompt, response) texts and the profile to score them with.

    `reject_over_length`: a job with a text longer than the token limit is not scored at all (the caller
    answers 422) instead of being scored on its truncated text.
    """

    items: list[tuple[Prompt, str]]
    weights: np.ndarray  # (H,)
    bias: float
    reject_over_length: bool = False


@dataclass
class ScoredJob:
    truncated: list[bool]  # per text: did it exceed the token limit (and was cut)?
    scores: np.ndarray | None = None  # (n,) personalized scores; None when refused for length
    head_scores: np.ndarray | None = None  # (n, H)

    @property
    def over_length(self) -> list[int]:
        return [i for i, cut in enumerate(self.truncated) if cut]


class BatchScorer:
    """Texts of many jobs → one token-budget batched forward pass → head scores → each job's own profile.

    Truncation policy: a rendered (prompt, response) text keeps its first `backbone.max_length` tokens, the
    same cut the head set's training embeddings got (`EmbeddingExtractor`), so served scores match the data the
    heads were fitted on; every text's result says whether it was cut.
    """

    def __init__(self, backbone: Backbone, token_budget: int | None = None, max_batch: int = 64):
        self.backbone = backbone
        self.extractor = EmbeddingExtractor(backbone, token_budget=token_budget, max_batch=max_batch)

    def score(self, heads: HeadSet, jobs: list[ScoreJob]) -> list[ScoredJob]:
        """One result per job, in order; a refused job (see `ScoreJob`) carries only its truncation flags."""
        if heads.dim != self.backbone.dim:
            raise ValueError(f"head set {heads.name}@{heads.version} is over {heads.dim}-d features, but "
                             f"backbone {self.backbone.name} gives {self.backbone.dim}-d")
        tok = self.backbone.tokenizer
        ids, cut = self._tokenize([render(prompt, response, tok) for job in jobs for prompt, response in job.items])
        bounds = np.cumsum([0] + [len(job.items) for job in jobs])
        results = [ScoredJob(cut[a:b]) for a, b in itertools.pairwise(bounds)]
        kept = [j for j, job in enumerate(jobs) if not (job.reject_over_length and any(results[j].truncated))]
        rows = [i for j in kept for i in range(bounds[j], bounds[j + 1])]
        head_scores = heads.scores(self.extractor.embed_ids([ids[i] for i in rows]))  # (B, H)
        sizes = [len(jobs[j].items) for j in kept]
        weights = np.zeros((len(rows), heads.num_heads))  # (B, H): each row its own request's profile
        bias = np.zeros(len(rows))  # (B,)
        starts = np.cumsum([0] + sizes)
        for j, a, b in zip(kept, starts[:-1], starts[1:]):
            weights[a:b], bias[a:b] = jobs[j].weights, jobs[j].bias
        scores = personalize(head_scores, weights, bias)  # (B,)
        for j, a, b in zip(kept, starts[:-1], starts[1:]):
            results[j].scores, results[j].head_scores = scores[a:b], head_scores[a:b]
        return results

    def _tokenize(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids cut at the backbone's limit, and whether each text had to be cut.

        Tokenizing one token past the limit tells which texts are longer without tokenizing them whole; only
        those are tokenized again, with the tokenizer's own truncation (which keeps the closing special tokens).
        """
        limit = self.backbone.max_length
        probe = self.backbone.tokenizer(texts, truncation=True, max_length=limit + 1, padding=False,
                                        return_attention_mask=False)["input_ids"]
        cut = [len(row) > limit for row in probe]
        long = [i for i, c in enumerate(cut) if c]
        for i, row in zip(long, self.extractor.tokenize([texts[i] for i in long]) if long else []):
            probe[i] = row
        return probe, cut


# ---------------------------------------------------------------------------------------------- caches


class LruCache(Generic[K, V]):
    """A bounded mapping that forgets the least recently used entry."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def peek(self, key: K) -> V | None:
        """The entry without touching recency or counters."""
        return self._items.get(key)

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def pop(self, key: K) -> V | None:
        return self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


Revision = tuple[bool, int | None, datetime | None]  # (user exists, profile version, profile created at)


@dataclass(frozen=True)
class UserState:
    """What the store says of a user: unknown, known without a profile, or known with this profile."""

    known: bool
    profile: Profile | None = None

    @property
    def revision(self) -> Revision:
        """What a cached state is checked against: (user exists, profile version, profile created at)."""
        if self.profile is None:
            return self.known, None, None
        return self.known, self.profile.version, self.profile.created_at


class ProfileCache:
    """Users' states on one replica, keyed by (user, revision).

    A lookup names the revision the store says is current (one small query for many requests, see the service),
    so a cached profile is used exactly while it is still the user's latest, whichever replica wrote the newer
    one: a write anywhere invalidates every replica's entry by moving the version (a deleted and recreated user
    by a new creation time). `latest()` is the last state
    seen, for when the store cannot be asked.
    """

    def __init__(self, capacity: int):
        self.entries: LruCache[str, UserState] = LruCache(capacity)

    def get(self, user: str, revision: Revision) -> UserState | None:
        state = self.entries.get(user)
        return state if state is not None and state.revision == revision else None

    def latest(self, user: str) -> UserState | None:
        return self.entries.peek(user)

    def put(self, user: str, state: UserState) -> None:
        self.entries.put(user, state)

    def invalidate(self, user: str) -> None:
        self.entries.pop(user)

    def __len__(self) -> int:
        return len(self.entries)
