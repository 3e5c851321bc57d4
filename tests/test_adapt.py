"""Adaptation against direct NumPy statements: the HyRe steps one user at a time, the MAP-BT optimality conditions."""
from __future__ import annotations

import numpy as np
import pytest
from rewardprism.adapt import adapt_profile, adapt_users, bt, hyre, prior_strength_evidence


def hyre_reference(chosen: np.ndarray, rejected: np.ndarray, temperature: float = 1.0):
    """One user, as the issue states it: pooled mean and unbiased std of the 2n scores (std 0 → 1) per head,
    loss_h = Σᵢ −log σ(z_chosen − z_rejected), w = softmax(−loss / T); returns w, m, sd."""
    pooled = np.concatenate([chosen, rejected])  # (2n, H)
    m = pooled.mean(0)
    sd = pooled.std(0, ddof=1)
    sd[sd == 0] = 1.0
    zc, zr = (chosen - m) / sd, (rejected - m) / sd
    loss = np.log1p(np.exp(-(zc - zr))).sum(0)
    w = np.exp(-(loss - loss.min()) / temperature)
    return w / w.sum(), m, sd


def random_users(users: int, n: int, heads: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    return rng.randn(users, n, heads), rng.randn(users, n, heads)


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_hyre_matches_the_reference_steps(temperature, monkeypatch):
    monkeypatch.setattr("rewardprism.adapt.USER_BLOCK", 2)  # 5 users: blocks of 2, 2 and 1
    chosen, rejected = random_users(5, 7, 9)
    chosen[:, :, 4] = 2.5  # a constant head: std 0 → 1
    rejected[:, :, 4] = 2.5
    weights, bias = hyre(chosen, rejected, temperature=temperature)
    probe = np.random.RandomState(1).randn(11, 9)  # arbitrary responses' head scores
    for u in range(5):
        w, m, sd = hyre_reference(chosen[u], rejected[u], temperature)
        np.testing.assert_allclose(weights[u] * sd, w, rtol=1e-10)
        # folded profile over raw scores = the reference's Σ_h w_h (s_h − m_h) / sd_h
        np.testing.assert_allclose(probe @ weights[u] + bias[u], ((probe - m) / sd) @ w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n", [1, 40, 2000])
def test_hyre_long_histories_with_extreme_margins_stay_exact(n):
    """The loss is a log of products over pairs: thousands of pairs that every head gets wrong by a wide margin
    must not overflow it (a product over all 2,000 pairs would make every loss inf and the weights NaN)."""
    chosen, rejected = random_users(1, n, 4, seed=5)
    rejected += 1e3 * np.arange(1, 5)  # rejected far above chosen on every head, by a different amount
    chosen[..., 0] *= 1e6  # and on head 0 a wide spread
    weights, _ = hyre(chosen, rejected)
    w, _, sd = hyre_reference(chosen[0], rejected[0])
    assert np.isfinite(weights).all()
    np.testing.assert_allclose(weights[0] * sd, w, rtol=1e-10, atol=1e-300)


def test_hyre_structured_input_puts_the_weight_on_the_agreeing_head():
    rng = np.random.RandomState(2)
    chosen, rejected = rng.randn(1, 30, 6), rng.randn(1, 30, 6)
    chosen[0, :, 3] = rejected[0, :, 3] + 2.0 + 0.1 * rng.randn(30)  # head 3 always prefers the chosen side
    weights, _ = hyre(chosen, rejected)
    assert weights[0].argmax() == 3


def test_padding_with_a_mask_equals_separate_calls():
    chosen, rejected = random_users(3, 8, 5, seed=3)
    lengths = [8, 3, 5]
    mask = np.arange(8)[None] < np.array(lengths)[:, None]
    garbage = np.where(mask[..., None], chosen, 1e6)  # padded entries must never matter
    for method in ("hyre", "bt", "default"):
        weights, bias = adapt_users(garbage, rejected, np.full(5, 0.2), mask, method=method)
        for u, n in enumerate(lengths):
            w, b = adapt_profile(chosen[u, :n], rejected[u, :n], np.full(5, 0.2), method=method)
            np.testing.assert_allclose(weights[u], w, rtol=1e-7, atol=1e-10)
            assert bias[u] == pytest.approx(b, abs=1e-9)


def bt_gradient(x: np.ndarray, w: np.ndarray, prior: np.ndarray, l2: float) -> np.ndarray:
    """∇ of Σᵢ log(1 + exp(−w·xᵢ)) + l2/2 ‖w − prior‖², in plain NumPy."""
    return -(x * (1 / (1 + np.exp(x @ w)))[:, None]).sum(0) + l2 * (w - prior)


@pytest.mark.parametrize("strength", [0.5, 50.0])
def test_bt_is_the_map_estimate(strength):
    chosen, rejected = random_users(4, 12, 7, seed=4)
    prior = np.random.RandomState(5).randn(7)
    weights, bias = bt(chosen, rejected, prior=prior, strength=strength)
    assert not bias.any()
    for u in range(4):
        x = chosen[u] - rejected[u]
        l2 = strength * (x ** 2).mean()
        assert np.abs(bt_gradient(x, weights[u], prior, l2)).max() < 1e-6 * max(l2, 1)
    absolute, _ = bt(chosen, rejected, prior=prior, l2=3.0)
    assert np.abs(bt_gradient(chosen[0] - rejected[0], absolute[0], prior, 3.0)).max() < 1e-6


def test_bt_ranking_ignores_a_common_rescaling_of_the_heads():
    chosen, rejected = random_users(2, 10, 6, seed=6)
    prior = np.random.RandomState(7).randn(6)
    weights, _ = bt(chosen, rejected, prior=prior)
    scaled, _ = bt(chosen * 100, rejected * 100, prior=prior / 100)
    np.testing.assert_allclose(scaled * 100, weights, rtol=1e-6)


def test_a_strong_prior_keeps_the_population_profile_and_a_weak_one_fits_the_labels():
    rng = np.random.RandomState(8)
    chosen, rejected = rng.randn(1, 40, 4), rng.randn(1, 40, 4)
    chosen[0, :, 2] += 3.0  # the labels follow head 2; the prior says head 0
    prior = np.array([1.0, 0, 0, 0])
    strong, _ = bt(chosen, rejected, prior=prior, strength=1e6)
    weak, _ = bt(chosen, rejected, prior=prior, strength=1e-2)
    np.testing.assert_allclose(strong[0], prior, atol=1e-4)
    assert np.abs(weak[0]).argmax() == 2


def test_incremental_update_warm_start_equals_refit():
    chosen, rejected = random_users(1, 20, 8, seed=9)
    prior = np.full(8, 0.1)
    before, _ = adapt_profile(chosen[0, :12], rejected[0, :12], prior, "bt")
    after, _ = adapt_profile(chosen[0], rejected[0], prior, "bt", init=before)
    scratch, _ = adapt_profile(chosen[0], rejected[0], prior, "bt")
    np.testing.assert_allclose(after, scratch, atol=1e-8)


def test_adaptation_is_deterministic():
    chosen, rejected = random_users(3, 6, 5, seed=10)
    for method in ("hyre", "default"):
        a, b = adapt_users(chosen, rejected, np.ones(5), method=method), adapt_users(chosen, rejected, np.ones(5),
                                                                                      method=method)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_evidence_prefers_a_strong_prior_when_users_agree_with_it():
    rng = np.random.RandomState(11)
    heads = 6
    prior = np.array([2.0, 0, 0, 0, 0, 0])
    chosen, rejected = rng.randn(20, 10, heads), rng.randn(20, 10, heads)
    margin = (chosen - rejected) @ prior
    agree_c = np.where((margin > 0)[..., None], chosen, rejected)  # labels from the prior's own ranking
    agree_r = np.where((margin > 0)[..., None], rejected, chosen)
    other = (chosen - rejected)[..., 3] > 0  # labels from head 3 instead
    differ_c, differ_r = np.where(other[..., None], chosen, rejected), np.where(other[..., None], rejected, chosen)
    strengths = np.logspace(-1, 3, 5)
    best_agree = strengths[prior_strength_evidence(agree_c, agree_r, prior=prior, strengths=strengths).argmax()]
    best_differ = strengths[prior_strength_evidence(differ_c, differ_r, prior=prior, strengths=strengths).argmax()]
    assert best_agree > best_differ


def test_clear_errors():
    chosen, rejected = random_users(2, 4, 3)
    with pytest.raises(ValueError, match="unknown adaptation method 'magic'"):
        adapt_users(chosen, rejected, method="magic")
    with pytest.raises(ValueError, match=r"prior weights must be finite, \(3,\)"):
        adapt_users(chosen, rejected, np.ones(4))
    with pytest.raises(ValueError, match="both be"):
        adapt_users(chosen, rejected[:, :, :2])
    with pytest.raises(ValueError, match=r"chosen_scores must be \(pairs, heads\)"):
        adapt_profile(chosen, rejected, None)
    bad = chosen.copy()
    bad[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        adapt_users(bad, rejected)
    mask = np.ones((2, 4), dtype=bool)
    mask[1] = False
    with pytest.raises(ValueError, match=r"user\(s\) \[1\] have no labelled pairs"):
        adapt_users(chosen, rejected, mask=mask, method="hyre")
    with pytest.raises(ValueError, match="strength must be positive"):
        bt(chosen, rejected, strength=0.0)
    with pytest.raises(ValueError, match="temperature must be positive"):
        hyre(chosen, rejected, temperature=0)


def test_hyre_checks_each_block_for_nan_and_ignores_padding(monkeypatch):
    """HyRe checks finiteness block by block (no extra pass over all users): a NaN or inf in any block's real
    pairs is an error, whatever is in the padding is not."""
    monkeypatch.setattr("rewardprism.adapt.USER_BLOCK", 2)
    chosen, rejected = random_users(5, 4, 3)
    mask = np.ones((5, 4), dtype=bool)
    mask[4, 3] = False
    padded = chosen.copy()
    padded[4, 3] = np.nan  # padding, in the last block
    np.testing.assert_array_equal(hyre(padded, rejected, mask)[0], hyre(chosen, rejected, mask)[0])
    for bad_value in (np.nan, np.inf):
        bad = rejected.copy()
        bad[4, 0, 1] = bad_value  # a real pair of the last block
        with pytest.raises(ValueError, match="NaN or inf"):
            hyre(chosen, bad, mask)


def test_solve_hessian_matches_a_dense_solve():
    """The Woodbury n × n solve equals solving the H × H Hessian l2·I + VᵀV directly."""
    import torch
    from rewardprism.adapt import _solve_hessian
    rng = np.random.RandomState(3)
    v, g = torch.from_numpy(rng.randn(4, 3, 9)), torch.from_numpy(rng.randn(4, 9))
    l2 = torch.from_numpy(rng.uniform(0.1, 5.0, (4, 1)))
    hessian = l2[..., None] * torch.eye(9, dtype=torch.float64) + v.transpose(1, 2) @ v  # (U, H, H)
    expected = torch.linalg.solve(hessian, g[..., None])[..., 0]
    np.testing.assert_allclose(_solve_hessian(v, l2, g).numpy(), expected.numpy(), rtol=1e-9, atol=1e-12)


def test_evidence_ladder_matches_a_dense_laplace_evidence():
    """Each rung's evidence is −objective(ŵ) − ½ log det(Hessian / l2), the H × H determinant taken directly with
    slogdet (the code takes the n × n one); ŵ zeroes the gradient. Padded pairs (mask 0) count for nothing."""
    import torch
    from rewardprism.adapt import _evidence_ladder
    rng = np.random.RandomState(4)
    users, n, heads = 3, 5, 8
    x = rng.randn(users, n, heads)
    m = np.ones((users, n))
    m[1, 3:] = 0
    x[1, 3:] = 0  # padding is zero, as _as_batch writes it
    w0 = rng.randn(users, heads) * 0.3
    strengths = np.array([0.2, 5.0, 1.0])
    weights, evidence = _evidence_ladder(torch.from_numpy(x), torch.from_numpy(m), torch.from_numpy(w0), strengths)
    for rung, strength in enumerate(np.sort(strengths)[::-1]):
        for u in range(users):
            xu, w = x[u][m[u] > 0], weights[u, rung].numpy()
            l2 = strength * (xu ** 2).sum() / (len(xu) * heads)
            margin = xu @ w
            objective = np.logaddexp(0, -margin).sum() + 0.5 * l2 * ((w - w0[u]) ** 2).sum()
            p = 1 / (1 + np.exp(margin))  # probability of the wrong order
            np.testing.assert_allclose(-(xu * p[:, None]).sum(0) + l2 * (w - w0[u]), 0, atol=1e-6)
            hessian = l2 * np.eye(heads) + (xu * (p * (1 - p))[:, None]).T @ xu
            logdet = torch.linalg.slogdet(torch.from_numpy(hessian / l2))[1].item()
            np.testing.assert_allclose(evidence[u, rung].item(), -objective - 0.5 * logdet, rtol=1e-9)
