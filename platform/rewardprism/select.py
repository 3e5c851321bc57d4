"""Active selection: which pairs to ask a user to label next, so that a few labels teach the most.

A user's profile under the default adaptation (`adapt.hierarchical_bt`) has a posterior over head weights: per
prior strength of the ladder, a Laplace approximation N(ŵ_g, (l2_g·I + F)⁻¹) at that strength's MAP (F the
labels' Bradley-Terry Fisher information Σᵢ pᵢ(1−pᵢ) xᵢxᵢᵀ), mixed by the strengths' posterior probabilities
(`posteriors`). Its mean is exactly the profile the default method serves. A user with no labels gets the
population prior: every component at the head set's default profile, weighted by the hyperprior alone.

Criteria for a pool of candidate pairs, each given by its head-score gap x = s_a − s_b (which response is "a"
does not matter to any criterion):
- `information` (default): the mutual information between the pair's label and (strength, weights) under that
  mixture (BALD): the entropy of the predicted label minus its expected entropy given the weights. Within a
  strength it prefers pairs the posterior is unsure of along directions the labels have not pinned down; across
  strengths it prefers pairs on which a user who agrees with the population and one who does not would answer
  differently, which is what decides how far a profile may move. A batch of k is chosen greedily: after each
  pick the posterior is updated as if the pair were answered as it expects (its Fisher term, a Newton step of
  each mean, each strength weighed by its prediction), so a near-copy of a pick gains almost nothing and is not
  asked twice.
- `uncertainty`: the smallest |μ·x|, the pairs the current profile is least sure how to order (a baseline: it
  ignores what the labels already determine, and asks near-copies).
- `random`: the protocol's uniform sample (a baseline).

Vectorized over the pool: one (N, H) × (H, H) product and closed forms per pair and strength; one (N, H) ×
(H, G) product per further pick of a batch. The parameter-only criterion (the D-optimal increment at one
strength) was tried first and lost to random pairs for users who differ from the population: it never asks the
pairs that would reveal that they differ.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from rewardprism.adapt import DEFAULT_STRENGTH, STRENGTHS, adapt_users, gap_scale, strength_ladder, strength_posterior
from rewardprism.data import PreferencePair, Prompt
from rewardprism.heads import HeadSet
from rewardprism.protocol import SEEDS, AdaptationResult, ScoredPairs, pair_accuracy

SelectMethod = Literal["information", "uncertainty", "random"]
SELECT_METHODS = ("information", "uncertainty", "random")


@dataclass(frozen=True)
class Posterior:
    """The default method's belief about one user's head weights: a mixture over the ladder's prior strengths.

    Component g is the Laplace approximation N(means[g], (precisions[g]·I + fisher)⁻¹) at that strength's MAP;
    `fisher` (H, H), the labels' Bradley-Terry Fisher information Σᵢpᵢ(1−pᵢ)xᵢxᵢᵀ, is taken at the mixture's mean
    for every component, so that all components share its eigenvectors (one pass over a pool serves them all).
    """

    probabilities: np.ndarray  # (G,) posterior probability of each strength
    means: np.ndarray  # (G, H)
    precisions: np.ndarray  # (G,) prior precision l2 of each strength
    fisher: np.ndarray  # (H, H)

    @property
    def mean(self) -> np.ndarray:
        """(H,) the profile the default method serves for these labels."""
        return self.probabilities @ self.means


def posteriors(chosen: np.ndarray, rejected: np.ndarray, prior_weights: np.ndarray, *,
               center: float | None = None, pool_gaps: Sequence[np.ndarray] | None = None,
               strengths: np.ndarray = STRENGTHS, spread: float = 1.0) -> list[Posterior]:
    """The default method's posterior for each of U users from (U, n, H) labelled scores (n may be 0).

    `center` is the head set's hyperprior centre (None: `DEFAULT_STRENGTH`). Prior precision is in units of a
    user's mean squared score gap (as the adaptation's); with no labels yet, the gaps of the user's candidate
    pool (`pool_gaps`, one (N_u, H) array per user) set that unit instead. Strengths with posterior probability
    below 1e-6 are dropped.
    """
    chosen, rejected = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    users, n, heads = chosen.shape
    prior = np.broadcast_to(np.asarray(prior_weights, np.float64), (users, heads))
    strengths = np.sort(np.asarray(strengths, np.float64))[::-1]
    center = DEFAULT_STRENGTH if center is None else center
    if n:
        weights, evidence, strengths = strength_ladder(chosen, rejected, prior=prior, strengths=strengths)
        scale = gap_scale(chosen - rejected)
    else:
        if pool_gaps is None or len(pool_gaps) != users:
            raise ValueError("a user with no labels needs their candidate pool's gaps to set the prior's unit")
        weights = np.broadcast_to(prior[:, None], (users, len(strengths), heads))
        evidence = np.zeros((users, len(strengths)))
        scale = np.array([gap_scale(np.asarray(g, np.float64)[None])[0] for g in pool_gaps])
    mixture = strength_posterior(evidence, strengths, center, spread)  # (U, G)
    x = chosen - rejected  # (U, n, H)
    out = []
    for u in range(users):
        kept = mixture[u] > 1e-6
        probabilities = mixture[u, kept] / mixture[u, kept].sum()
        mean = probabilities @ weights[u, kept]
        p = 1.0 / (1.0 + np.exp(-(x[u] @ mean)))
        v = x[u] * np.sqrt(p * (1 - p))[:, None]
        out.append(Posterior(probabilities, weights[u, kept], strengths[kept] * scale[u], v.T @ v))
    return out


def select_pairs(gaps: np.ndarray, posterior: Posterior, k: int, method: SelectMethod = "information", *,
                 exclude: np.ndarray | None = None, seed: int | None = None) -> np.ndarray:
    """Indices of the k pool pairs (gaps (N, H)) to ask next, in asking order; `exclude` marks pairs not to ask."""
    gaps = np.asarray(gaps, np.float64)
    if gaps.ndim != 2 or gaps.shape[1] != len(posterior.mean):
        raise ValueError(f"gaps must be (pairs, {len(posterior.mean)}), got {gaps.shape}")
    allowed = np.ones(len(gaps), bool) if exclude is None else ~np.asarray(exclude, bool)
    if not 1 <= k <= allowed.sum():
        raise ValueError(f"k must be between 1 and the {int(allowed.sum())} pairs left in the pool, got {k}")
    if not np.isfinite(gaps).all():
        raise ValueError("candidate head scores hold NaN or inf")
    if method == "random":
        return np.random.default_rng(seed).choice(np.flatnonzero(allowed), k, replace=False)
    if method == "uncertainty":
        order = np.argsort(np.where(allowed, np.abs(gaps @ posterior.mean), np.inf), kind="stable")
        return order[:k]
    if method != "information":
        raise ValueError(f"unknown selection method {method!r}; use one of {', '.join(SELECT_METHODS)}")
    return _greedy_information(gaps, posterior, k, allowed)


def _greedy_information(gaps: np.ndarray, posterior: Posterior, k: int, allowed: np.ndarray) -> np.ndarray:
    """Greedy batch by mutual information: after each pick, the posterior is updated as if the pair had been
    answered the way the posterior itself expects (a "believer" update), so that the next pick asks something else.

    Per component g the score a = w·x is N(m_g, s_g²), m_g = means[g]·x, s_g² = xᵀΣ_g x. With the fisher matrix's
    eigenvectors Q (eigenvalues λ), s_g² = Σⱼ (Qᵀx)ⱼ² / (l2_g + λⱼ): one (N, H) × (H, H) product for all g.
    The believed answer ŷ to x* is the more likely one under the mixture. Its expected Fisher term c* joins every
    component: Σ_g' = Σ_g − c* Σ_g x*x*ᵀΣ_g / (1 + c* s_g*²), so each candidate's s_g² drops by
    c* (xᵀΣ_g x*)² / (1 + c* s_g*²); each mean takes one Newton step towards ŷ, Σ_g' x* (ŷ − σ(m_g*)); and each
    strength's probability is weighed by how well it predicted ŷ. Without the last two, the information about
    which strength is right is never used up, and a batch asks copies of a pair that separates the strengths.
    One (N, H) × (H, G) product per pick.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(posterior.fisher)
    eigenvalues = np.maximum(eigenvalues, 0.0)
    inverse = 1.0 / (posterior.precisions[None, :] + eigenvalues[:, None])  # (H, G)
    pool = gaps.astype(np.float32)  # the pool-sized work in float32: twice as fast, ample for a ranking
    variance = ((pool @ eigenvectors.astype(np.float32)) ** 2) @ inverse.astype(np.float32)  # (N, G)
    margin = pool @ posterior.means.T.astype(np.float32)  # (N, G)
    probabilities = posterior.probabilities
    covariances = None  # (G, H, H), built at the first pick that needs them
    unused, fresh = allowed.copy(), allowed.copy()  # fresh: not a near-copy of a pick (copies only when none is)
    picks = []
    for _ in range(k):
        information, fisher = _label_information(margin, variance, probabilities)
        best = int(np.argmax(np.where(fresh if fresh.any() else unused, information, -np.inf)))
        picks.append(best)
        unused[best] = False
        fresh &= ~_near_copies(pool, best)
        if len(picks) == k:
            break
        if covariances is None:
            covariances = np.einsum("hj,jg,kj->ghk", eigenvectors, inverse, eigenvectors)
        m, v = margin[best].astype(np.float64), variance[best].astype(np.float64)  # (G,) each
        predicted = 1.0 / (1.0 + np.exp(-m / np.sqrt(1.0 + _PROBIT * v)))  # P(a preferred) per strength
        believed = float(probabilities @ predicted >= 0.5)
        probabilities = probabilities * (predicted if believed else 1.0 - predicted)
        probabilities = probabilities / probabilities.sum()
        directions = covariances @ gaps[best]  # (G, H) Σ_g x*
        denominators = 1.0 + fisher[best] * v  # (G,)
        cross = pool @ directions.T.astype(np.float32)  # (N, G) xᵀΣ_g x*
        step = (believed - 1.0 / (1.0 + np.exp(-m))) / denominators  # (G,) Newton step along Σ_g' x*
        margin = margin + cross * step.astype(np.float32)
        variance = np.maximum(variance - (fisher[best] / denominators).astype(np.float32) * cross ** 2, 0.0)
        covariances = covariances - fisher[best] * np.einsum("gh,gk->ghk", directions, directions) \
            / denominators[:, None, None]
    return np.array(picks)


NEAR_COPY = 0.99  # cosine between two pairs' gaps above which a batch asks only one of them


def _near_copies(pool: np.ndarray, index: int) -> np.ndarray:
    """(N,) the pairs whose gaps point the way pool[index]'s does (cosine ≥ NEAR_COPY), itself included.

    A user answers the same comparison the same way, so a second copy in one batch teaches nothing: the model's
    independent Bradley-Terry labels would count it again, and in a strong prior one label moves the posterior too
    little for that to stop it. A pair pointing the opposite way is the same comparison too.
    """
    target = pool[index]
    norms = np.linalg.norm(pool, axis=1) * np.linalg.norm(target)
    cosine = np.abs(pool @ target) / np.where(norms > 0, norms, 1.0)
    copies = cosine >= NEAR_COPY
    copies[index] = True
    return copies


_PROBIT = np.pi / 8  # σ(a) ≈ Φ(√(π/8)·a): the logistic as a probit, so that Gaussian averages have closed forms
_ENTROPY_WIDTH = 4 * np.log(2)  # h(σ(a)) ≈ ln 2 · exp(−a² / (2 · 4 ln 2)) (Houlsby et al. 2011, in nats)


def _label_information(margin: np.ndarray, variance: np.ndarray,
                       probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mutual information (nats) between a pair's label and (strength, weights), and the expected Fisher weight.

    h(E σ(a)) − E h(σ(a)) under the mixture (h the binary entropy), with MacKay's probit approximation for E σ(a)
    and Houlsby et al.'s (BALD, arXiv:1112.5745) for E h(σ(a)), both closed forms per component: it counts what
    the label says about the weights within a strength and about which strength is right (the components
    disagree most on pairs the population is sure of but a user who differs would not be). (N, G) inputs.
    """
    stretch = 1.0 + _PROBIT * variance  # (N, G)
    probabilities = probabilities.astype(margin.dtype)
    predictive = (1.0 / (1.0 + np.exp(-margin / np.sqrt(stretch)))) @ probabilities
    width = _ENTROPY_WIDTH + variance
    conditional = (np.log(2) * np.sqrt(_ENTROPY_WIDTH / width) * np.exp(-margin ** 2 / (2 * width))) @ probabilities
    density = np.exp(-_PROBIT * margin ** 2 / (2 * stretch)) / np.sqrt(2 * np.pi)
    fisher = (np.sqrt(_PROBIT / stretch) * density) @ probabilities  # E σ(a)(1 − σ(a)) = E σ'(a)
    predictive = np.clip(predictive.astype(np.float64), 1e-300, 1 - 1e-16)
    marginal = -(predictive * np.log(predictive) + (1 - predictive) * np.log1p(-predictive))
    return np.maximum(marginal - conditional, 0.0), fisher


def choose_pairs(heads: HeadSet, chosen: np.ndarray, rejected: np.ndarray, gaps: np.ndarray, k: int,
                 method: SelectMethod = "information", exclude: np.ndarray | None = None) -> np.ndarray:
    """The k pairs of a pool (gaps (N, H)) to ask a user whose labelled pairs have these (n, H) head scores, under
    the default method's posterior over `heads` (what the service answers a query with)."""
    (belief,) = posteriors(chosen[None], rejected[None], heads.default_weights, pool_gaps=[gaps],
                           center=heads.hyperprior_center)
    return select_pairs(gaps, belief, k, method, exclude=exclude)


def response_pairs(head_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every unordered pair (i < j) of R responses to one prompt: indices (P, 2) and gaps s_i − s_j (P, H)."""
    first, second = np.triu_indices(len(head_scores), k=1)
    return np.stack([first, second], 1), head_scores[first] - head_scores[second]


# ----------------------------------------------------------------------------------------------- evaluation

def evaluate_selection(test: ScoredPairs, n: int, *, method: SelectMethod, prior: np.ndarray,
                       center: float | None = None, seeds: Sequence[int] = SEEDS, batch: int = 1,
                       pool_fraction: float = 0.5, label: str = "") -> AdaptationResult:
    """A simulated user asked n pairs by `method`, answering with its recorded labels, then scored honestly.

    Per group (a user) and seed, the group's pairs are split at random into an adaptation pool (`pool_fraction`)
    and held-out pairs. The user is asked `batch` pairs at a time from the pool, the posterior re-fitted after
    each batch; the profile the default method adapts from the n answers is scored on the held-out pairs only.
    Every method sees the same pools and held-out pairs for a seed, so "chosen n" and "random n" compare directly;
    n = 0 scores the population profile (`prior`) on them.
    """
    if not 0 < pool_fraction < 1:
        raise ValueError(f"pool_fraction must be in (0, 1), got {pool_fraction}")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    groups, correct, total, picks_of, profiles_of = test.group_names, [], [], {}, {}
    for group in groups:
        members = test.indices(group)
        pools, held = [], []
        for seed in seeds:
            order = np.random.default_rng(seed).permutation(members)
            size = int(round(len(members) * pool_fraction))
            pools.append(order[:size])
            held.append(order[size:])
        if n > min(map(len, pools)) or not min(map(len, held)):
            raise ValueError(f"group {group!r} has {len(members)} pairs: too few for a pool of {n} asked pairs "
                             f"and held-out pairs (pool fraction {pool_fraction})")
        if n:
            asked = _ask(test, pools, n, method, prior, center, batch, seeds)  # (S, n) indices into test
            profiles = adapt_users(test.chosen[asked], test.rejected[asked], prior, method="default",
                                   center=center)[0]
        else:  # nothing asked: the population profile, on the same held-out pairs
            asked, profiles = np.zeros((len(seeds), 0), int), np.tile(prior, (len(seeds), 1))
        hits = [pair_accuracy(test.chosen[h], test.rejected[h], profiles[s])[:, 0] for s, h in enumerate(held)]
        correct.append([int(h.sum()) for h in hits])
        total.append([len(h) for h in hits])
        picks_of[group], profiles_of[group] = asked, profiles
    correct, total = np.array(correct), np.array(total)
    return AdaptationResult(label or f"{method} n={n}", groups, correct, total, correct, total, picks_of, profiles_of)


def _ask(test: ScoredPairs, pools: list[np.ndarray], n: int, method: SelectMethod, prior: np.ndarray,
         center: float | None, batch: int, seeds: Sequence[int]) -> np.ndarray:
    """(S, n) pairs each seed's simulated user is asked, `batch` at a time, re-fitting the posterior in between."""
    if method == "random":
        return np.stack([pool[np.random.default_rng(seed).choice(len(pool), n, replace=False)]
                         for pool, seed in zip(pools, seeds)])
    gaps = [test.chosen[pool] - test.rejected[pool] for pool in pools]
    asked = [np.zeros(0, int) for _ in pools]  # positions in each pool
    while len(asked[0]) < n:
        labelled = np.stack([pool[a] for pool, a in zip(pools, asked)])  # (S, t)
        beliefs = posteriors(test.chosen[labelled], test.rejected[labelled], prior, center=center, pool_gaps=gaps)
        k = min(batch, n - len(asked[0]))
        for s, belief in enumerate(beliefs):
            taken = np.zeros(len(pools[s]), bool)
            taken[asked[s]] = True
            asked[s] = np.concatenate([asked[s], select_pairs(gaps[s], belief, k, method, exclude=taken)])
    return np.stack([pool[a] for pool, a in zip(pools, asked)])


def selection_report(test: ScoredPairs, prior: np.ndarray, *, center: float | None, n_values: Sequence[int],
                     method: SelectMethod = "information", seeds: Sequence[int] = SEEDS,
                     batch: int = 5) -> dict[str, Any]:
    """Rows "chosen n" (asked one at a time, and `batch` at a time) next to "random n" from the same pools,
    honest accuracy (held-out pairs only), mean (std) over seeds per group and overall."""
    population = evaluate_selection(test, 0, method="random", prior=prior, center=center, seeds=seeds)
    rows = [{"label": "population profile (no feedback)", "n": 0, "honest": population.summary()}]
    for n in n_values:
        runs = [(method, 1, f"chosen n={n} ({method}, one at a time)"),
                (method, batch, f"chosen n={n} ({method}, {batch} at a time)"), ("random", 1, f"random n={n}")]
        for how, size, label in runs:
            if size > 1 and (how == "random" or size >= n):
                continue  # random needs no batches; a batch of all n is one query
            result = evaluate_selection(test, n, method=how, prior=prior, center=center, seeds=seeds, batch=size,
                                        label=label)
            rows.append({"label": label, "n": n, "honest": result.summary()})
    return {"method": method, "batch": batch, "seeds": len(seeds), "groups": test.group_names, "rows": rows}


def selection_markdown(report: dict[str, Any]) -> str:
    """The selection rows as a markdown table (honest accuracy; each seed splits every group into a pool and
    held-out pairs, the same for every row)."""
    columns = report["groups"] + ["overall"]
    lines = [f"Active selection ({report['method']}), honest accuracy on each group's held-out pairs, "
             f"{report['seeds']} seeds:", "", "| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row in report["rows"]:
        cells = [row["honest"].get(c) for c in columns]
        lines.append(f"| {row['label']} | " + " | ".join("" if c is None else f"{c[0]:.3f} ({c[1]:.3f})"
                                                         for c in cells) + " |")
    return "\n".join(lines) + "\n"


def unlabelled_pool(heads: HeadSet, chosen: np.ndarray, rejected: np.ndarray, pairs: Sequence[PreferencePair],
                    seed: int = 0) -> tuple[list[tuple[Prompt, str, str]], np.ndarray]:
    """Labelled pairs as a pool to ask from: (prompt, a, b) per pair, each pair's responses in a random order so
    the order shown gives no label away, and the gaps s(a) − s(b) (N, H) from their features (N, d)."""
    flip = np.random.default_rng(seed).random(len(pairs)) < 0.5
    a = heads.scores(np.where(flip[:, None], rejected, chosen))
    b = heads.scores(np.where(flip[:, None], chosen, rejected))
    texts = [(p.prompt, p.rejected, p.chosen) if f else (p.prompt, p.chosen, p.rejected) for p, f in zip(pairs, flip)]
    return texts, a - b
