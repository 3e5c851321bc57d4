"""Personalization: a user's profile (weights over a head set's heads, and a bias) from a few labelled pairs.

Every method reads head scores, never features: the chosen and rejected scores of a user's n pairs, (n, H). A
profile is over RAW head scores, score = head_scores @ weights + bias (what `HeadSet` and serving apply).
Batched functions adapt many users at once, padded to the longest user: (U, n, H) scores and a (U, n) mask.

- `hyre`: HyRe exactly as the DRM reference uses it (Lee et al. 2025, "Test-Time Alignment via Hypothesis
  Reweighting", arXiv:2412.08812): per head, the mean and unbiased std of the 2n pooled scores (std 0 → 1),
  loss_h = Σᵢ −log σ(z_chosen,i − z_rejected,i), weights = softmax(−loss / T).
- `bt`: Bradley-Terry weights with a Gaussian prior centred on the population profile (MAP), one strength.
- `default` (`hierarchical_bt`): the MAP-BT profiles for a ladder of prior strengths, averaged with each
  strength's posterior probability: its Laplace evidence for the user's labels times a log-normal hyperprior.
  The hyperprior's centre belongs to the head set (`HeadSet.hyperprior_center`): the strength at which users
  drawn from held-out training prompts were scored best (`calibrate.calibrate_hyperprior`).

Why not HyRe as the default: it starts from a uniform belief over heads and, with few labels, hands the weight
to whichever head fits them, which can fall below the population head. A prior centred on the population
profile keeps a user who agrees with the population there; labels it cannot explain favour a weaker prior, so a
user who differs moves as far as the labels warrant. Strengths are relative to the user's mean squared score
gap, so nothing depends on the backbone's scale.

Incremental updates: a user's new pairs change only that user's profile, refitted from the user's pairs
(O(n²H) per strength); `bt` also takes `init=` the current weights, and Newton resumes from there.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Method = Literal["default", "hyre", "bt"]
Profiles = tuple[np.ndarray, np.ndarray]  # weights (U, H), bias (U,)
NOT_FINITE = "head scores hold NaN or inf"
METHODS = ("default", "hyre", "bt")
# Prior precision / the user's mean squared score gap: the centre of `hierarchical_bt`'s hyperprior for a head set
# that carries no calibrated one (`HeadSet.hyperprior_center`, chosen by `calibrate.calibrate_hyperprior` when the
# head set is built: 1,000 to 100,000 on the data in docs/drm.md, where users mostly agree with the population).
DEFAULT_STRENGTH = 50.0
STRENGTHS = np.logspace(-1, 6, 15)  # the ladder `hierarchical_bt` averages over


def adapt_profile(chosen_scores: np.ndarray, rejected_scores: np.ndarray, prior_weights: np.ndarray | None,
                  method: Method = "default", *, center: float | None = None, **opts) -> tuple[np.ndarray, float]:
    """One user's profile from their n labelled pairs: (n, H) scores → weights (H,), bias.

    `prior_weights` is the population profile (the head set's `default_weights`); HyRe ignores it. `center` is the
    head set's `hyperprior_center` (None: `DEFAULT_STRENGTH`); only the default method uses it. `opts` go to the
    method (`temperature` for hyre; `strength`, `l2`, `init` for bt; `spread`, `strengths` for default).
    """
    chosen_scores, rejected_scores = np.asarray(chosen_scores), np.asarray(rejected_scores)
    if chosen_scores.ndim != 2:
        raise ValueError(f"chosen_scores must be (pairs, heads), got {chosen_scores.shape}")
    weights, bias = adapt_users(chosen_scores[None], np.asarray(rejected_scores)[None], prior_weights,
                                method=method, center=center, **opts)
    return weights[0], float(bias[0])


def adapt_users(chosen_scores: np.ndarray, rejected_scores: np.ndarray, prior_weights: np.ndarray | None = None,
                mask: np.ndarray | None = None, *, method: Method = "default", center: float | None = None,
                **opts) -> Profiles:
    """Profiles of U users at once from padded (U, n, H) scores and a (U, n) mask (True = a real pair).

    `prior_weights` is (H,) for everyone or (U, H) per user; `center` as in `adapt_profile`. Returns weights
    (U, H) and bias (U,).
    """
    if method == "hyre":
        return hyre(chosen_scores, rejected_scores, mask, **opts)
    if method == "bt":
        return bt(chosen_scores, rejected_scores, mask, prior=prior_weights, **opts)
    if method == "default":
        return hierarchical_bt(chosen_scores, rejected_scores, mask, prior=prior_weights,
                               center=DEFAULT_STRENGTH if center is None else center, **opts)
    raise ValueError(f"unknown adaptation method {method!r}; use one of {', '.join(METHODS)}")


def _checked(chosen: np.ndarray, rejected: np.ndarray,
             mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Shapes and mask checked (the mask as bool), the scores untouched: no pass over them."""
    chosen, rejected = np.asarray(chosen), np.asarray(rejected)
    if chosen.ndim != 3 or chosen.shape != rejected.shape:
        raise ValueError(f"chosen and rejected scores must both be (users, pairs, heads), got {chosen.shape} "
                         f"and {rejected.shape}")
    users, n, _ = chosen.shape
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (users, n):
            raise ValueError(f"mask must be (users, pairs) = {(users, n)}, got {mask.shape}")
        if not mask.any(axis=1).all():
            raise ValueError(f"user(s) {np.flatnonzero(~mask.any(axis=1))[:5].tolist()} have no labelled pairs")
    return chosen, rejected, mask


def _validated(chosen: np.ndarray, rejected: np.ndarray,
               mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Float64 chosen, rejected (U, n, H) with padding zeroed, and the mask as float64 (U, n) (None: no padding)."""
    chosen, rejected, mask = _checked(chosen, rejected, mask)
    chosen, rejected = chosen.astype(np.float64, copy=False), rejected.astype(np.float64, copy=False)
    if mask is not None:
        chosen, rejected = np.where(mask[..., None], chosen, 0.0), np.where(mask[..., None], rejected, 0.0)
    if not (np.isfinite(chosen.sum()) and np.isfinite(rejected.sum())):  # one pass each; NaN/inf propagate
        raise ValueError(NOT_FINITE)
    return chosen, rejected, None if mask is None else mask.astype(np.float64)


def _as_batch(chosen: np.ndarray, rejected: np.ndarray, mask: np.ndarray | None,
              prior: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_validated` as float64 tensors, the mask all ones without padding, and the prior per user (U, H)."""
    chosen, rejected, mask = _validated(chosen, rejected, mask)
    users, n, heads = chosen.shape
    weight = torch.ones(users, n, dtype=torch.float64) if mask is None else torch.from_numpy(mask)
    return (torch.from_numpy(chosen), torch.from_numpy(rejected), weight,
            _per_user(prior, users, heads, "prior weights"))


def _per_user(weights: np.ndarray | None, users: int, heads: int, name: str) -> torch.Tensor:
    """(H,) or (U, H) weights (None → zeros) as a (U, H) float64 tensor."""
    weights = np.zeros(heads) if weights is None else np.asarray(weights, dtype=np.float64)
    if weights.shape not in ((heads,), (users, heads)) or not np.isfinite(weights).all():
        raise ValueError(f"{name} must be finite, ({heads},) or ({users}, {heads}), got {weights.shape}")
    return torch.from_numpy(np.array(np.broadcast_to(weights, (users, heads))))


# ----------------------------------------------------------------------------------------------- HyRe

USER_BLOCK = 32  # users per HyRe block: a block's (users, n, H) arrays stay in cache (32: fastest measured)


def hyre(chosen: np.ndarray, rejected: np.ndarray, mask: np.ndarray | None = None, *,
         temperature: float = 1.0) -> Profiles:
    """HyRe profiles, with the reference's per-head standardization folded into weights and bias.

    The reference scores a response by Σ_h w_h (s_h − m_h) / sd_h; over raw scores that is
    weights = w / sd and bias = −Σ_h w_h m_h / sd_h. Users go through in blocks of `USER_BLOCK`, each block
    vectorized, and every block works in one buffer allocated once: intermediates stay in cache, and no block
    pays for fresh pages (a new array per step cost more than the arithmetic).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    c, r, m = _checked(chosen, rejected, mask)
    users, n, heads = c.shape
    work = np.empty((min(users, USER_BLOCK), n, heads))
    weights, bias = np.empty((users, heads)), np.empty(users)
    for s in range(0, users, USER_BLOCK):
        block = slice(s, s + USER_BLOCK)
        weights[block], bias[block] = _hyre_block(c[block], r[block], None if m is None else m[block],
                                                  temperature, work)
    return weights, bias


def _hyre_block(c: np.ndarray, r: np.ndarray, m: np.ndarray | None, temperature: float,
                work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HyRe for (B, n, H) scores, `m` (B, n) marking the real pairs (None: all), in `work` (≥ B, n, H).

    loss_h = Σᵢ log(1 + exp(−marginᵢ)) is taken as the log of a product over pairs: one log per head instead of
    one per pair. Standardized margins are bounded (|z| ≤ (N − 1)/√N for N pooled scores), so a product over
    `_product_run` pairs stays far from overflow.
    """
    c, r = c.astype(np.float64, copy=False), r.astype(np.float64, copy=False)
    if m is not None:  # padding may hold anything: zero it
        c, r = np.where(m[..., None], c, 0.0), np.where(m[..., None], r, 0.0)
    work, n = work[:len(c)], c.shape[1]
    count = np.full((len(c), 1), 2.0 * n) if m is None else 2 * m.sum(1, keepdims=True, dtype=np.float64)
    mean = (c.sum(1) + r.sum(1)) / count  # (B, H)
    if not np.isfinite(mean).all():  # NaN or inf anywhere in the block reaches its sum
        raise ValueError(NOT_FINITE)
    squares = np.zeros_like(mean)
    for scores in (c, r):
        deviation = np.subtract(scores, mean[:, None], out=work)
        if m is not None:
            deviation *= m[..., None]
        squares += np.einsum("bnh,bnh->bh", deviation, deviation)
    sd = np.sqrt(squares / (count - 1))  # (B, H) unbiased
    sd[sd == 0] = 1.0
    odds = np.subtract(r, c, out=work)  # −(z_chosen − z_rejected) · sd: the mean cancels
    odds /= sd[:, None]
    np.exp(odds, out=odds)  # odds of the wrong order
    if m is not None:
        odds *= m[..., None]
    odds += 1.0
    run = _product_run(n)
    loss = sum(np.log(odds[:, s:s + run].prod(1)) for s in range(0, n, run))  # (B, H) Σᵢ −log σ(marginᵢ)
    logits = loss / -temperature
    logits -= logits.max(1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(1, keepdims=True)  # softmax(−loss / T)
    weights = w / sd
    return weights, -(weights * mean).sum(1)


def _product_run(n: int) -> int:
    """Pairs whose factors 1 + exp(−margin) may be multiplied before a log: each is below exp(2 (N − 1)/√N)."""
    pooled = 2 * n
    return max(1, int(600 * np.sqrt(pooled) / (2 * (pooled - 1) + 1)))


# ----------------------------------------------------------------------------------------------- Bradley-Terry

def bt(chosen: np.ndarray, rejected: np.ndarray, mask: np.ndarray | None = None, *,
       prior: np.ndarray | None = None, strength: float = DEFAULT_STRENGTH, l2: float | None = None,
       init: np.ndarray | None = None) -> Profiles:
    """MAP Bradley-Terry profiles: argmin_w Σᵢ log(1 + exp(−w·xᵢ)) + l2/2 ‖w − prior‖², xᵢ = s_chosen,i − s_rejected,i.

    The prior precision is `l2` when given; otherwise strength × the user's mean squared score gap (mean of
    xᵢₕ² over pairs and heads), which leaves rankings unchanged when every head is rescaled. Convex; damped
    Newton for all users at once, from `init` ((H,) or (U, H)) when given, else from the prior. Bias is 0: a
    pair only sees score differences.
    """
    c, r, m, w0 = _as_batch(chosen, rejected, mask, prior)
    x = c - r  # (U, n, H)
    if l2 is None:
        precision = _prior_precision(x, m, strength)
    elif l2 > 0:
        precision = torch.full((len(x), 1), float(l2), dtype=torch.float64)
    else:
        raise ValueError(f"l2 must be positive, got {l2}")
    start = w0 if init is None else _per_user(init, *w0.shape, "init")
    w = _newton(x, m, w0, precision, start)
    return w.numpy(), np.zeros(len(w))


def _prior_precision(x: torch.Tensor, m: torch.Tensor, strength: float) -> torch.Tensor:
    """(U, 1) strength × mean squared score gap of each user's real pairs (gap 1 where all gaps are 0)."""
    if not strength > 0:
        raise ValueError(f"strength must be positive, got {strength}")
    return strength * torch.from_numpy(gap_scale(x.numpy(), m.numpy()))[:, None]


def gap_scale(gaps: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(U,) mean squared score gap of each user's real pairs, gaps (U, n, H) with padding zero (1 where all are 0):
    the unit of prior precision, so that rescaling every head changes no ranking."""
    count = gaps.shape[1] if mask is None else mask.sum(1)
    scale = (gaps ** 2).sum((1, 2)) / (count * gaps.shape[2])
    return np.where(scale > 0, scale, 1.0)


def _objective(x: torch.Tensor, m: torch.Tensor, w0: torch.Tensor, l2: torch.Tensor,
               w: torch.Tensor) -> torch.Tensor:
    """(U,) negative log posterior: BT loss over the real pairs plus the Gaussian prior's penalty."""
    margin = (x @ w[..., None])[..., 0]  # (U, n)
    return (torch.nn.functional.softplus(-margin) * m).sum(1) + 0.5 * l2[:, 0] * ((w - w0) ** 2).sum(1)


def _newton(x: torch.Tensor, m: torch.Tensor, w0: torch.Tensor, l2: torch.Tensor, w: torch.Tensor,
            max_iter: int = 50, tol: float = 1e-12) -> torch.Tensor:
    """Minimize `_objective` for every user: Newton steps, halved for users where a full step would not descend.

    The Hessian l2·I + VᵀV (V = √(p(1−p))·x, (U, n, H)) is inverted through the Woodbury identity, an n × n
    solve, because a user has far fewer pairs than the head set has heads. A user stops moving once its Newton
    decrement (gradient · step, twice the expected decrease) is below `tol`.
    """
    for _ in range(max_iter):
        p = torch.sigmoid(-(x @ w[..., None])[..., 0])  # (U, n) probability of the wrong order
        grad = -(x * (m * p)[..., None]).sum(1) + l2 * (w - w0)  # (U, H)
        step = _solve_hessian(x * torch.sqrt(m * p * (1 - p))[..., None], l2, grad)  # (U, H)
        active = (grad * step).sum(1) > tol  # (U,)
        if not active.any():
            break
        step = step * active[:, None]
        current = _objective(x, m, w0, l2, w)
        slack = 1e-12 * (1 + current.abs())  # rounding must not pass for an increase
        size = torch.ones(len(w), 1, dtype=torch.float64)
        for _ in range(30):
            worse = _objective(x, m, w0, l2, w - size * step) > current + slack
            if not worse.any():
                break
            size = torch.where(worse[:, None], size / 2, size)
        w = w - size * step
    return w


def _solve_hessian(v: torch.Tensor, l2: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(l2·I + VᵀV)⁻¹ g = (g − Vᵀ (l2·I + VVᵀ)⁻¹ V g) / l2 for V (U, n, H), g (U, H), l2 (U, 1)."""
    inner = l2[..., None] * torch.eye(v.shape[1], dtype=torch.float64) + v @ v.transpose(1, 2)  # (U, n, n)
    return (g - (v.transpose(1, 2) @ torch.linalg.solve(inner, v @ g[..., None]))[..., 0]) / l2


def _evidence_ladder(x: torch.Tensor, m: torch.Tensor, w0: torch.Tensor,
                     strengths: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """MAP weights (U, G, H) and Laplace log evidence (U, G) for each prior strength, strongest first.

    log p(labels | strength) ≈ −objective(ŵ) − ½ log det(I + VVᵀ/l2), up to a constant shared by all strengths:
    the fit against the Occam factor that charges a loose prior for what the few labels could not pin down
    (Sylvester's identity turns the H × H Hessian determinant into an n × n one). Each fit warm-starts from the
    previous, stronger one.
    """
    strengths = np.asarray(strengths, dtype=np.float64)
    if strengths.ndim != 1 or not len(strengths) or not (strengths > 0).all():
        raise ValueError(f"strengths must be positive numbers, got {strengths}")
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    weights, evidence, w = [], [], w0
    for strength in np.sort(strengths)[::-1]:
        l2 = _prior_precision(x, m, float(strength))
        w = _newton(x, m, w0, l2, w)
        p = torch.sigmoid(-(x @ w[..., None])[..., 0])  # (U, n)
        v = x * torch.sqrt(m * p * (1 - p))[..., None]  # (U, n, H)
        occam = torch.linalg.slogdet(eye + v @ v.transpose(1, 2) / l2[..., None])[1]  # (U,)
        weights.append(w)
        evidence.append(-_objective(x, m, w0, l2, w) - 0.5 * occam)
    return torch.stack(weights, 1), torch.stack(evidence, 1)


def hierarchical_bt(chosen: np.ndarray, rejected: np.ndarray, mask: np.ndarray | None = None, *,
                    prior: np.ndarray | None = None, strengths: np.ndarray = STRENGTHS,
                    center: float = DEFAULT_STRENGTH, spread: float = 1.0) -> Profiles:
    """The default: MAP-BT profiles over a ladder of prior strengths, averaged by posterior probability.

    Posterior of a strength ∝ its Laplace evidence × a log-normal hyperprior (`center`, `spread` in decades).
    A user whose labels agree with the prior has a flat evidence at strong priors and stays near `center`; one
    whose labels contradict it gains tens of nats from a weak prior, which outweighs the hyperprior.
    """
    weights = mix_ladder(strength_ladder(chosen, rejected, mask, prior=prior, strengths=strengths), center, spread)
    return weights, np.zeros(len(weights))


def strength_ladder(chosen: np.ndarray, rejected: np.ndarray, mask: np.ndarray | None = None, *,
                    prior: np.ndarray | None = None,
                    strengths: np.ndarray = STRENGTHS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`hierarchical_bt` before the hyperprior: MAP weights (U, G, H), log evidence (U, G), strengths (G,),
    strongest first. Mixing it for several centres (`mix_ladder`) costs nothing more."""
    c, r, m, w0 = _as_batch(chosen, rejected, mask, prior)
    weights, evidence = _evidence_ladder(c - r, m, w0, strengths)
    return weights.numpy(), evidence.numpy(), np.sort(np.asarray(strengths, dtype=np.float64))[::-1]


def mix_ladder(ladder: tuple[np.ndarray, np.ndarray, np.ndarray], center: float = DEFAULT_STRENGTH,
               spread: float = 1.0) -> np.ndarray:
    """(U, H) weights: the ladder's profiles averaged by evidence × the log-normal hyperprior."""
    weights, evidence, strengths = ladder
    return np.einsum("ug,ugh->uh", strength_posterior(evidence, strengths, center, spread), weights)


def strength_posterior(evidence: np.ndarray, strengths: np.ndarray, center: float = DEFAULT_STRENGTH,
                       spread: float = 1.0) -> np.ndarray:
    """(U, G) posterior probability of each ladder strength: its evidence × the log-normal hyperprior."""
    if not (center > 0 and spread > 0):
        raise ValueError(f"center and spread must be positive, got {center}, {spread}")
    logits = evidence - 0.5 * ((np.log10(strengths) - np.log10(center)) / spread) ** 2  # (U, G)
    posterior = np.exp(logits - logits.max(1, keepdims=True))
    return posterior / posterior.sum(1, keepdims=True)


def prior_strength_evidence(chosen: np.ndarray, rejected: np.ndarray, mask: np.ndarray | None = None, *,
                            prior: np.ndarray | None = None, strengths: np.ndarray = STRENGTHS) -> np.ndarray:
    """Laplace log evidence of each strength (in the order given), summed over the U users: (len(strengths),).

    Type-II maximum likelihood across users: the peak says how far this population's users stray from the prior.
    (Not what sets the hyperprior's centre: on HH-RLHF the evidence peaks at 316, a centre that costs accuracy;
    `calibrate.calibrate_hyperprior` chooses it by held-out accuracy instead.)
    """
    _, evidence, _ = strength_ladder(chosen, rejected, mask, prior=prior, strengths=strengths)  # strongest first
    order = np.argsort(-np.asarray(strengths, dtype=np.float64), kind="stable")
    out = np.empty(len(order))
    out[order] = evidence.sum(0)
    return out
