"""Rolling users onto a new head set: migrate, shadow report, activate, roll back — on SQLite through the CLI,
and on Postgres through the service's HTTP API (the migration running as a Ray actor).

Users send feedback on version 1 (stored and adapted as the service does); version 2 is registered and every
user is migrated onto it; each v2 profile must equal an adaptation of the user's feedback computed here, offline,
from the library (backbone, head set, `adapt_profile`), and the v1 profiles must come back untouched after a
rollback. A migration interrupted between batches and rerun, and feedback arriving while a migration runs, must
end in the same profiles.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import test_serve
from head_sets_for_tests import expected_head_scores, random_head_set
from rewardprism.adapt import adapt_profile
from rewardprism.embed import EmbeddingExtractor
from rewardprism.heads import HeadSet
from rewardprism.migrate_profiles import adapt_on_head_set, scores_per_user
from rewardprism.store import (
    FeedbackPair,
    ProfileUpdate,
    StoreSettings,
    append_feedback_and_update_profile,
    create_user,
    get_head_set,
    get_profile,
    list_feedback,
    make_engine,
    make_sessions,
    migrate,
)
from rewardprism.store.rollout import migrate_profiles
from test_cli_store import ok, rp
from test_serve import wait_for

# test_serve's fixtures: a Serve app over Postgres and the tiny backbone it embeds with
admin_engine, backbone, service = test_serve.admin_engine, test_serve.backbone, test_serve.service
USERS = 6
PAIRS = 6  # per user: enough for the shadow report's 5 folds


def head_sets(dim: int, root: Path) -> dict[str, Path]:
    """v1, v2 (v1's heads at twice the scale: the same rankings) and v3 (heads that tell no responses apart)."""
    v1 = random_head_set(dim, 4, "1", seed=0)
    v2 = HeadSet(2 * v1.weight, v1.bias, v1.head_names, "drm", v1.backbone, v1.default_weights, version="2",
                features=v1.features)
    v3 = HeadSet(np.zeros_like(v1.weight), v1.bias, v1.head_names, "drm", v1.backbone, v1.default_weights, version="3",
                features=v1.features)
    return {h.version: h.save(root / f"v{h.version}") for h in (v1, v2, v3)}


def pair(user: int, i: int) -> FeedbackPair:
    short, long = f"ok {i}", f"a longer and more detailed answer number {i} for user {user}"
    chosen, rejected = (long, short) if user % 2 else (short, long)  # half the users like long answers
    return FeedbackPair(f"question {i} from user {user}", chosen, rejected)


def service_adapter(heads: HeadSet, extractor: EmbeddingExtractor):
    """What the service's feedback path does: adapt from all the user's pairs with `adapt_on_head_set`."""
    def adapt(profile, history) -> ProfileUpdate:
        scores = scores_per_user(heads, extractor, [[(f.prompt, f.chosen, f.rejected) for f in history]])
        weights, bias = adapt_on_head_set(heads, scores)
        return ProfileUpdate(weights[0].tolist(), "shrink", float(bias[0]))
    return adapt


def send_feedback(sessions, user: str, pairs: list[FeedbackPair], heads: HeadSet, extractor) -> None:
    with sessions.begin() as s:
        append_feedback_and_update_profile(s, user, pairs, service_adapter(heads, extractor),
                                           get_head_set(s, heads.name, heads.version))


def offline_profile(backbone, heads: HeadSet, pairs) -> np.ndarray:
    """The user's profile over `heads`, recomputed here one pair at a time from the backbone."""
    scores = np.stack([expected_head_scores(backbone, heads, f.prompt, [f.chosen, f.rejected]) for f in pairs])
    weights, _ = adapt_profile(scores[:, 0], scores[:, 1], heads.default_weights, center=heads.hyperprior_center)
    return weights


@pytest.fixture
def rollout(tmp_path: Path, backbone):
    """A migrated SQLite store with v1 active and users' feedback and profiles over it; v2 and v3 registered."""
    url = f"sqlite:///{tmp_path / 'rollout.db'}"
    migrate.upgrade(url)
    folders = head_sets(backbone.dim, tmp_path)
    ok(rp(url, "models", "register", str(folders["1"]), "--activate"))
    engine = make_engine(StoreSettings.from_env(url))
    sessions = make_sessions(engine)
    v1, extractor = HeadSet.load(folders["1"]), EmbeddingExtractor(backbone)
    with sessions.begin() as s:
        for u in range(USERS):
            create_user(s, f"user{u}")
        create_user(s, "silent")  # no feedback: stays on the default profile
    for u in range(USERS):
        send_feedback(sessions, f"user{u}", [pair(u, i) for i in range(PAIRS - 1)], v1, extractor)
        send_feedback(sessions, f"user{u}", [pair(u, PAIRS - 1)], v1, extractor)  # a second call: version 2
    for version in ("2", "3"):
        ok(rp(url, "models", "register", str(folders[version])))
    yield url, sessions, folders, extractor
    engine.dispose()


def profiles(sessions, version: str) -> dict[str, tuple[list[float], int, int]]:
    with sessions() as s:
        heads = get_head_set(s, "default", version)
        return {f"user{u}": (p.weights, p.version, p.n_pairs) for u in range(USERS)
                if (p := get_profile(s, f"user{u}", heads)) is not None}


def test_rollout_migrate_report_activate_and_roll_back(rollout, backbone) -> None:
    url, sessions, folders, _ = rollout
    before = profiles(sessions, "1")
    assert len(before) == USERS and all(version == 2 for _, version, _ in before.values())

    migrated = ok(rp(url, "models", "migrate", "default", "2", "--batch-users", "4", "--no-progress"))
    assert f"migrated {USERS} users ({USERS * PAIRS} pairs) onto default@2" in migrated
    v2 = HeadSet.load(folders["2"])
    with sessions() as s:
        for u in range(USERS):
            profile = get_profile(s, f"user{u}", get_head_set(s, "default", "2"))
            assert profile.n_pairs == PAIRS and profile.method == "shrink"
            np.testing.assert_allclose(profile.weights, offline_profile(backbone, v2, list_feedback(s, f"user{u}")),
                                       atol=1e-5)
        assert get_profile(s, "silent", get_head_set(s, "default", "2")) is None
    assert "migrated 0 users" in ok(rp(url, "models", "migrate", "default", "2", "--no-progress"))  # nothing left

    report = ok(rp(url, "models", "report", "default", "2"))
    assert f"users evaluated   {USERS}" in report and "population acc." in report and "losing > 10 pts" in report
    ok(rp(url, "models", "migrate", "default", "3", "--no-progress"))
    refused = rp(url, "models", "activate", "default", "3", "--require-no-regression")
    assert refused.exit_code == 2
    assert "not activating default@3: population accuracy falls from 100.0% to 50.0%" in refused.output
    assert "100.0% of users lose more than 10 points" in refused.output
    assert "active: default@2" in ok(rp(url, "models", "activate", "default", "2", "--require-no-regression"))
    assert "active: default@3" in ok(rp(url, "models", "activate", "default", "3"))  # no gate: still works

    assert "active: default@1" in ok(rp(url, "models", "activate", "default", "1"))  # roll back
    assert profiles(sessions, "1") == before  # the v1 profiles, exactly as they were


def test_an_interrupted_migration_rerun_ends_like_an_uninterrupted_one(rollout, tmp_path: Path) -> None:
    url, sessions, folders, extractor = rollout
    v2 = HeadSet.load(folders["2"])
    with sessions() as s:
        row_id = get_head_set(s, "default", "2").id

    class Killed(Exception):
        pass

    def die_after_first_batch(state) -> None:
        if state.done:
            raise Killed  # between transactions, as a kill -9 of the driver would leave it
    with pytest.raises(Killed):
        migrate_profiles(sessions, row_id, v2, extractor, batch_users=2, progress=die_after_first_batch)
    assert len(profiles(sessions, "2")) == 2
    rerun = ok(rp(url, "models", "migrate", "default", "2", "--batch-users", "2", "--no-progress"))
    assert f"migrated {USERS - 2} users" in rerun  # the finished ones were not adapted again
    interrupted = profiles(sessions, "2")
    assert all(version == 1 for _, version, _ in interrupted.values())  # each written once

    with sessions.begin() as s:  # the same migration, uninterrupted, from scratch
        for profile in [get_profile(s, f"user{u}", get_head_set(s, "default", "2")) for u in range(USERS)]:
            s.delete(profile)
    migrate_profiles(sessions, row_id, v2, extractor, batch_users=2)
    uninterrupted = profiles(sessions, "2")
    assert uninterrupted.keys() == interrupted.keys()
    for user, (weights, _, n_pairs) in uninterrupted.items():  # float noise apart: batches pad differently
        np.testing.assert_allclose(weights, interrupted[user][0], atol=1e-6)
        assert n_pairs == interrupted[user][2] == PAIRS


def test_feedback_sent_during_a_migration_is_in_the_final_profile(rollout, backbone) -> None:
    _, sessions, folders, extractor = rollout
    v1, v2 = HeadSet.load(folders["1"]), HeadSet.load(folders["2"])
    with sessions() as s:
        row_id = get_head_set(s, "default", "2").id
    late = {"user0": pair(0, 100), f"user{USERS - 1}": pair(USERS - 1, 100)}  # a finished user, a pending one

    def feedback_after_first_batch(state) -> None:
        if state.done and late:
            for user, extra in list(late.items()):
                send_feedback(sessions, user, [extra], v1, extractor)  # the service still serves v1
                del late[user]
    state = migrate_profiles(sessions, row_id, v2, extractor, batch_users=2, progress=feedback_after_first_batch)
    assert state.passes >= 2  # user0 was caught up by a second pass
    with sessions() as s:
        for user in ("user0", f"user{USERS - 1}"):
            profile = get_profile(s, user, get_head_set(s, "default", "2"))
            feedback = list_feedback(s, user)
            assert profile.n_pairs == len(feedback) == PAIRS + 1
            np.testing.assert_allclose(profile.weights, offline_profile(backbone, v2, feedback), atol=1e-5)


@pytest.mark.postgres
def test_rollout_over_http_on_postgres(service, backbone, tmp_path: Path) -> None:
    """Feedback over HTTP on v1 → register v2 → migrate (a Ray actor) → report → activate → every user is
    served a v2 profile equal to an offline adaptation → roll back → the v1 profiles are served again."""
    v1 = service.heads
    v2 = HeadSet(2 * v1.weight, v1.bias, v1.head_names, "drm", v1.backbone, v1.default_weights, version="2",
                 info=dict(v1.info), features=v1.features)
    users = [f"roll-{i}" for i in range(4)]
    with service.client(service.keys.client) as http:
        for u, user in enumerate(users):
            pairs = [pair(u, i) for i in range(PAIRS)]
            sent = http.post(f"/v1/users/{user}/feedback", json={"pairs": [
                {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]})
            assert sent.status_code == 200, sent.text
        before = {user: http.get(f"/v1/users/{user}/profile").json() for user in users}
    with service.client(service.keys.admin) as admin:
        assert admin.post("/admin/head-sets", json={"uri": str(v2.save(tmp_path / "v2"))}).status_code == 201
        assert admin.get("/admin/head-sets/default/2/migrate").status_code == 404
        started = admin.post("/admin/head-sets/default/2/migrate")
        assert started.status_code == 202, started.text
        done = wait_for(lambda: (s := admin.get("/admin/head-sets/default/2/migrate").json())["state"]
                        in ("done", "failed") and s, timeout=120)
        assert done and done["state"] == "done" and done["users_done"] >= len(users), done
        assert any(line.startswith("population acc.") for line in done["report"]) and done["regressions"] == []
        assert "population acc." in ok(rp(service.database, "models", "report", "default", "2"))
        # a version that tells no responses apart: migrated, then refused by the gate, saying why
        blind = HeadSet(np.zeros_like(v1.weight), v1.bias, v1.head_names, "drm", v1.backbone, v1.default_weights,
                        version="3", info=dict(v1.info), features=v1.features)
        assert admin.post("/admin/head-sets", json={"uri": str(blind.save(tmp_path / "v3"))}).status_code == 201
        assert admin.post("/admin/head-sets/default/3/migrate").status_code == 202
        assert wait_for(lambda: admin.get("/admin/head-sets/default/3/migrate").json()["state"] == "done",
                        timeout=120)
        refused = admin.post("/admin/head-sets/default/3/activate", params={"require_no_regression": True})
        assert refused.status_code == 409 and "not activating default@3: population accuracy falls" in refused.text
        try:
            activated = admin.post("/admin/head-sets/default/2/activate", params={"require_no_regression": True})
            assert activated.status_code == 200, activated.text
            with service.client(service.keys.client) as http:
                assert wait_for(lambda: all(http.post("/v1/score", json={"prompt": "p", "responses": ["r"]}).json()
                                            ["head_set"] == "default@2" for _ in range(8)))
                for u, user in enumerate(users):
                    served = http.get(f"/v1/users/{user}/profile").json()
                    assert served["head_set"] == "default@2" and served["n_pairs"] == PAIRS
                    np.testing.assert_allclose(
                        served["weights"], offline_profile(backbone, v2, [pair(u, i) for i in range(PAIRS)]),
                        atol=1e-4)
                    scored = http.post("/v1/score", json={"user_id": user, "prompt": "p", "responses": ["r"]})
                    assert scored.json()["profile"]["source"] == "user"
        finally:
            assert admin.post("/admin/head-sets/default/1/activate").status_code == 200
        with service.client(service.keys.client) as http:
            assert wait_for(lambda: all(http.post("/v1/score", json={"prompt": "p", "responses": ["r"]}).json()
                                        ["head_set"] == "default@1" for _ in range(8)))
            assert {user: http.get(f"/v1/users/{user}/profile").json() for user in users} == before
