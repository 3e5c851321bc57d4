"""The evaluation protocol and report, the hyperprior calibration, the synthetic known-truth checks, the CLI commands
and the train_drm recipe."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from head_sets_for_tests import made_up_features
from rewardprism.calibrate import calibrate_hyperprior, fit_head_set
from rewardprism.cli import app
from rewardprism.data import save_pairs
from rewardprism.drm import PreferenceDecomposition, build_head_set, fit_population_head
from rewardprism.embed import PAIRS, ShardWriter
from rewardprism.evaluate import (
    REWARDBENCH_COUNTS,
    Split,
    drm_report,
    random_heads,
    rewardbench_scores,
    synthetic_report,
)
from rewardprism.heads import HeadSet
from rewardprism.protocol import ScoredPairs, evaluate_adaptation, sample_adaptation
from rewardprism.synthetic import SyntheticGenerator, rating_matrix
from typer.testing import CliRunner

LINEAR = made_up_features("linear")  # the spec of the features these tests make up


def scored(groups: list[str], heads: int = 4, seed: int = 0) -> ScoredPairs:
    rng = np.random.RandomState(seed)
    return ScoredPairs(rng.randn(len(groups), heads), rng.randn(len(groups), heads), np.array(groups))


def test_sampling_is_deterministic_distinct_and_within_the_group():
    pairs = scored(["a"] * 10 + ["b"] * 6)
    picks = sample_adaptation(pairs, 5, seeds=range(4))
    again = sample_adaptation(pairs, 5, seeds=range(4))
    assert list(picks) == ["a", "b"]
    for group, idx in picks.items():
        assert idx.shape == (4, 5) and np.array_equal(idx, again[group])
        assert all(len(set(row)) == 5 and (pairs.groups[row] == group).all() for row in idx)


def test_sampling_errors_name_the_group():
    pairs = scored(["a"] * 10 + ["b"] * 3)
    with pytest.raises(ValueError, match="n=4 adaptation pairs but group 'b' has only 3"):
        sample_adaptation(pairs, 4)
    with pytest.raises(ValueError, match="at least 1"):
        sample_adaptation(pairs, 0)
    with pytest.raises(ValueError, match="group 'c' has no pairs"):
        sample_adaptation(pairs, 2, groups=["c"])
    with pytest.raises(ValueError, match="n=3 adaptation pairs would leave none of group 'b'"):  # not nan
        evaluate_adaptation(pairs, 3, method="hyre", seeds=range(2))


def test_reference_and_honest_accuracy_against_a_direct_loop():
    pairs = scored(["a"] * 12 + ["b"] * 9, heads=5, seed=1)
    result = evaluate_adaptation(pairs, 4, method="hyre", seeds=range(3))
    picks = sample_adaptation(pairs, 4, seeds=range(3))
    from rewardprism.adapt import adapt_profile

    for g, group in enumerate(["a", "b"]):
        members = np.flatnonzero(pairs.groups == group)
        for s in range(3):
            w, _ = adapt_profile(pairs.chosen[picks[group][s]], pairs.rejected[picks[group][s]], None, "hyre")
            np.testing.assert_allclose(result.profiles[group][s], w, rtol=1e-6)  # the profiles it scored
            np.testing.assert_array_equal(result.picks[group][s], picks[group][s])
            correct = pairs.chosen[members] @ w > pairs.rejected[members] @ w
            kept = ~np.isin(members, picks[group][s])
            assert result.correct[g, s] / result.total[g, s] == pytest.approx(correct.mean())
            assert result.honest_correct[g, s] / result.honest_total[g, s] == pytest.approx(correct[kept].mean())
            assert result.honest_total[g, s] == len(members) - 4
    summary = result.summary()
    per_seed = (result.correct / result.total).mean(0)
    assert summary["overall"] == pytest.approx((per_seed.mean(), per_seed.std()))


def test_cross_source_adaptation_needs_the_same_heads_and_groups():
    test, source = scored(["a"] * 8), scored(["a"] * 8, heads=3)
    with pytest.raises(ValueError, match="source has 3 heads, test 4"):
        evaluate_adaptation(test, 2, method="hyre", source=source)
    with pytest.raises(ValueError, match="group 'a' has no pairs"):
        evaluate_adaptation(test, 2, method="hyre", source=scored(["z"] * 8))
    result = evaluate_adaptation(test, 2, method="hyre", source=scored(["a"] * 8, seed=2), seeds=range(2))
    assert result.honest_correct is None and result.summary(honest=True) == {}


def test_rewardbench_sections_weigh_subsets_by_count():
    subsets = np.array(["math-prm"] * 4 + ["hep-go"] * 2 + ["refusals-dangerous"] * 5)
    correct = np.array([1, 1, 1, 0] + [0, 1] + [1, 1, 1, 1, 0], dtype=bool)
    scores = rewardbench_scores(correct, subsets)
    math, code = REWARDBENCH_COUNTS["math-prm"], REWARDBENCH_COUNTS["hep-go"]
    assert scores["Reasoning"] == pytest.approx((0.75 * math + 0.5 * code) / (math + code))
    assert scores["Safety"] == pytest.approx(0.8)
    assert scores["score"] == pytest.approx((scores["Reasoning"] + 0.8) / 2)
    assert "Chat" not in scores


def test_random_heads():
    for distribution in ("uniform", "gaussian"):
        heads = random_heads(16, 10, distribution, seed=3)
        np.testing.assert_allclose(np.linalg.norm(heads, axis=1), 1.0)
        assert np.array_equal(heads, random_heads(16, 10, distribution, seed=3))
    with pytest.raises(ValueError, match="'uniform' or 'gaussian'"):
        random_heads(4, 2, "cauchy")


def linear_synthetic(per_user: int = 150, dim: int = 24, noise: float = 0.05, seed: int = 0):
    """Synthetic pairs with features φ = A · ratings + noise, A (d, 6) orthonormal: the planted directions are
    known exactly in feature space."""
    pairs = SyntheticGenerator(seed).dataset(per_user)
    rng = np.random.RandomState(seed)
    basis, _ = np.linalg.qr(rng.randn(dim, 6))
    chosen = rating_matrix(pairs, "chosen") @ basis.T + noise * rng.randn(len(pairs), dim)
    rejected = rating_matrix(pairs, "rejected") @ basis.T + noise * rng.randn(len(pairs), dim)
    return Split.of(chosen, rejected, pairs)


def test_synthetic_heads_span_the_planted_directions_and_adaptation_nears_the_ceiling():
    data = linear_synthetic(per_user=120)
    dec = PreferenceDecomposition(6).fit(data.chosen[data.train], data.rejected[data.train])
    population = fit_population_head(data.chosen[data.train], data.rejected[data.train])
    heads = build_head_set(dec, population, features=LINEAR)
    report = synthetic_report(data, heads, n=15, seeds=range(10), methods=("hyre", "default"))
    assert min(report["principal_angle_cosines"]) > 0.999
    share = {user: p["default (hierarchical BT) n=15"]["truth"] / p["ceiling (all labels)"]["truth"]
             for user, p in report["users"].items()}
    assert min(share.values()) > 0.75 and np.mean(list(share.values())) > 0.85
    # the check can fail: random directions of the same size do not span the planted ones
    noise = random_heads(24, 6, "gaussian")
    lost = synthetic_report(data, build_head_set(_as_decomposition(noise, dec), population, features=LINEAR), n=15,
                            seeds=range(2), methods=("hyre",))
    assert min(lost["principal_angle_cosines"]) < 0.9


def test_real_data_with_attribute_ratings_is_evaluated_without_the_synthetic_checks():
    data = linear_synthetic(per_user=40)
    dec = PreferenceDecomposition(4).fit(data.chosen[data.train], data.rejected[data.train])
    heads = build_head_set(dec, None, features=LINEAR)
    report = drm_report(data, heads, n_values=[5], methods=["hyre"], seeds=range(2), baselines=False)
    assert "synthetic" in report
    rated = [dataclasses.replace(p, group=f"team-{p.group}") for p in data.pairs]  # groups of its own
    report = drm_report(Split.of(data.chosen, data.rejected, rated), heads, n_values=[5], methods=["hyre"],
                        seeds=range(2), baselines=False)
    assert "synthetic" not in report and {"team-cautious", "team-playful"} <= set(report["groups"])


def test_report_gives_the_pooled_profile_over_the_heads_and_its_share_of_the_gap():
    """The best profile over the heads, fitted on every training pair (as scikit-learn's C=1 logistic regression
    on the head scores), and how much of the population → supervised gap it could recover at all."""
    from sklearn.linear_model import LogisticRegression

    data = linear_synthetic(per_user=80)
    train_c, train_r = data.chosen[data.train], data.rejected[data.train]
    dec = PreferenceDecomposition(1).fit(train_c, train_r)  # ±pc0 only: a narrow span
    one_user = np.array([data.pairs[i].group == "concise" for i in data.train])  # a population that differs
    heads = build_head_set(dec, fit_population_head(train_c[one_user], train_r[one_user]), features=LINEAR)
    report = drm_report(data, heads, n_values=[5], methods=["hyre"], seeds=range(2))
    rows = {row["label"]: row["reference"]["overall"][0] for row in report["rows"]}
    label = f"best profile over these heads, all {len(data.train)} training pairs"

    x = heads.scores(train_c) - heads.scores(train_r)
    fit = LogisticRegression(C=1.0, fit_intercept=False, tol=1e-10, max_iter=10_000).fit(
        np.concatenate([x, -x]), np.r_[np.ones(len(x)), np.zeros(len(x))])
    test = data.scored(heads)
    right = (test.chosen - test.rejected) @ fit.coef_[0] > 0
    assert rows[label] == pytest.approx(np.mean([right[test.groups == g].mean() for g in test.group_names]))
    population, supervised = rows["population profile (no feedback)"], rows[next(k for k in rows if "supervised" in k)]
    assert supervised > population  # the gap exists here, so its share is reported
    assert report["gap_recovered"][label] == pytest.approx((rows[label] - population) / (supervised - population))


def test_calibrated_hyperprior_is_weak_when_users_differ_and_strong_when_they_agree():
    """Synthetic users weigh the attributes differently: the population head fits none of them well, and held-out
    users are scored best by moving far from it. Relabelled by one shared direction, everyone agrees with it."""
    differ = linear_synthetic(per_user=120)
    rng = np.random.RandomState(1)
    margin = (differ.chosen - differ.rejected) @ rng.randn(differ.chosen.shape[1])
    flip = (rng.rand(len(margin)) > 1 / (1 + np.exp(-margin)))[:, None]  # Bradley-Terry labels, one for all
    agree = Split(np.where(flip, differ.rejected, differ.chosen), np.where(flip, differ.chosen, differ.rejected),
                  differ.pairs, differ.train, differ.test)
    centers = {}
    for name, data in (("differ", differ), ("agree", agree)):
        chosen, rejected = data.chosen[data.train], data.rejected[data.train]
        heads = build_head_set(PreferenceDecomposition(6).fit(chosen, rejected), fit_population_head(chosen, rejected),
                               features=LINEAR)
        assert heads.hyperprior_center is None
        heads = calibrate_hyperprior(heads, chosen, rejected, [data.pairs[i] for i in data.train], seeds=range(10))
        calibration = heads.info["hyperprior_calibration"]
        assert calibration["n_values"] == [5, 15] and len(calibration["accuracy"]) == 11
        assert calibration["accuracy"][f"{heads.hyperprior_center:g}"] == max(calibration["accuracy"].values())
        centers[name] = heads.hyperprior_center
    assert centers["differ"] <= 10 and centers["agree"] >= 1000
    tiny = linear_synthetic(per_user=8)  # no group has 2n pairs to draw pseudo-users from: left uncalibrated
    heads = build_head_set(PreferenceDecomposition(3).fit(tiny.chosen, tiny.rejected), None, features=LINEAR)
    assert calibrate_hyperprior(heads, tiny.chosen, tiny.rejected, tiny.pairs).hyperprior_center is None
    handmade = HeadSet(heads.weight, heads.bias, heads.head_names, "drm", "linear", heads.default_weights)
    with pytest.raises(ValueError, match="made by `build_head_set`"):
        calibrate_hyperprior(handmade, tiny.chosen, tiny.rejected, tiny.pairs)


def test_calibration_returns_a_new_head_set_and_leaves_its_input_alone():
    """A head set calibrated twice (a sweep calibrating shared heads, a caller keeping the uncalibrated one) must
    not see the first calibration in the second's input."""
    data = linear_synthetic(per_user=40)
    chosen, rejected, pairs = data.training()
    heads = build_head_set(PreferenceDecomposition(3).fit(chosen, rejected), None, features=LINEAR)
    before = dict(heads.info)
    calibrated = calibrate_hyperprior(heads, chosen, rejected, pairs, seeds=range(2))
    assert heads.info == before and "hyperprior_calibration" not in heads.info
    assert calibrated is not heads and calibrated.info == {**before, "hyperprior_center": calibrated.hyperprior_center,
                                                           "hyperprior_calibration": calibrated.info[
                                                               "hyperprior_calibration"]}
    assert calibrated.content_hash == heads.content_hash  # the same heads, only the adaptation's hyperprior


def test_one_builder_fits_the_population_head_and_calibrates_as_its_parts_do():
    """`fit_head_set` is decomposition → population head → head set → calibration, and each part can be left
    out; the population head may come fitted already (shared across k by the sweep)."""
    data = linear_synthetic(per_user=40)
    chosen, rejected, pairs = data.training()
    decomposition = PreferenceDecomposition(3).fit(chosen, rejected)
    population = fit_population_head(chosen, rejected)
    by_parts = calibrate_hyperprior(build_head_set(decomposition, population, features=LINEAR), chosen, rejected,
                                    pairs)
    built = fit_head_set(decomposition, chosen, rejected, pairs, features=LINEAR)
    shared = fit_head_set(decomposition, chosen, rejected, pairs, population_head=population, features=LINEAR)
    for heads in (built, shared):
        np.testing.assert_array_equal(heads.weight, by_parts.weight)
        assert heads.head_names[0] == "population" and heads.info == by_parts.info
    bare = fit_head_set(decomposition, population_head=False, calibrate=False, features=LINEAR)
    assert bare.head_names[0] == "+pc0" and bare.hyperprior_center is None
    with pytest.raises(ValueError, match="needs the pairs' features"):
        fit_head_set(decomposition, features=LINEAR)


def _as_decomposition(components: np.ndarray, like: PreferenceDecomposition) -> PreferenceDecomposition:
    """A decomposition whose components are replaced (random baseline heads in the DRM layout)."""
    other = PreferenceDecomposition(len(components)).fit_moments(like.moments_)
    other.components_ = components
    return other


def write_embedding_folder(path, data: Split) -> None:
    writer = ShardWriter(path, LINEAR, data.chosen.shape[1], dataset="linear synthetic")
    for number, start in enumerate(range(0, len(data.chosen), 256)):
        writer.write(number, f"fp{number}", data.chosen[start:start + 256].astype(np.float32),
                     data.rejected[start:start + 256].astype(np.float32), 0)
    save_pairs(data.pairs, path / PAIRS)


def test_cli_decompose_adapt_evaluate(tmp_path):
    data = linear_synthetic(per_user=60)
    write_embedding_folder(tmp_path / "emb", data)
    runner = CliRunner()
    out = runner.invoke(app, ["decompose", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "heads"),
                              "--components", "6"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["heads"] == 13 and json.loads(out.output)["hyperprior_center"] > 0
    # with the pairs in memory anyway it decomposes them there; streaming the shards gives the same heads
    out = runner.invoke(app, ["decompose", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "pcs"),
                              "--components", "6", "--no-population-head", "--no-calibrate"])
    assert out.exit_code == 0, out.output
    in_memory, streamed = HeadSet.load(tmp_path / "heads"), HeadSet.load(tmp_path / "pcs")
    np.testing.assert_allclose(in_memory.weight[1:], streamed.weight, atol=1e-6)
    out = runner.invoke(app, ["adapt", "--heads", str(tmp_path / "heads"), "--embeddings", str(tmp_path / "emb"),
                              "--group", "concise", "--limit", "10", "--out", str(tmp_path / "profile.json")])
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "profile.json").read_text())["pairs"] == 10
    out = runner.invoke(app, ["evaluate", "--embeddings", str(tmp_path / "emb"), "--heads", str(tmp_path / "heads"),
                              "--n", "5", "--seeds", "3", "--out", str(tmp_path / "report.md")])
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert {row["label"] for row in report["rows"]} >= {"HyRe n=5", "default (hierarchical BT) n=5"}
    assert "Synthetic users" in (tmp_path / "report.md").read_text()
    assert report["hyperprior"]["calibrated"] and "calibrated on the training pairs" in out.output
    # clear one-line errors that name the option
    out = runner.invoke(app, ["evaluate", "--embeddings", str(tmp_path / "emb"), "--heads", str(tmp_path / "heads"),
                              "--n", "500"])
    assert out.exit_code == 2 and "n=500 adaptation pairs but group" in out.output
    out = runner.invoke(app, ["evaluate", "--embeddings", str(tmp_path / "nope"), "--heads", str(tmp_path / "heads")])
    assert out.exit_code == 2 and "--embeddings:" in out.output
    out = runner.invoke(app, ["evaluate", "--embeddings", str(tmp_path / "emb"), "--heads", str(tmp_path / "heads"),
                              "--methods", "hyre,magic"])
    assert out.exit_code == 2 and "--methods: unknown ['magic']" in out.output


def test_train_drm_recipe_runs_end_to_end_on_a_tiny_backbone(tmp_path):
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "train_drm.py"] + [arg for item in (
        "dataset=synthetic", "synthetic_per_user=24", "backbone=tiny-bert", "max_length=64", "n_components=4",
        "n_values=[3]", "seeds=2", "use_ray=false", f"output_dir={tmp_path / 'run'}") for arg in ("--override", item)]
    done = subprocess.run(command, check=False, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["config"]["backbone"] == "tiny-bert" and report["head_set"]["num_heads"] == 9
    assert (tmp_path / "run" / "heads" / "headset.json").exists()
    for extra, message in ((["--override", "n_components=0"], "n_components: must be at least 1"),
                           (["--override", "n_components=abc"], "n_components: must be int, got 'abc'"),
                           (["--override", "n_component=4"], "n_component: unknown field; DrmConfig has"),
                           (["--override", "n_components"], "--override: expected key.sub=value"),
                           (["--config", str(tmp_path / "missing.yaml")], "--config: cannot read"),
                           (["--override", "n_values=[40]"], "n=40 adaptation pairs but group")):  # after embedding
        bad = subprocess.run(command + extra, check=False, cwd=root, capture_output=True, text=True)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    usage = subprocess.run([sys.executable, "train_drm.py", "--help"], check=False, cwd=root, capture_output=True,
                           text=True)
    assert usage.returncode == 0 and "Embed a dataset, decompose" in usage.stdout and "--override" in usage.stdout
