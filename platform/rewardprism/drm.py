"""Decomposed reward models: principal directions of preference differences, as a head set.

DRM (Luo et al. 2025, "Rethinking Diverse Human Preference Learning through Principal Component Analysis",
arXiv:2502.13131) treats each labelled pair as a vector d = φ(chosen) − φ(rejected) and takes the top-k
principal directions of the centred d's as reward heads: +PC₀…+PC_{k−1}, −PC₀…−PC_{k−1}, unit norm, no bias.

The decomposition streams: each block of pairs is reduced to (count, mean, centred scatter) in float64 and
blocks are merged with Chan et al.'s pairwise update, so N × d is never held in memory, a reduction can run on
many Ray workers (`DifferenceMoments` merges with `+`), and merging centred blocks avoids the cancellation
of the one-pass `dᵀd − n μμᵀ`. One `eigh` of the d × d covariance then gives every component.

The population head is the Bradley-Terry direction on the same differences (L2-regularized logistic regression
without intercept): the default profile of a user with no feedback and the prior adaptation starts from.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from rewardprism.features import FeatureSpec
from rewardprism.heads import HeadSet


def pair_differences(chosen: np.ndarray, rejected: np.ndarray, first_row: int = 0) -> np.ndarray:
    """(n, d) chosen and rejected features → (n, d) float64 differences, validated (rows numbered from
    `first_row` in errors)."""
    chosen, rejected = np.asarray(chosen), np.asarray(rejected)
    if chosen.ndim != 2 or chosen.shape != rejected.shape:
        raise ValueError(f"chosen and rejected must both be (n, d), got {chosen.shape} and {rejected.shape}")
    diff = np.subtract(chosen, rejected, dtype=np.float64)  # (n, d), one pass
    if not np.isfinite(diff.sum()):  # NaN or inf anywhere makes the sum so; locate rows only then
        bad = np.flatnonzero(~np.isfinite(diff).all(axis=1))
        raise ValueError(f"embeddings hold NaN or inf in {len(bad)} pair(s), first at row {first_row + bad[0]}")
    return diff


@dataclass
class DifferenceMoments:
    """Count, mean and centred scatter Σ (d − mean)(d − mean)ᵀ of a set of differences, in float64.

    The sufficient statistics of the decomposition; `a + b` is the moments of the union, so shards and Ray
    workers reduce independently and the driver sums what they return.
    """

    count: int
    mean: np.ndarray  # (d,)
    scatter: np.ndarray  # (d, d)

    @classmethod
    def zeros(cls, dim: int) -> DifferenceMoments:
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def of(cls, chosen: np.ndarray, rejected: np.ndarray, first_row: int = 0) -> DifferenceMoments:
        centred = pair_differences(chosen, rejected, first_row)
        mean = centred.mean(axis=0) if len(centred) else np.zeros(centred.shape[1])
        centred -= mean
        return cls(len(centred), mean, centred.T @ centred)  # Xᵀ X of one buffer: BLAS syrk, half a GEMM

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def __add__(self, other: DifferenceMoments) -> DifferenceMoments:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge moments of dimension {self.dim} and {other.dim}")
        n = self.count + other.count
        if n == 0:
            return DifferenceMoments.zeros(self.dim)
        delta = other.mean - self.mean  # (d,)
        mean = self.mean + delta * (other.count / n)
        scatter = self.scatter + other.scatter + np.outer(delta, delta) * (self.count * other.count / n)
        return DifferenceMoments(n, mean, scatter)


BLOCK_ROWS = 8192  # rows turned into float64 at a time: 64 MiB at d = 1024


def _moments(chosen: np.ndarray, rejected: np.ndarray) -> DifferenceMoments:
    """Moments of any number of rows, reduced `BLOCK_ROWS` at a time so the float64 copies stay small."""
    chosen, rejected = np.asarray(chosen), np.asarray(rejected)
    if chosen.ndim != 2 or chosen.shape != rejected.shape:
        raise ValueError(f"chosen and rejected must both be (n, d), got {chosen.shape} and {rejected.shape}")
    total = DifferenceMoments.zeros(chosen.shape[1])
    for start in range(0, len(chosen), BLOCK_ROWS):
        block = slice(start, start + BLOCK_ROWS)
        total = total + DifferenceMoments.of(chosen[block], rejected[block], first_row=start)
    return total


class PreferenceDecomposition:
    """PCA of centred preference differences, fitted from streamed moments (scikit-learn estimator shape).

    Learned state, as `sklearn.decomposition.PCA` names it: `components_` (k, d) orthonormal rows, oriented
    so each row's entry of largest magnitude is positive (`svd_flip`'s rule), `explained_variance_` (k,)
    (unbiased, over n − 1), `explained_variance_ratio_` (k,), `mean_` (d,), `n_samples_seen_`,
    `n_features_in_`; `moments_` keeps the sums so `partial_fit` can continue.
    """

    def __init__(self, n_components: int = 50):
        self.n_components = n_components

    def fit(self, chosen: np.ndarray, rejected: np.ndarray) -> PreferenceDecomposition:
        """Fit on (n, d) chosen and rejected features, forgetting earlier fits."""
        return self.fit_moments(_moments(chosen, rejected))

    def partial_fit(self, chosen: np.ndarray, rejected: np.ndarray) -> PreferenceDecomposition:
        """Add a block to everything seen so far and refresh the components."""
        moments = _moments(chosen, rejected)
        return self.fit_moments(self.moments_ + moments if hasattr(self, "moments_") else moments)

    def fit_shards(self, shards: Iterable[tuple[np.ndarray, np.ndarray]]) -> PreferenceDecomposition:
        """Fit on a stream of (chosen, rejected) blocks, e.g. `EmbeddingSet.shards()`; one block in memory."""
        total: DifferenceMoments | None = None
        for chosen, rejected in shards:
            moments = _moments(chosen, rejected)
            total = moments if total is None else total + moments
        if total is None:
            raise ValueError("no shards to fit")
        return self.fit_moments(total)

    def fit_moments(self, moments: DifferenceMoments) -> PreferenceDecomposition:
        """Components from merged moments (the last step of every fit, and of the Ray reduction)."""
        k = self.n_components
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"n_components must be a positive integer, got {k!r}")
        if moments.count < 2:
            raise ValueError(f"need at least 2 pairs to decompose, got {moments.count}")
        if k > moments.dim:
            raise ValueError(f"n_components={k} exceeds the embedding dimension {moments.dim}")
        covariance = moments.scatter / (moments.count - 1)  # (d, d)
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending
        top = np.argsort(eigenvalues)[::-1][:k]
        components = eigenvectors[:, top].T  # (k, d)
        signs = np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])
        self.components_ = components * signs[:, None]
        self.explained_variance_ = np.clip(eigenvalues[top], 0.0, None)
        total_variance = max(float(np.trace(covariance)), np.finfo(np.float64).tiny)
        self.explained_variance_ratio_ = self.explained_variance_ / total_variance
        self.mean_ = moments.mean.copy()
        self.n_samples_seen_ = moments.count
        self.n_features_in_ = moments.dim
        self.moments_ = moments
        return self

    def transform(self, chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
        """(n, k) coordinates of the centred differences along the components."""
        diff = pair_differences(chosen, rejected)
        if diff.shape[1] != self.n_features_in_:
            raise ValueError(f"features have dimension {diff.shape[1]}, the decomposition {self.n_features_in_}")
        return (diff - self.mean_) @ self.components_.T


# The population head's L2 strength when none is chosen: the reference's supervised baseline (sklearn C=1). The
# head set's own population head chooses by cross-validation (`calibrate.choose_population_l2`).
FIXED_L2 = 0.5


def fit_population_head(chosen: np.ndarray, rejected: np.ndarray, *, l2: float = FIXED_L2,
                        sample_weight: np.ndarray | None = None, max_iter: int = 200) -> np.ndarray:
    """The Bradley-Terry direction w (d,): minimizes Σᵢ cᵢ log(1 + exp(−w·dᵢ)) + l2/2 ‖w‖².

    No intercept (a pair's label does not depend on which side is listed first). The default `l2 = 0.5`
    equals scikit-learn's `LogisticRegression(C=1, fit_intercept=False)` on the symmetrized set {(dᵢ, 1),
    (−dᵢ, 0)}, the reference's fully supervised baseline. The weight keeps its fitted scale, so
    σ(s_chosen − s_rejected) is a calibrated probability. Plain torch L-BFGS in float64.
    """
    diff = torch.from_numpy(pair_differences(chosen, rejected))  # (n, d)
    if len(diff) == 0:
        raise ValueError("need at least one pair to fit a population head")
    if l2 <= 0:
        raise ValueError(f"l2 must be positive, got {l2}")
    weight = torch.ones(len(diff), dtype=torch.float64) if sample_weight is None else \
        torch.as_tensor(np.asarray(sample_weight, dtype=np.float64))
    if weight.shape != (len(diff),) or not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
        raise ValueError(f"sample_weight must be {len(diff)} non-negative finite numbers")
    w = torch.zeros(diff.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (weight * torch.nn.functional.softplus(-(diff @ w))).sum() + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach().numpy()


def mean_profile(decomposition: PreferenceDecomposition) -> np.ndarray:
    """Weights over [+PC₀…+PC_{k−1}, −PC₀…−PC_{k−1}] for the mean difference, as a calibrated BT logit.

    Centring removes the mean difference μ from the components, and μ is the population's consensus: the
    direction most pairs agree on. Its projection u on the components' span, scaled as the Gaussian model
    d ~ N(±μ, Σ) gives the log-odds of the stated order (2 (u·μ) / (uᵀΣu) per unit of u·d), is the population
    profile of a head set without a population head. Non-negative: +PCⱼ or −PCⱼ carries each coordinate.
    """
    coords = decomposition.components_ @ decomposition.mean_  # (k,)
    norm = float(np.linalg.norm(coords))
    if norm == 0:
        raise ValueError("the mean difference is orthogonal to every component; no population profile")
    u = decomposition.components_.T @ coords / norm  # (d,) unit
    moments = decomposition.moments_
    variance = float(u @ moments.scatter @ u) / (moments.count - 1)
    logit_per_unit = 2 * float(u @ moments.mean) / max(variance, np.finfo(np.float64).tiny)
    coords = coords / norm * logit_per_unit
    return np.concatenate([np.clip(coords, 0, None), np.clip(-coords, 0, None)])


def build_head_set(decomposition: PreferenceDecomposition, population_head: np.ndarray | None = None, *,
                   features: FeatureSpec, dataset: str = "", name: str = "drm", version: str = "1") -> HeadSet:
    """The DRM head set: [population], +PC₀…+PC_{k−1}, −PC₀…−PC_{k−1}; unit-norm rows, no biases.

    `default_weights` (the profile of a user with no feedback, and the prior of adaptation): with a population
    head, its fitted norm on head 0, so the default score is exactly the BT reward; without one, the mean
    profile (`mean_profile`). Not uniform weights: every +PC has its −PC, so a uniform mix scores 0.
    """
    components = decomposition.components_  # (k, d)
    k, dim = components.shape
    weight = [components, -components]
    names = [f"+pc{i}" for i in range(k)] + [f"-pc{i}" for i in range(k)]
    if population_head is None:
        default = mean_profile(decomposition)
    else:
        population_head = np.asarray(population_head, dtype=np.float64)
        if population_head.shape != (dim,) or not np.isfinite(population_head).all():
            raise ValueError(f"population head must be ({dim},) and finite, got {population_head.shape}")
        scale = float(np.linalg.norm(population_head))
        if scale == 0:
            raise ValueError("population head is all zeros")
        weight.insert(0, population_head[None] / scale)
        names.insert(0, "population")
        default = np.zeros(2 * k + 1)
        default[0] = scale
    info = {"method": "drm", "n_components": int(k), "n_pairs": int(decomposition.n_samples_seen_),
            "population_head": population_head is not None,
            "explained_variance": decomposition.explained_variance_.tolist(),
            "explained_variance_ratio": decomposition.explained_variance_ratio_.tolist()}
    return HeadSet(np.concatenate(weight), np.zeros(len(default)), names, "drm", features.backbone, default,
                   name=name, version=version, dataset=dataset, info=info, features=features)
