"""Active pair selection (`rewardprism.select`) against direct computations and simulated users."""
from __future__ import annotations

import json

import numpy as np
import pytest
from rewardprism.adapt import adapt_users
from rewardprism.protocol import ScoredPairs
from rewardprism.select import (
    Posterior,
    _label_information,
    evaluate_selection,
    posteriors,
    response_pairs,
    select_pairs,
)

HEADS = 6


def belief(heads: int = HEADS, seed: int = 0) -> Posterior:
    rng = np.random.default_rng(seed)
    labelled = rng.standard_normal((8, heads))
    return Posterior(np.array([0.3, 0.7]), rng.standard_normal((2, heads)) * 0.5, np.array([4.0, 0.5]),
                     labelled.T @ labelled * 0.2)


def monte_carlo_information(x: np.ndarray, posterior: Posterior, samples: int = 200_000) -> float:
    """I(label; strength, weights) by sampling the mixture of Gaussians directly (no closed forms)."""
    rng = np.random.default_rng(1)
    component = rng.choice(len(posterior.probabilities), samples, p=posterior.probabilities)
    logits = np.empty(samples)
    for g in range(len(posterior.probabilities)):
        covariance = np.linalg.inv(posterior.precisions[g] * np.eye(len(x)) + posterior.fisher)
        draws = rng.multivariate_normal(posterior.means[g], covariance, (component == g).sum())
        logits[component == g] = draws @ x
    p = 1 / (1 + np.exp(-logits))

    def entropy(q):
        return -(q * np.log(q) + (1 - q) * np.log1p(-q))
    return float(entropy(p.mean()) - entropy(np.clip(p, 1e-12, 1 - 1e-12)).mean())


def test_information_matches_sampling_the_posterior():
    posterior = belief()
    rng = np.random.default_rng(3)
    pool = rng.standard_normal((12, HEADS)) * rng.uniform(0.2, 3, (12, 1))
    covariances = [np.linalg.inv(l2 * np.eye(HEADS) + posterior.fisher) for l2 in posterior.precisions]
    variance = np.stack([np.einsum("nh,hk,nk->n", pool, c, pool) for c in covariances], 1)
    closed, _ = _label_information(pool @ posterior.means.T, variance, posterior.probabilities)
    sampled = np.array([monte_carlo_information(x, posterior) for x in pool])
    np.testing.assert_allclose(closed, sampled, rtol=0.1, atol=0.005)  # the closed forms overstate by ~5%
    assert np.corrcoef(closed, sampled)[0, 1] > 0.98


def test_a_batch_equals_asking_one_pair_at_a_time_with_the_believed_answer():
    """The greedy batch's in-place updates are exactly a posterior re-derived after each pick, as if the pair had
    been answered the way the posterior expected: its Fisher term added, each strength's mean moved one Newton step
    towards that answer, each strength weighed by how well it predicted it."""
    posterior = belief()
    pool = np.random.default_rng(4).standard_normal((300, HEADS))
    batch = select_pairs(pool, posterior, 4)
    current, taken = posterior, np.zeros(len(pool), bool)
    for expected in batch:
        pick = select_pairs(pool, current, 1, exclude=taken)[0]
        assert pick == expected
        taken[pick] = True
        x = pool[pick]
        covariances = [np.linalg.inv(l2 * np.eye(HEADS) + current.fisher) for l2 in current.precisions]
        variance = np.array([x @ c @ x for c in covariances])
        margin = current.means @ x
        _, fisher = _label_information(margin[None], variance[None], current.probabilities)
        predicted = 1 / (1 + np.exp(-margin / np.sqrt(1 + np.pi / 8 * variance)))
        believed = float(current.probabilities @ predicted >= 0.5)
        probabilities = current.probabilities * (predicted if believed else 1 - predicted)
        fisher_after = current.fisher + fisher[0] * np.outer(x, x)
        means = np.array([w + np.linalg.inv(l2 * np.eye(HEADS) + fisher_after) @ x * (believed - 1 / (1 + np.exp(-m)))
                          for w, l2, m in zip(current.means, current.precisions, margin)])
        current = Posterior(probabilities / probabilities.sum(), means, current.precisions, fisher_after)


def test_information_never_asks_a_copy_of_a_pair_it_already_chose():
    posterior = belief()
    pool = np.random.default_rng(5).standard_normal((50, HEADS))
    best = select_pairs(pool, posterior, 1)[0]
    with_copies = np.vstack([pool, np.repeat(pool[best][None], 5, 0)])  # five copies of the best pair
    picks = select_pairs(with_copies, posterior, 3)
    assert len({tuple(with_copies[i]) for i in picks}) == 3


def test_a_batch_asks_no_near_copies_under_a_real_posterior():
    """With the default method's own posterior (a strong prior, where one label barely moves it), the model would
    ask a pair that separates the strengths again and again; a batch asks one of its near-copies, unless only
    copies are left."""
    for seed in range(6):
        rng = np.random.default_rng(seed)
        chosen, rejected = rng.standard_normal((1, 8, HEADS)), rng.standard_normal((1, 8, HEADS))
        pool = rng.standard_normal((50, HEADS))
        (posterior,) = posteriors(chosen, rejected, np.eye(HEADS)[0], pool_gaps=[pool])
        best = pool[select_pairs(pool, posterior, 1)[0]]
        with_copies = np.vstack([pool, best, -best, best * 1.001])  # the same comparison, either way round
        picks = select_pairs(with_copies, posterior, 5)
        directions = with_copies[picks] / np.linalg.norm(with_copies[picks], axis=1, keepdims=True)
        assert (np.abs(directions @ directions.T) - np.eye(5) < 0.99).all(), seed
    only_copies = np.repeat(best[None], 3, 0)
    assert sorted(select_pairs(only_copies, posterior, 3)) == [0, 1, 2]


def test_posterior_mean_is_the_profile_the_default_method_serves():
    rng = np.random.default_rng(6)
    chosen, rejected = rng.standard_normal((3, 7, HEADS)), rng.standard_normal((3, 7, HEADS))
    prior = rng.standard_normal(HEADS)
    beliefs = posteriors(chosen, rejected, prior, center=300.0)
    served, _ = adapt_users(chosen, rejected, prior, method="default", center=300.0)
    for b, w in zip(beliefs, served):
        np.testing.assert_allclose(b.mean, w, atol=1e-10)
        assert np.isclose(b.probabilities.sum(), 1.0)


def test_a_user_without_labels_starts_from_the_population_prior():
    prior = np.arange(HEADS, dtype=float)
    pool = np.random.default_rng(7).standard_normal((40, HEADS))
    (b,) = posteriors(np.zeros((1, 0, HEADS)), np.zeros((1, 0, HEADS)), prior, pool_gaps=[pool])
    np.testing.assert_allclose(b.mean, prior)
    assert not b.fisher.any()
    with pytest.raises(ValueError, match="candidate pool"):
        posteriors(np.zeros((1, 0, HEADS)), np.zeros((1, 0, HEADS)), prior)


def test_bad_requests_are_refused():
    posterior = belief()
    pool = np.zeros((3, HEADS))
    with pytest.raises(ValueError, match="k must be between 1 and the 3"):
        select_pairs(pool, posterior, 4)
    with pytest.raises(ValueError, match="gaps must be"):
        select_pairs(np.zeros((3, HEADS + 1)), posterior, 1)
    pool[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        select_pairs(pool, posterior, 1)
    with pytest.raises(ValueError, match="unknown selection method"):
        select_pairs(np.zeros((3, HEADS)), posterior, 1, "greedy")


def test_response_pairs_are_every_unordered_pair():
    scores = np.arange(12.0).reshape(4, 3)
    index, gaps = response_pairs(scores)
    assert sorted(map(tuple, index)) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    np.testing.assert_allclose(gaps, scores[index[:, 0]] - scores[index[:, 1]])


def simulated_users(pairs: int = 400, heads: int = 12, seed: int = 0) -> tuple[ScoredPairs, np.ndarray]:
    """Two users over random head scores: one near the population profile (head 0), one who mostly disagrees."""
    rng = np.random.default_rng(seed)
    population = np.eye(heads)[0]
    users = {"agrees": population + 0.1 * rng.standard_normal(heads),
             "differs": np.r_[0.2, 1.0, -1.0, 0.3 * rng.standard_normal(heads - 3)]}
    chosen, rejected, groups = [], [], []
    for name, weights in users.items():
        a, b = rng.standard_normal((pairs, heads)), rng.standard_normal((pairs, heads))
        prefers_a = (a - b) @ weights + 0.5 * rng.logistic(size=pairs) > 0
        chosen.append(np.where(prefers_a[:, None], a, b))
        rejected.append(np.where(prefers_a[:, None], b, a))
        groups += [name] * pairs
    return ScoredPairs(np.vstack(chosen), np.vstack(rejected), np.array(groups)), population


def test_chosen_pairs_teach_a_differing_user_more_than_random_ones():
    test, population = simulated_users()
    results = {method: evaluate_selection(test, 15, method=method, prior=population, center=100.0, seeds=range(8))
               for method in ("information", "random")}
    held_out = {m: r.total for m, r in results.items()}
    np.testing.assert_array_equal(held_out["information"], held_out["random"])  # the same held-out pairs
    chosen, random = (results[m].summary() for m in ("information", "random"))
    assert chosen["differs"][0] > random["differs"][0]
    assert chosen["agrees"][0] >= random["agrees"][0] - 0.01  # nothing lost by asking a user who agrees
    population = evaluate_selection(test, 0, method="random", prior=population, seeds=range(8))
    np.testing.assert_array_equal(population.total, results["random"].total)
    assert population.summary()["differs"][0] < chosen["differs"][0]


def test_evaluation_never_scores_an_asked_pair():
    test, population = simulated_users(pairs=60)
    result = evaluate_selection(test, 5, method="information", prior=population, seeds=range(3), batch=2)
    for group in result.groups:
        members = test.indices(group)
        assert result.picks[group].shape == (3, 5)
        assert np.isin(result.picks[group], members).all()
        assert (result.total[result.groups.index(group)] == len(members) - 30).all()  # pool of 30 held back
    with pytest.raises(ValueError, match="too few"):
        evaluate_selection(test, 40, method="random", prior=population, seeds=range(2))


def test_cli_selects_pairs_to_ask_and_evaluates_selection(tmp_path):
    from rewardprism.cli import app
    from test_evaluate import linear_synthetic, write_embedding_folder
    from typer.testing import CliRunner

    data = linear_synthetic(per_user=60)
    write_embedding_folder(tmp_path / "emb", data)
    runner = CliRunner()
    heads = str(tmp_path / "heads")
    assert runner.invoke(app, ["decompose", "--embeddings", str(tmp_path / "emb"), "--out", heads,
                               "--components", "4"]).exit_code == 0
    out = runner.invoke(app, ["adapt", "--heads", heads, "--select", "3", "--pool", str(tmp_path / "emb"),
                              "--out", str(tmp_path / "ask.json")])
    assert out.exit_code == 0, out.output
    asked = json.loads((tmp_path / "ask.json").read_text())
    assert len(asked) == 3 and len({a["pool_index"] for a in asked}) == 3
    pair = data.pairs[asked[0]["pool_index"]]
    assert {asked[0]["a"], asked[0]["b"]} == {pair.chosen, pair.rejected}
    # a user with labels: their posterior moves, so do the questions
    out = runner.invoke(app, ["adapt", "--heads", heads, "--embeddings", str(tmp_path / "emb"), "--group", "concise",
                              "--limit", "10", "--select", "3", "--pool", str(tmp_path / "emb"),
                              "--out", str(tmp_path / "ask2.json")])
    assert out.exit_code == 0 and json.loads(out.output)["labelled"] == 10
    out = runner.invoke(app, ["adapt", "--heads", heads, "--select", "3", "--out", str(tmp_path / "x.json")])
    assert out.exit_code == 2 and "--select and --pool go together" in out.output
    out = runner.invoke(app, ["adapt", "--heads", heads, "--pool", str(tmp_path / "emb"), "--select", "3",
                              "--select-method", "best", "--out", str(tmp_path / "x.json")])
    assert out.exit_code == 2 and "--select-method: unknown method 'best'" in out.output
    data.chosen[3, 2] = np.nan  # a pool whose features hold a NaN: one line naming --pool, nothing written
    write_embedding_folder(tmp_path / "nan", data)
    out = runner.invoke(app, ["adapt", "--heads", heads, "--pool", str(tmp_path / "nan"), "--select", "3",
                              "--out", str(tmp_path / "nan.json")])
    assert out.exit_code == 2 and "--pool: candidate head scores hold NaN" in out.output
    assert not (tmp_path / "nan.json").exists()
    out = runner.invoke(app, ["evaluate", "--embeddings", str(tmp_path / "emb"), "--heads", heads, "--n", "5",
                              "--seeds", "2", "--select", "information", "--no-baselines",
                              "--out", str(tmp_path / "report.md")])
    assert out.exit_code == 0, out.output
    rows = json.loads((tmp_path / "report.json").read_text())["selection"]["rows"]
    assert [r["label"] for r in rows] == ["population profile (no feedback)", "chosen n=5 (information, one at a time)",
                                          "random n=5"]
    assert "Active selection (information)" in out.output
    out = runner.invoke(app, ["evaluate", "--embeddings", str(tmp_path / "emb"), "--heads", heads,
                              "--select", "random"])
    assert out.exit_code == 2 and "--select: unknown method 'random'" in out.output
