"""The decomposition against a direct NumPy statement: the SVD of the centred difference matrix."""
from __future__ import annotations

import json

import numpy as np
import pytest
from head_sets_for_tests import made_up_features
from rewardprism.drm import (
    DifferenceMoments,
    PreferenceDecomposition,
    build_head_set,
    fit_population_head,
    mean_profile,
)
from rewardprism.drm_ray import decompose_folder
from rewardprism.embed import ShardWriter
from rewardprism.heads import HeadSet

TEST_FEATURES = made_up_features("test")  # the spec of the features these tests make up


def random_pairs(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    return rng.randn(n, d).astype(np.float32), rng.randn(n, d).astype(np.float32)


def structured_pairs(n: int = 400, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Differences along 3 planted orthonormal directions with well separated variances, plus a mean."""
    rng = np.random.RandomState(seed)
    basis, _ = np.linalg.qr(rng.randn(d, 3))  # (d, 3)
    coords = rng.randn(n, 3) * np.array([5.0, 3.0, 1.5])
    rejected = rng.randn(n, d)
    chosen = rejected + coords @ basis.T + 0.05 * rng.randn(n, d) + 0.3
    return chosen, rejected, basis


def svd_reference(chosen: np.ndarray, rejected: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k right singular vectors of the centred differences (svd_flip: largest |entry| positive), variances."""
    diff = chosen.astype(np.float64) - rejected
    centred = diff - diff.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    vt = vt[:k] * np.sign(vt[np.arange(k), np.abs(vt[:k]).argmax(1)])[:, None]
    return vt, s[:k] ** 2 / (len(diff) - 1)


@pytest.mark.parametrize("make", [lambda: random_pairs(300, 16), lambda: structured_pairs()[:2]])
def test_components_match_the_svd_of_centred_differences(make):
    chosen, rejected = make()
    k = 5
    dec = PreferenceDecomposition(k).fit(chosen, rejected)
    vt, variance = svd_reference(chosen, rejected, k)
    np.testing.assert_allclose(dec.components_, vt, atol=1e-8)
    np.testing.assert_allclose(dec.explained_variance_, variance, rtol=1e-10)
    diff = chosen.astype(np.float64) - rejected
    np.testing.assert_allclose(dec.explained_variance_ratio_, variance / diff.var(0, ddof=1).sum(), rtol=1e-10)
    np.testing.assert_allclose(dec.mean_, diff.mean(0), atol=1e-12)
    assert dec.n_samples_seen_ == len(chosen) and dec.n_features_in_ == chosen.shape[1]
    np.testing.assert_allclose(dec.transform(chosen, rejected), (diff - diff.mean(0)) @ vt.T, atol=1e-8)


def test_structured_input_recovers_the_planted_directions():
    chosen, rejected, basis = structured_pairs()
    dec = PreferenceDecomposition(3).fit(chosen, rejected)
    cosines = np.linalg.svd(dec.components_ @ basis, compute_uv=False)
    assert cosines.min() > 0.999


def test_fit_partial_fit_and_shards_agree(monkeypatch):
    chosen, rejected = random_pairs(500, 10, seed=1)
    whole = PreferenceDecomposition(4).fit(chosen, rejected)
    monkeypatch.setattr("rewardprism.drm.BLOCK_ROWS", 33)
    blocked = PreferenceDecomposition(4).fit(chosen, rejected)
    np.testing.assert_allclose(blocked.components_, whole.components_, atol=1e-10)
    partial = PreferenceDecomposition(4)
    for lo, hi in [(0, 7), (7, 200), (200, 201), (201, 500)]:
        partial.partial_fit(chosen[lo:hi], rejected[lo:hi])
    shards = PreferenceDecomposition(4).fit_shards((chosen[i:i + 64], rejected[i:i + 64]) for i in range(0, 500, 64))
    for other in (partial, shards):
        np.testing.assert_allclose(other.components_, whole.components_, atol=1e-10)
        np.testing.assert_allclose(other.explained_variance_, whole.explained_variance_, rtol=1e-10)
        np.testing.assert_allclose(other.mean_, whole.mean_, atol=1e-12)
        assert other.n_samples_seen_ == 500


def test_moments_merge_like_the_union():
    chosen, rejected = random_pairs(90, 6, seed=2)
    parts = [DifferenceMoments.of(chosen[a:b], rejected[a:b]) for a, b in [(0, 10), (10, 11), (11, 90)]]
    merged = DifferenceMoments.zeros(6) + parts[2] + parts[0] + parts[1]
    direct = DifferenceMoments.of(chosen, rejected)
    assert merged.count == direct.count == 90
    np.testing.assert_allclose(merged.mean, direct.mean, atol=1e-12)
    np.testing.assert_allclose(merged.scatter, direct.scatter, atol=1e-9)
    with pytest.raises(ValueError, match="dimension 6 and 5"):
        merged + DifferenceMoments.zeros(5)


def test_fit_is_deterministic():
    chosen, rejected = random_pairs(200, 8, seed=3)
    a, b = PreferenceDecomposition(3).fit(chosen, rejected), PreferenceDecomposition(3).fit(chosen, rejected)
    assert np.array_equal(a.components_, b.components_)


def test_clear_errors(monkeypatch):
    chosen, rejected = random_pairs(20, 4)
    with pytest.raises(ValueError, match="n_components=5 exceeds the embedding dimension 4"):
        PreferenceDecomposition(5).fit(chosen, rejected)
    with pytest.raises(ValueError, match="positive integer"):
        PreferenceDecomposition(0).fit(chosen, rejected)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        PreferenceDecomposition(2).fit(chosen[:1], rejected[:1])
    with pytest.raises(ValueError, match=r"both be \(n, d\)"):
        PreferenceDecomposition(2).fit(chosen, rejected[:, :3])
    bad = chosen.copy()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or inf in 1 pair.*row 7"):
        PreferenceDecomposition(2).fit(bad, rejected)
    monkeypatch.setattr("rewardprism.drm.BLOCK_ROWS", 5)  # the row is counted over the whole input
    with pytest.raises(ValueError, match="first at row 7"):
        PreferenceDecomposition(2).fit(bad, rejected)
    with pytest.raises(ValueError, match="no shards"):
        PreferenceDecomposition(2).fit_shards([])
    dec = PreferenceDecomposition(2).fit(chosen, rejected)
    with pytest.raises(ValueError, match="dimension 3, the decomposition 4"):
        dec.transform(chosen[:, :3], rejected[:, :3])


def test_population_head_matches_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    chosen, rejected, _ = structured_pairs(n=200, d=6, seed=4)
    diff = chosen - rejected
    flip = np.random.RandomState(0).rand(len(diff)) < 0.3  # label noise, so the optimum is finite
    chosen, rejected = np.where(flip[:, None], rejected, chosen), np.where(flip[:, None], chosen, rejected)
    diff = chosen - rejected
    reference = LogisticRegression(C=1.0, fit_intercept=False, tol=1e-9, max_iter=1000).fit(
        np.concatenate([diff, -diff]), np.r_[np.ones(len(diff)), np.zeros(len(diff))]).coef_[0]
    np.testing.assert_allclose(fit_population_head(chosen, rejected), reference, rtol=1e-4, atol=1e-6)
    # a zero weight is the same as leaving the pair out
    weight = np.ones(len(diff))
    weight[:50] = 0
    np.testing.assert_allclose(fit_population_head(chosen, rejected, sample_weight=weight),
                               fit_population_head(chosen[50:], rejected[50:]), atol=1e-6)
    with pytest.raises(ValueError, match="sample_weight"):
        fit_population_head(chosen, rejected, sample_weight=-weight)


def test_head_set_layout_defaults_and_round_trip(tmp_path):
    chosen, rejected, _ = structured_pairs()
    dec = PreferenceDecomposition(3).fit(chosen, rejected)
    population = fit_population_head(chosen, rejected)
    heads = build_head_set(dec, population, features=TEST_FEATURES, dataset="structured")
    assert heads.head_names == ["population", "+pc0", "+pc1", "+pc2", "-pc0", "-pc1", "-pc2"]
    np.testing.assert_allclose(np.linalg.norm(heads.weight, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(heads.weight[1:4], dec.components_, atol=1e-6)
    np.testing.assert_allclose(heads.weight[4:], -dec.components_, atol=1e-6)
    assert not heads.bias.any()
    # the default profile is exactly the fitted Bradley-Terry reward
    np.testing.assert_allclose(heads.scores(chosen) @ heads.default_weights, chosen @ population, rtol=1e-4, atol=1e-4)
    heads.save(tmp_path / "h")
    loaded = HeadSet.load(tmp_path / "h")
    assert loaded.content_hash == heads.content_hash and loaded.info["n_components"] == 3


def test_loading_a_head_set_without_its_content_hash_is_a_clear_error(tmp_path):
    """A headset.json missing `content_hash` is bad input (ValueError naming the folder), not a KeyError."""
    chosen, rejected, _ = structured_pairs()
    heads = build_head_set(PreferenceDecomposition(2).fit(chosen, rejected), None, features=TEST_FEATURES)
    folder = heads.save(tmp_path / "h")
    meta = json.loads((folder / "headset.json").read_text())
    del meta["content_hash"]
    (folder / "headset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not a valid head set.*content_hash"):
        HeadSet.load(folder)


def test_saving_over_a_head_set_switches_versions_in_one_step(tmp_path, monkeypatch):
    """New tensors are written beside the old ones; headset.json, replaced last, names which to read. A save
    that stops before that step leaves the old head set whole, one that finishes leaves only the new files."""
    chosen, rejected, _ = structured_pairs()
    old = build_head_set(PreferenceDecomposition(3).fit(chosen, rejected), None, features=TEST_FEATURES)
    new = build_head_set(PreferenceDecomposition(2).fit(chosen, rejected), None, features=TEST_FEATURES)
    old.save(tmp_path / "h")

    def interrupted(self):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(HeadSet, "metadata", interrupted)  # called after the new tensors are on disk
        with pytest.raises(KeyboardInterrupt):
            new.save(tmp_path / "h")
    assert HeadSet.load(tmp_path / "h").content_hash == old.content_hash
    new.save(tmp_path / "h")
    assert HeadSet.load(tmp_path / "h").content_hash == new.content_hash
    assert [p.name for p in (tmp_path / "h").glob("*.safetensors")] == [f"heads-{new.content_hash}.safetensors"]


def test_mean_profile_is_the_calibrated_mean_direction():
    chosen, rejected, _ = structured_pairs()
    dec = PreferenceDecomposition(3).fit(chosen, rejected)
    heads = build_head_set(dec, features=TEST_FEATURES)
    assert heads.head_names[0] == "+pc0" and (heads.default_weights >= 0).all()
    np.testing.assert_allclose(heads.default_weights, mean_profile(dec))
    # direct statement: u = projection of the mean on the components, scaled by 2 (u·μ) / (uᵀ Σ u)
    diff = chosen - rejected
    u = dec.components_.T @ (dec.components_ @ diff.mean(0))
    u /= np.linalg.norm(u)
    scale = 2 * (u @ diff.mean(0)) / (u @ np.cov(diff.T) @ u)
    np.testing.assert_allclose((heads.scores(chosen) - heads.scores(rejected)) @ heads.default_weights,
                               scale * diff @ u, rtol=1e-4, atol=1e-4)


def write_folder(path, chosen, rejected, shard_size: int) -> None:
    writer = ShardWriter(path, TEST_FEATURES, chosen.shape[1])
    for number, start in enumerate(range(0, len(chosen), shard_size)):
        stop = start + shard_size
        writer.write(number, f"fp{number}", chosen[start:stop], rejected[start:stop], 0)


def test_folder_decomposition_local_and_ray_agree_with_in_memory(tmp_path, ray_cluster):
    chosen, rejected = random_pairs(700, 12, seed=5)
    write_folder(tmp_path / "emb", chosen, rejected, shard_size=128)
    rows = np.random.RandomState(0).choice(700, 350, replace=False)
    direct = PreferenceDecomposition(4).fit(chosen[rows], rejected[rows])
    local = decompose_folder(tmp_path / "emb", 4, rows=rows)
    on_ray = decompose_folder(tmp_path / "emb", 4, rows=rows, use_ray=True)
    for other in (local, on_ray):
        np.testing.assert_allclose(other.components_, direct.components_, atol=1e-10)
        assert other.n_samples_seen_ == 350
    assert np.array_equal(local.components_, on_ray.components_)  # same merge order, same bits
