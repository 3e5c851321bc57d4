"""The service's parts that need no Ray, HTTP or database: the batch scorer, NaN guards, the profile cache, the
Embedder's batch wait, the settings. The service itself, over HTTP, is tests/test_serve.py."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from head_sets_for_tests import MAX_TOKENS, expected_head_scores, random_head_set
from rewardprism.backbone import load_backbone


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("tiny-bert", device="cpu", max_length=MAX_TOKENS)


def test_batch_scorer_matches_the_library_per_user_and_flags_truncation(backbone):
    from rewardprism.scoring import BatchScorer, ScoreJob

    heads = random_head_set(backbone.dim, 5, "1", seed=3)
    rng = np.random.default_rng(0)
    long_text = "many words " * MAX_TOKENS
    jobs = [ScoreJob([("q1", "short"), ("q1", long_text)], rng.normal(size=5), 0.5),
            ScoreJob([("q2", long_text)], rng.normal(size=5), 0.0, reject_over_length=True),
            ScoreJob([([{"role": "user", "content": "q3"}], "fine")], rng.normal(size=5), -1.0)]
    results = BatchScorer(backbone, token_budget=256, max_batch=2).score(heads, jobs)
    assert [r.truncated for r in results] == [[False, True], [True], [False]]
    assert results[1].scores is None  # refused, not computed; the others still are
    for job, result in zip((jobs[0], jobs[2]), (results[0], results[2])):
        direct = np.concatenate([expected_head_scores(backbone, heads, p, [r]) for p, r in job.items])
        np.testing.assert_allclose(result.head_scores, direct, atol=1e-4)
        np.testing.assert_allclose(result.scores, direct @ job.weights + job.bias, atol=1e-4)


def test_nan_guards_explanations_and_probabilities():
    from rewardprism.scoring import NonFiniteScores, Profile, explain, personalize, preference_probability

    heads = random_head_set(4, 3, "1", seed=0)
    with pytest.raises(NonFiniteScores):
        personalize(np.array([[1.0, np.nan, 0.0]]), np.ones((1, 3)), np.zeros(1))
    assert Profile(np.array([np.inf, 0, 0]), 0.0, heads.content_hash).problem(heads) == "invalid_profile"
    assert Profile(np.zeros(3), 0.0, "another").problem(heads) == "other_head_set"
    parts = explain(np.array([1.0, -3.0, 2.0]), np.array([1.0, 1.0, 0.5]), heads.head_names)
    assert [p.head for p in parts] == ["head1", "head0", "head2"] and sum(p.contribution for p in parts) == -1.0
    # the top heads are those that contribute: a zero weight (a reset profile's PCs) is never listed
    top = explain(np.array([1.0, -3.0, 2.0]), np.array([0.0, 0.0, 0.5]), heads.head_names, top=2)
    assert [p.head for p in top] == ["head2"]
    assert preference_probability(800.0, -800.0) == 1.0 and preference_probability(-800.0, 800.0) == 0.0
    assert abs(preference_probability(0.3, 0.1) + preference_probability(0.1, 0.3) - 1) < 1e-12


def test_profile_cache_serves_only_the_current_version():
    from rewardprism.scoring import Profile, ProfileCache, UserState

    cache = ProfileCache(capacity=2)
    created = datetime(2026, 12, 1, tzinfo=timezone.utc)
    v3 = UserState(True, Profile(np.ones(2), 0.0, "h", version=3, created_at=created))
    cache.put("ann", v3)
    assert cache.get("ann", (True, 3, created)) is v3 and cache.get("ann", (True, 4, created)) is None
    # deleted and created again: version 3 once more, but not the same profile
    assert cache.get("ann", (True, 3, created + timedelta(microseconds=1))) is None
    assert cache.latest("ann") is v3  # what an outage falls back to
    cache.put("bo", UserState(False))
    assert cache.get("bo", (False, None, None)) is not None and cache.get("bo", (True, None, None)) is None
    cache.put("cy", UserState(True))
    assert cache.latest("ann") is None and len(cache) == 2  # least recently used goes first


def test_batch_wait_follows_what_the_last_batch_took():
    """Unset, a batch waits for more texts up to a tenth of the last batch's forward passes: long after a full
    CPU batch, short after a small one or on a GPU; a fixed batch_wait_s wins. The Embedder class alone."""
    from serve_apps.app import BATCH_WAIT_SHARE, FIRST_BATCH_WAIT_S, Embedder
    from serve_apps.settings import ServeSettings

    embedder = Embedder.func_or_class.__new__(Embedder.func_or_class)
    embedder.last_batch_s = None
    embedder.apply(ServeSettings())
    wait = embedder._batch._get_batch_wait_timeout_s
    assert wait() == FIRST_BATCH_WAIT_S
    embedder.timed(1.6)  # 64 texts on one CPU core
    assert wait() == pytest.approx(BATCH_WAIT_SHARE * 1.6)
    embedder.timed(0.02)  # a few texts, or a GPU
    assert wait() == pytest.approx(BATCH_WAIT_SHARE * 0.02)
    embedder.timed(60.0)
    assert wait() == 1.0  # never more than a second
    embedder.apply(ServeSettings(batch_wait_s=0.05))
    embedder.timed(1.6)
    assert wait() == 0.05


def test_settings_from_env_name_the_variable_and_hide_the_url():
    from serve_apps.settings import ServeSettings

    settings = ServeSettings.from_env({"DATABASE_URL": "postgresql://rp:s3cret@db/rp", "RP_MAX_RESPONSES": "8"})
    assert settings.max_responses == 8 and "s3cret" not in repr(settings)
    assert "connect_timeout=5" in settings.store().database_url
    with pytest.raises(ValueError, match="RP_UNKNOWN_USER"):
        ServeSettings.from_env({"RP_UNKNOWN_USER": "maybe"})
    with pytest.raises(ValueError, match="placeholder"):
        ServeSettings.from_env({"DATABASE_URL": "postgresql://rp:changethis@db/rp"})
    with pytest.raises(ValueError, match="device"):
        settings.live({"device": "cuda"})
    for weak in ("changeme", "short-key"):
        with pytest.raises(ValueError, match="REWARDPRISM_ADMIN_KEY: .*at least 32 characters"):
            ServeSettings.from_env({"REWARDPRISM_ADMIN_KEY": weak})
    strong = ServeSettings.from_env({"REWARDPRISM_ADMIN_KEY": "k" * 40})
    assert "k" * 40 not in repr(strong) and strong.live({"auth_cache_s": 1}).admin_key == strong.admin_key
    assert settings.live({"unknown_user": "404"}).unknown_user == "404"


def test_a_query_id_has_one_spelling():
    """"pool:01:7" named pool 1's pair 7 when checked, but the user's answered pairs of pool 1 are found by the
    prefix "pool:1:": that pair would be asked again."""
    from pydantic import ValidationError

    from serve_apps.schemas import PairIn

    assert PairIn(prompt="p", chosen="a", rejected="b", query_id="pool:10:0").query_id == "pool:10:0"
    for bad in ("pool:01:7", "pool:1:07", "pool:1:x"):
        with pytest.raises(ValidationError, match="query_id"):
            PairIn(prompt="p", chosen="a", rejected="b", query_id=bad)
