"""The scoring service over real HTTP: a real Serve app on the session's Ray cluster, a real Postgres database.

One application serves the whole module (2 ingress and 2 embedder replicas over the tiny backbone, a random head
set) against a Postgres database of this module's own, so the fault tests can cut it off without touching
anyone else's: the database is made unreachable for real with `ALTER DATABASE ... ALLOW_CONNECTIONS false` and
`pg_terminate_backend` on its sessions (new connections are refused, open ones die), then allowed again. One
test runs a second application on SQLite. Expected scores and profiles are recomputed here from the library
(backbone, head set, adaptation), never copied from the service.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from head_sets_for_tests import MAX_TOKENS, expected_head_scores, random_head_set
from rewardprism import store
from rewardprism.backbone import load_backbone
from rewardprism.heads import HeadSet
from rewardprism.store.migrate import upgrade
from safetensors.numpy import load_file, save_file

from serve_apps import local

BOOTSTRAP_KEY = secrets.token_hex(32)  # REWARDPRISM_ADMIN_KEY of the test service
ENV = {"RP_HEAD_SET_POLL_S": "0.5", "RP_DB_TIMEOUT_S": "2",  # settings.py
       "REWARDPRISM_ADMIN_KEY": BOOTSTRAP_KEY}
LIVE = {"max_responses": 16, "max_request_bytes": 65536}  # the Ingress user_config on top of config.yaml's
FUZZ_EXAMPLES = int(os.environ.get("RP_FUZZ_EXAMPLES", "80"))  # per generation mode, over all operations


# ---------------------------------------------------------------------------------------------- fixtures


@dataclass
class Keys:
    admin: str
    client: str  # score + feedback, any user
    scorer: str  # score only
    alice: str  # score + feedback, bound to alice


@dataclass
class Service:
    port: int
    url: str
    database: str  # the module's own Postgres database
    name: str
    heads: HeadSet
    heads_dir: Path
    keys: Keys

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"X-API-Key": key} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_config(name: str, route_prefix: str, database_url: str, replicas: int, **user_config) -> dict:
    return local.app_config(name, route_prefix, {**ENV, "DATABASE_URL": database_url}, replicas=replicas,
                            user_config={**LIVE, **user_config})


@pytest.fixture(scope="module")
def admin_engine(postgres_url):
    engine = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def service(ray_cluster, admin_engine, postgres_url, tmp_path_factory) -> Service:
    from ray import serve

    name = f"rp_serve_{uuid.uuid4().hex[:8]}"
    with admin_engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    heads = random_head_set(load_backbone("tiny-bert", device="cpu").dim, 8, "1", seed=0)
    heads.info["hyperprior_center"] = 3.0  # as `calibrate_hyperprior` leaves it: feedback must adapt with it
    heads_dir = heads.save(tmp_path_factory.mktemp("heads") / "v1")
    engine = store.make_engine(store.StoreSettings.from_env(url))
    with store.make_sessions(engine).begin() as session:
        store.register_head_set(session, heads, uri=str(heads_dir), activate=True)
        store.create_user(session, "alice")
        keys = Keys(*(store.create_api_key(session, scopes, user_external_id=user)[1] for scopes, user in
                      ((["admin"], None), (["score", "feedback"], None), (["score"], None),
                       (["score", "feedback"], "alice"))))
    engine.dispose()
    port = free_port()
    local.run_config(port, app_config("rp", "/", url, replicas=2))
    yield Service(port, f"http://127.0.0.1:{port}", url, name, heads, heads_dir, keys)
    serve.shutdown()
    with admin_engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("tiny-bert", device="cpu", max_length=MAX_TOKENS)


@pytest.fixture(scope="module")
def db(service):
    engine = sa.create_engine(service.database, pool_pre_ping=True)  # survives the outage test
    yield engine
    engine.dispose()


def set_profile(service: Service, user: str, weights, bias: float = 0.0) -> dict:
    """Create `user` if need be, and give them these weights through the admin API."""
    with service.client(service.keys.admin) as http:
        assert http.post("/admin/users", json={"external_id": user}).status_code in (201, 409)
        response = http.put(f"/admin/users/{user}/profile", json={"weights": list(weights), "bias": bias})
    assert response.status_code == 200, response.text
    return response.json()


def pair(i: int, tag: str = "") -> dict:
    return {"prompt": f"question {i}{tag}", "chosen": f"a careful, kind answer {i}{tag}",
            "rejected": f"rude {i}{tag}"}


def wait_for(condition, timeout: float = 15.0, interval: float = 0.2):
    """Poll until `condition()` is truthy; its last value (so a failing assert shows what it saw)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------- scoring


def test_scores_match_the_library_with_default_and_personal_profiles(service, backbone):
    heads, prompt, responses = service.heads, "How do I boil an egg?", ["Boil it 7 minutes.", "No idea.", "Fry it."]
    scores = expected_head_scores(backbone, heads, prompt, responses)
    with service.client(service.keys.client) as http:
        default = http.post("/v1/score", json={"prompt": prompt, "responses": responses, "explain": True})
        assert default.status_code == 200, default.text
        body = default.json()
        assert body["profile"] == {"user_id": None, "version": None, "source": "default", "reason": "no_user",
                                   "stale": False}
        np.testing.assert_allclose([s["score"] for s in body["scores"]], scores @ heads.default_weights, atol=1e-4)

        weights = np.linspace(-1, 1, heads.num_heads)
        profile = set_profile(service, "bob", weights, bias=0.5)
        mine = http.post("/v1/score", json={"user_id": "bob", "prompt": prompt, "responses": responses,
                                            "explain": True}).json()
    assert mine["profile"] == {"user_id": "bob", "version": profile["version"], "source": "user", "reason": None,
                               "stale": False}
    np.testing.assert_allclose([s["score"] for s in mine["scores"]], scores @ weights + 0.5, atol=1e-4)
    for scored in mine["scores"]:  # each head's part: contributions plus the bias give the score
        parts = scored["explanation"]
        assert len(parts) == heads.num_heads and sorted(p["head"] for p in parts) == sorted(heads.head_names)
        assert abs(sum(p["contribution"] for p in parts) + mine["bias"] - scored["score"]) < 1e-4
        assert [abs(p["contribution"]) for p in parts] == sorted((abs(p["contribution"]) for p in parts), reverse=True)


def test_compare_is_bradley_terry_on_the_users_scores(service, backbone):
    weights = np.arange(service.heads.num_heads, dtype=float)
    set_profile(service, "carol", weights)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    with service.client(service.keys.client) as http:
        body = http.post("/v1/compare", json={"user_id": "carol", "messages": messages, "a": "Paris.",
                                              "b": "It is Lyon."}).json()
    a, b = expected_head_scores(backbone, service.heads, messages, ["Paris.", "It is Lyon."]) @ weights
    assert abs(body["score_a"] - a) < 1e-4 and abs(body["score_b"] - b) < 1e-4
    assert abs(body["probability_a"] - 1 / (1 + np.exp(-(a - b)))) < 1e-6


def test_feedback_readapts_from_all_pairs_and_the_next_score_uses_it(service, backbone):
    from rewardprism.adapt import adapt_profile

    heads, user = service.heads, f"fb-{uuid.uuid4().hex[:6]}"
    first, second = [pair(i) for i in range(3)], [pair(i) for i in range(3, 5)]
    with service.client(service.keys.client) as http:
        before = http.post("/v1/score", json={"user_id": user, "prompt": "hi", "responses": ["a", "b"]}).json()
        assert before["profile"]["reason"] == "unknown_user"
        one = http.post(f"/v1/users/{user}/feedback", json={"pairs": first})
        assert one.status_code == 200, one.text
        two = http.post(f"/v1/users/{user}/feedback", json={"pairs": second}).json()
        after = http.post("/v1/score", json={"user_id": user, "prompt": "hi", "responses": ["a", "b"]}).json()
        stored = http.get(f"/v1/users/{user}/profile").json()
    assert (one.json()["profile"]["version"], two["profile"]["version"]) == (1, 2)
    assert two["stored"] == 2 and stored["n_pairs"] == 5 and stored["version"] == 2
    assert after["profile"] == {"user_id": user, "version": 2, "source": "user", "reason": None, "stale": False}

    pairs = first + second  # re-adapted from all five pairs, from the head set's default weights and hyperprior
    chosen = np.concatenate([expected_head_scores(backbone, heads, p["prompt"], [p["chosen"]]) for p in pairs])
    rejected = np.concatenate([expected_head_scores(backbone, heads, p["prompt"], [p["rejected"]]) for p in pairs])
    weights, bias = adapt_profile(chosen, rejected, heads.default_weights, method="default", center=3.0)
    np.testing.assert_allclose(stored["weights"], weights, atol=1e-4)
    uncalibrated, _ = adapt_profile(chosen, rejected, heads.default_weights, method="default")
    assert np.abs(uncalibrated - weights).max() > 1e-2  # the head set's centre made a difference
    assert abs(stored["bias"] - bias) < 1e-4
    expected = expected_head_scores(backbone, heads, "hi", ["a", "b"]) @ weights + bias
    np.testing.assert_allclose([s["score"] for s in after["scores"]], expected, atol=1e-3)


def test_concurrent_feedback_for_one_user_stores_every_pair_with_consistent_versions(service, db):
    user, clients = f"crowd-{uuid.uuid4().hex[:6]}", 16

    def send(i: int) -> int:
        with service.client(service.keys.client) as http:
            response = http.post(f"/v1/users/{user}/feedback", json={"pairs": [pair(i, user)]})
        assert response.status_code == 200, response.text
        return response.json()["profile"]["version"]

    with cf.ThreadPoolExecutor(clients) as pool:
        versions = list(pool.map(send, range(clients)))
    assert sorted(versions) == list(range(1, clients + 1))  # each update saw all earlier ones; none lost
    with db.connect() as conn:
        rows = conn.execute(sa.text("SELECT f.chosen FROM feedback f JOIN users u ON u.id = f.user_id "
                                    "WHERE u.external_id = :u"), {"u": user}).scalars().all()
        version, n_pairs = conn.execute(sa.text("SELECT p.version, p.n_pairs FROM profiles p JOIN users u "
                                                "ON u.id = p.user_id WHERE u.external_id = :u"), {"u": user}).one()
    assert sorted(rows) == sorted(pair(i, user)["chosen"] for i in range(clients))
    assert (version, n_pairs) == (clients, clients)


# ---------------------------------------------------------------------------------------------- queries


def expected_picks(backbone, heads: HeadSet, labelled: list[dict], gaps: np.ndarray, k: int,
                   exclude=None) -> list[int]:
    """The pairs the library chooses for a user with these labelled pairs (recomputed here, never copied)."""
    from rewardprism.select import choose_pairs

    scores = np.array([[expected_head_scores(backbone, heads, p["prompt"], [p[side]])[0] for side in
                        ("chosen", "rejected")] for p in labelled]).reshape(len(labelled), 2, heads.num_heads)
    return choose_pairs(heads, scores[:, 0], scores[:, 1], gaps, k, "information", exclude).tolist()


def test_queries_among_sent_responses_and_feedback_citing_them(service, backbone, db):
    from rewardprism.select import response_pairs

    user, heads = f"q-{uuid.uuid4().hex[:6]}", service.heads
    prompt = "which reply is better?"
    responses = ["a careful, kind answer", "rude", "a long answer that rambles on", "yes", "no thanks"]
    index, gaps = response_pairs(expected_head_scores(backbone, heads, prompt, responses))
    with service.client(service.keys.client) as http:
        first = http.post(f"/v1/users/{user}/queries", json={"prompt": prompt, "responses": responses, "k": 3})
        assert first.status_code == 200, first.text
        body = first.json()
        assert (body["labelled"], body["candidates"], body["method"]) == (0, 10, "information")
        asked = [tuple(q["responses"]) for q in body["queries"]]
        assert asked == [tuple(index[i]) for i in expected_picks(backbone, heads, [], gaps, 3)]
        assert all(q["a"] == responses[q["responses"][0]] and q["b"] == responses[q["responses"][1]]
                   for q in body["queries"])
        query = body["queries"][0]
        answer = {"prompt": prompt, "chosen": query["b"], "rejected": query["a"], "query_id": query["query_id"]}
        stored = http.post(f"/v1/users/{user}/feedback", json={"pairs": [answer]})
        assert stored.status_code == 200, stored.text
        other = body["queries"][1]
        wrong = {**answer, "query_id": other["query_id"]}  # cites a question about another pair
        refused = http.post(f"/v1/users/{user}/feedback", json={"pairs": [wrong]})
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "pairs", 0, "query_id"]
        twice = http.post(f"/v1/users/{user}/feedback", json={"pairs": [answer, answer]})
        assert twice.status_code == 422 and twice.json()["detail"][0]["loc"] == ["body", "pairs", 1, "query_id"]
        second = http.post(f"/v1/users/{user}/queries", json={"prompt": prompt, "responses": responses, "k": 2}).json()
        labelled = [{"prompt": prompt, "chosen": query["b"], "rejected": query["a"]}]
        assert second["labelled"] == 1
        assert [tuple(q["responses"]) for q in second["queries"]] == \
            [tuple(index[i]) for i in expected_picks(backbone, heads, labelled, gaps, 2)]
        too_many = http.post(f"/v1/users/{user}/queries", json={"prompt": prompt, "responses": responses, "k": 11})
        assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"] == ["body", "k"]
        both = http.post(f"/v1/users/{user}/queries", json={"pool": "x", "prompt": prompt, "responses": responses})
        assert both.status_code == 422
        over = http.post(f"/v1/users/{user}/queries", json={"prompt": prompt, "responses": ["r"] * 17})
        assert over.status_code == 422 and over.json()["detail"][0]["loc"] == ["body", "responses"]  # the live cap
        twice = http.post(f"/v1/users/{user}/queries", json={"prompt": prompt, "responses": ["x", "y", "x"]})
        assert twice.status_code == 422 and "responses[2] repeats responses[0]" in twice.text
        unknown = http.post(f"/v1/users/{user}/queries", json={"pool": "nope"})
        assert unknown.status_code == 404 and "no pool named 'nope'" in unknown.text
    with service.client(service.keys.scorer) as http:  # asking is part of the feedback loop
        assert http.post(f"/v1/users/{user}/queries", json={"prompt": prompt, "responses": responses}).status_code \
            == 403
    with db.connect() as conn:
        cited = conn.execute(sa.text("SELECT f.query_id FROM feedback f JOIN users u ON u.id = f.user_id "
                                     "WHERE u.external_id = :u"), {"u": user}).scalars().all()
    assert cited == [query["query_id"]]


def test_queries_from_a_registered_pool_skip_answered_pairs(service, backbone, tmp_path):
    from rewardprism.cli import app
    from rewardprism.data import PreferencePair
    from rewardprism.embed import embed_pairs
    from typer.testing import CliRunner

    pairs = [PreferencePair(f"question {i}", f"a careful answer {i} " * (i % 4 + 1), f"rude {i}", group="g")
             for i in range(30)]
    embed_pairs(pairs, load_backbone("tiny-bert", device="cpu", max_length=MAX_TOKENS), tmp_path / "emb",
                progress=False)
    name = f"cand-{uuid.uuid4().hex[:6]}"
    registered = CliRunner().invoke(app, ["pools", "--database-url", service.database, "register", name,
                                          "--head-set", "default@1", "--embeddings", str(tmp_path / "emb")])
    assert registered.exit_code == 0, registered.output
    engine = store.make_engine(store.StoreSettings.from_env(service.database))
    with store.make_sessions(engine)() as session:
        pool = store.get_query_pool(session, store.get_head_set(session, "default", "1"), name)
        pool_id, gaps = pool.id, store.pool_gaps(session, pool.id, service.heads.num_heads)
    engine.dispose()
    user = f"qp-{uuid.uuid4().hex[:6]}"
    with service.client(service.keys.client) as http:
        body = http.post(f"/v1/users/{user}/queries", json={"pool": name, "k": 4}).json()
        positions = [int(q["query_id"].split(":")[2]) for q in body["queries"]]
        assert body["candidates"] == 30 and positions == expected_picks(backbone, service.heads, [], gaps, 4)
        query = body["queries"][0]
        source = pairs[positions[0]]
        assert {query["a"], query["b"]} == {source.chosen, source.rejected} and query["prompt"] == source.prompt
        answer = {"prompt": source.prompt, "chosen": source.chosen, "rejected": source.rejected,
                  "query_id": query["query_id"]}
        assert http.post(f"/v1/users/{user}/feedback", json={"pairs": [answer]}).status_code == 200
        again = http.post(f"/v1/users/{user}/queries", json={"pool": name, "k": 29}).json()
        assert positions[0] not in [int(q["query_id"].split(":")[2]) for q in again["queries"]]
        assert again["labelled"] == 1
        spent = http.post(f"/v1/users/{user}/queries", json={"pool": name, "k": 30})
        assert spent.status_code == 422 and "only 29 pairs are left" in spent.text
        forged = {**answer, "query_id": f"pool:{pool_id}:{positions[1]}"}
        assert http.post(f"/v1/users/{user}/feedback", json={"pairs": [forged]}).status_code == 422
    with service.client(service.keys.admin) as http:
        assert http.delete(f"/admin/users/{user}").status_code == 204
    with service.client(service.keys.client) as http:  # a deleted user stays deleted: nothing to ask them
        assert http.post(f"/v1/users/{user}/queries", json={"pool": name}).status_code == 410


# ---------------------------------------------------------------------------------------------- auth


def test_api_keys_scopes_and_user_binding(service):
    keys, body = service.keys, {"prompt": "p", "responses": ["r"]}
    feedback = {"pairs": [pair(0, "auth")]}
    with service.client() as anonymous:
        assert anonymous.post("/v1/score", json=body).status_code == 401
        assert anonymous.post("/v1/score", json=body, headers={"X-API-Key": "rp_nope_nope"}).status_code == 401
        assert anonymous.post("/v1/score", json=body,
                              headers={"X-API-Key": keys.client[:-2] + "xx"}).status_code == 401
    with service.client(keys.scorer) as http:
        assert http.post("/v1/score", json=body).status_code == 200
        denied = http.post("/v1/users/alice/feedback", json=feedback)
        assert denied.status_code == 403 and "feedback" in denied.json()["detail"]
        assert http.get("/admin/users").status_code == 403
    with service.client(keys.alice) as http:
        assert http.post("/v1/score", json={**body, "user_id": "bob"}).status_code == 403
        assert http.get("/v1/users/bob/profile").status_code == 403
        assert http.post("/v1/users/bob/feedback", json=feedback).status_code == 403
        assert http.post("/v1/users/alice/feedback", json=feedback).status_code == 200
        implicit = http.post("/v1/score", json=body).json()  # no user_id: the key's own user
        assert implicit["profile"]["user_id"] == "alice" and implicit["profile"]["source"] == "user"
        assert http.get("/admin/users/alice").status_code == 403
    with service.client(keys.client) as http:
        assert http.post("/admin/users", json={"external_id": "mallory"}).status_code == 403


def test_a_key_is_hashed_once_however_many_requests_arrive_with_it(service, db, monkeypatch):
    """Keys from before migration 0002 still cost scrypt (tens of milliseconds, 16 MiB) until rehashed: 32
    requests with a key not (or no longer) cached must share one verification, not run 32. ScoringService
    directly (no HTTP), on the service's database; the real verification, counted."""
    import asyncio

    from sqlalchemy.orm import Session

    from serve_apps import data
    from serve_apps import service as service_module
    from serve_apps.settings import ServeSettings

    with Session(db) as session, session.begin():
        _, token = store.create_api_key(session, ["score"])
    calls, verify = [], data.authenticate

    def counted(session, token):
        calls.append(token)
        return verify(session, token)

    monkeypatch.setattr(service_module.data, "authenticate", counted)

    async def burst() -> list:
        scoring = service_module.ScoringService(ServeSettings(database_url=service.database, auth_cache_s=0),
                                                embed=None, metrics=None)
        try:
            first = await asyncio.gather(*(scoring.authenticate(token) for _ in range(32)))
            again = await asyncio.gather(*(scoring.authenticate(token) for _ in range(8)))  # expired at once
            with pytest.raises(service_module.ApiError, match="invalid or revoked"):
                await asyncio.gather(*(scoring.authenticate(token + "x") for _ in range(8)))
            return first + again
        finally:
            await scoring.close()

    callers = asyncio.run(burst())
    assert all(c == callers[0] for c in callers) and callers[0].allows("score")
    assert calls == [token, token, token + "x"]


def test_a_user_deleted_and_created_again_elsewhere_is_not_scored_with_the_old_profile(service, db):
    """The recreated user's profile starts again at version 1; a replica that cached the old one (this
    ScoringService, no HTTP) must still see that it changed, though the deletion happened elsewhere."""
    import asyncio

    from sqlalchemy.orm import Session

    from serve_apps import service as service_module
    from serve_apps.settings import ServeSettings

    user, heads = f"reborn-{uuid.uuid4().hex[:6]}", service.heads.num_heads

    def recreate(weights: list[float], delete: bool = True) -> int:
        with Session(db) as session, session.begin():
            if delete:
                store.delete_user(session, user)
            store.create_user(session, user)
            head_set = store.get_head_set(session, service.heads.name)
            return store.save_profile(session, user, weights, expected_version=None, method="manual",
                                      head_set=head_set).version

    class Lookups:  # the metrics sink: what the profile cache answered
        results: list[str] = []

        def cache(self, result: str) -> None:
            self.results.append(result)

    async def profiles_seen() -> list:
        replica = service_module.ScoringService(ServeSettings(database_url=service.database), embed=None,
                                                metrics=Lookups())
        await replica.start()
        try:
            first, _ = await replica.profile_for(user, replica.heads())
            assert recreate([-1.0] * heads) == first.version == 1
            again, used = await replica.profile_for(user, replica.heads())
            return [first.weights.tolist(), again.weights.tolist(), used.version]
        finally:
            await replica.close()

    recreate([1.0] * heads, delete=False)
    first, again, version = asyncio.run(profiles_seen())
    assert first == [1.0] * heads and again == [-1.0] * heads and version == 1
    assert Lookups.results == ["miss", "miss"]


def test_a_constraint_a_concurrent_writer_trips_is_a_409_not_a_500(service):
    """E.g. two activations at once meeting the one-active-version index: the loser is told to retry."""
    import asyncio

    from serve_apps import service as service_module
    from serve_apps.settings import ServeSettings

    def concurrent_insert(session):  # as if alice were created elsewhere after this writer checked: the index
        session.add(store.User(external_id="alice", meta={}))
        session.flush()

    async def write() -> None:
        scoring = service_module.ScoringService(ServeSettings(database_url=service.database), embed=None,
                                                metrics=None)
        try:
            await scoring.write(concurrent_insert)
        finally:
            await scoring.close()

    with pytest.raises(service_module.ApiError, match="retry") as info:
        asyncio.run(write())
    assert info.value.status == 409


def test_a_transaction_postgres_aborts_in_a_deadlock_is_a_409_and_the_database_stays_up(service):
    """A deadlock is settled by aborting one transaction (SQLSTATE 40P01, raised as an OperationalError): the
    loser is told to retry, and the replica does not report the database as unreachable."""
    import asyncio
    import threading

    from serve_apps import service as service_module
    from serve_apps.settings import ServeSettings

    engine = sa.create_engine(service.database)
    with engine.begin() as conn:
        for user in ("deadlock-a", "deadlock-b"):
            conn.execute(sa.insert(store.User).values(external_id=user, meta={}))
    other_holds_b, service_holds_a = threading.Event(), threading.Event()
    touch = sa.text("UPDATE users SET display_name = 'x' WHERE external_id = :user")

    def other() -> None:  # holds b, then wants a; it checks for deadlocks only after 30 s, the service after 1 s,
        with engine.begin() as conn:  # so the service's transaction is the one Postgres aborts
            conn.execute(sa.text("SET LOCAL deadlock_timeout = '30s'"))
            conn.execute(touch, {"user": "deadlock-b"})
            other_holds_b.set()
            service_holds_a.wait(10)
            conn.execute(touch, {"user": "deadlock-a"})

    def holds_a_then_wants_b(session) -> None:
        session.execute(touch, {"user": "deadlock-a"})
        other_holds_b.wait(10)
        service_holds_a.set()
        session.execute(touch, {"user": "deadlock-b"})

    async def write() -> bool:
        scoring = service_module.ScoringService(ServeSettings(database_url=service.database), embed=None,
                                                metrics=None)
        try:
            with pytest.raises(service_module.ApiError, match="retry") as info:
                await scoring.write(holds_a_then_wants_b)
            assert info.value.status == 409
            return scoring.database_ok
        finally:
            await scoring.close()

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert asyncio.run(write())
    finally:
        thread.join(15)
        engine.dispose()


def test_bootstrap_admin_key_creates_lists_and_revokes_keys(service, db):
    """REWARDPRISM_ADMIN_KEY works for admin calls (e.g. the first keys) and is audited; a near miss is 401."""
    with service.client(BOOTSTRAP_KEY) as http:
        created = http.post("/admin/users", json={"external_id": "bootstrapped"})
        assert created.status_code == 201, created.text
        bound = http.post("/admin/keys", json={"scopes": ["score"], "user_id": "bootstrapped", "name": "app"})
        assert bound.status_code == 201 and bound.json()["token"].startswith("rp_"), bound.text
        unused = http.post("/admin/keys", json={"scopes": ["feedback", "score"]}).json()
        assert http.post("/admin/keys", json={"scopes": ["root"]}).status_code == 422
        assert http.post("/admin/keys", json={"scopes": ["score"], "user_id": "nobody"}).status_code == 404
        revoked = http.delete(f"/admin/keys/{unused['prefix']}")
        assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
        assert http.delete("/admin/keys/00000000").status_code == 404
        listed = {k["prefix"]: k for k in http.get("/admin/keys").json()}
        assert bound.json()["prefix"] in listed and unused["prefix"] not in listed
        assert all("token" not in k for k in listed.values())
        assert unused["prefix"] in {k["prefix"] for k in http.get("/admin/keys", params={"revoked": True}).json()}
    with service.client(bound.json()["token"]) as http:
        score = http.post("/v1/score", json={"prompt": "p", "responses": ["r"]})
        assert score.status_code == 200 and score.json()["profile"]["user_id"] == "bootstrapped"
        assert http.get("/admin/keys").status_code == 403
    with service.client(unused["token"]) as http:  # revoked before any replica saw it
        assert http.post("/v1/score", json={"prompt": "p", "responses": ["r"]}).status_code == 401
    with service.client(BOOTSTRAP_KEY[:-1] + ("0" if BOOTSTRAP_KEY[-1] != "0" else "1")) as http:
        assert http.post("/admin/users", json={"external_id": "intruder"}).status_code == 401
    with db.connect() as conn:
        audit = conn.execute(sa.select(store.AuditEntry.action, store.AuditEntry.actor)
                             .where(store.AuditEntry.target == "bootstrapped")).all()
    assert sorted(audit) == [("key.create", "key:env:admin"), ("user.create", "key:env:admin")]


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("payload, loc", [
    ({"prompt": "p"}, ["body", "responses"]),
    ({"prompt": "p", "responses": "not a list"}, ["body", "responses"]),
    ({"prompt": "p", "responses": [1, 2]}, ["body", "responses", 0]),
    ({"prompt": "p", "responses": []}, ["body", "responses"]),
    ({"prompt": "p", "responses": ["r"], "explain_top": 0}, ["body", "explain_top"]),
    ({"prompt": "p", "responses": ["r"], "response": ["typo"]}, ["body", "response"]),
    ({"prompt": "p", "messages": [{"role": "user", "content": "q"}], "responses": ["r"]}, ["body"]),
    ({"responses": ["r"]}, ["body"]),
    ({"prompt": "p", "responses": ["r"], "user_id": ""}, ["body", "user_id"]),
    ({"prompt": "p", "responses": ["r\x00"]}, ["body", "responses", 0]),
])
def test_malformed_requests_get_422_naming_the_field(service, payload, loc):
    with service.client(service.keys.client) as http:
        response = http.post("/v1/score", json=payload)
    assert response.status_code == 422, response.text
    assert loc in [error["loc"] for error in response.json()["detail"]]


def test_malformed_json_and_feedback_fields(service):
    with service.client(service.keys.client) as http:
        broken = http.post("/v1/score", content=b'{"prompt": "p", "responses": [', headers={
            "content-type": "application/json"})
        assert broken.status_code == 422 and broken.json()["detail"][0]["type"] == "json_invalid"
        missing = http.post("/v1/users/alice/feedback", json={"pairs": [{"prompt": "p", "chosen": "c"}]})
        assert missing.status_code == 422 and ["body", "pairs", 0, "rejected"] in [
            e["loc"] for e in missing.json()["detail"]]
        # each message within its limit, together over the store's: refused before any forward pass
        chat = [{"role": "user", "content": "x" * 16_500}, {"role": "assistant", "content": "y" * 16_500}]
        too_long = http.post("/v1/users/alice/feedback",
                             json={"pairs": [pair(0), {"messages": chat, "chosen": "c", "rejected": "r"}]})
        assert too_long.status_code == 422 and too_long.json()["detail"][0]["loc"] == ["body", "pairs", 1]
        assert "33000 characters together" in too_long.json()["detail"][0]["msg"]


def test_limits_on_bytes_responses_and_tokens(service):
    long_text = "word " * (3 * MAX_TOKENS)
    with service.client(service.keys.client) as http:
        too_many = http.post("/v1/score", json={"prompt": "p", "responses": ["r"] * 17})
        assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"] == ["body", "responses"]
        big = http.post("/v1/score", json={"prompt": "p", "responses": ["x" * 70_000]})
        assert big.status_code == 413

        def chunks():  # no Content-Length: the limit applies as the body streams in
            yield b'{"prompt": "p", "responses": ["'
            for _ in range(40):
                yield b"y" * 2048
            yield b'"]}'
        streamed = http.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        cut = http.post("/v1/score", json={"prompt": "p", "responses": ["short", long_text]}).json()
        assert [s["truncated"] for s in cut["scores"]] == [False, True]


def test_live_settings_change_without_restarting_replicas(service, backbone):
    """user_config: unknown users get 404, over-long texts 422, feedback adapts with HyRe; then back. The
    replicas stay the same."""
    import ray
    from rewardprism.adapt import adapt_profile

    def replicas() -> set[str]:
        return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "rp#Ingress" in a["name"]}
    before = replicas()
    unknown = {"user_id": "nobody-at-all", "prompt": "p", "responses": ["r"]}
    local.run_config(service.port, app_config("rp", "/", service.database, 2, unknown_user="404",
                                              over_length="reject", adaptation="hyre"))
    try:
        with service.client(service.keys.client) as http:
            # every replica reconfigured: several requests in a row all see the new settings
            assert wait_for(lambda: all(http.post("/v1/score", json=unknown).status_code == 404 for _ in range(6)))
            refused = http.post("/v1/score", json={"prompt": "p", "responses": ["ok", "word " * 200]})
            assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "responses", 1]
            pairs = [pair(i, "hyre") for i in range(3)]
            profile = http.post(f"/v1/users/hyre-{uuid.uuid4().hex[:6]}/feedback", json={"pairs": pairs}).json()
            # the over-long text is named by its place in the request, whatever was cached or repeated before it
            too_long = {"prompt": "p", "chosen": "word " * 200, "rejected": "r"}
            refused = http.post("/v1/users/alice/feedback", json={"pairs": [pairs[0], pairs[1], pairs[1], too_long]})
            assert refused.status_code == 422
            assert [e["loc"] for e in refused.json()["detail"]] == [["body", "pairs", 3, "chosen"]]
    finally:
        local.run_config(service.port, app_config("rp", "/", service.database, 2))
    assert replicas() == before
    with service.client(service.keys.client) as http:
        back = http.post("/v1/score", json={"user_id": "nobody-at-all", "prompt": "p", "responses": ["r"]})
    assert back.status_code == 200 and back.json()["profile"]["reason"] == "unknown_user"
    scores = [np.concatenate([expected_head_scores(backbone, service.heads, p["prompt"], [p[side]]) for p in pairs])
              for side in ("chosen", "rejected")]
    weights, bias = adapt_profile(*scores, service.heads.default_weights, method="hyre")
    assert profile["profile"]["method"] == "hyre" and abs(profile["profile"]["bias"] - bias) < 1e-4
    np.testing.assert_allclose(profile["profile"]["weights"], weights, atol=1e-4)


def test_nan_never_gets_in_or_out(service, db):
    set_profile(service, "nan-user", np.ones(service.heads.num_heads))
    with service.client(service.keys.admin) as http:
        nan = http.put("/admin/users/nan-user/profile", content=b'{"weights": [NaN, 1, 1, 1, 1, 1, 1, 1]}',
                       headers={"content-type": "application/json"})
        assert nan.status_code == 422 and nan.json()["detail"][0]["loc"][:3] == ["body", "weights", 0]
        huge = http.put("/admin/users/nan-user/profile", json={"weights": [1e300] * service.heads.num_heads})
        assert huge.status_code == 422
        meta = http.post("/admin/users", content=b'{"external_id": "m", "metadata": {"x": Infinity}}',
                         headers={"content-type": "application/json"})
        assert meta.status_code == 422
    with db.begin() as conn:  # a corrupt row written behind the service's back
        conn.execute(sa.text("UPDATE profiles SET weights = ARRAY['NaN'::float8, 1, 1, 1, 1, 1, 1, 1], "
                             "version = version + 1 WHERE user_id = (SELECT id FROM users WHERE "
                             "external_id = 'nan-user')"))
    with service.client(service.keys.client) as http:
        body = wait_for(lambda: (r := http.post("/v1/score", json={
            "user_id": "nan-user", "prompt": "p", "responses": ["r", "s"], "explain": True}).json())
            ["profile"]["reason"] == "invalid_profile" and r)
    assert body, "the corrupt profile was never picked up"
    assert body["profile"]["source"] == "default"
    values = [s["score"] for s in body["scores"]] + [c["contribution"] for s in body["scores"]
                                                     for c in s["explanation"]]
    assert all(np.isfinite(values))


# ---------------------------------------------------------------------------------------------- admin


def test_admin_users_export_import_reset_and_audit(service, db):
    user = f"adm-{uuid.uuid4().hex[:6]}"
    with service.client(service.keys.admin) as http:
        created = http.post("/admin/users", json={"external_id": user, "display_name": "Ada",
                                                  "metadata": {"team": "x"}})
        assert created.status_code == 201 and created.json()["profile"] is None
        assert http.post("/admin/users", json={"external_id": user}).status_code == 409
        listed = http.get("/admin/users", params={"search": user}).json()
        assert listed["total"] == 1 and listed["items"][0]["display_name"] == "Ada"
        with service.client(service.keys.client) as client:
            assert client.post(f"/v1/users/{user}/feedback", json={"pairs": [pair(1), pair(2)]}).status_code == 200
        exported = http.get(f"/admin/users/{user}/export").json()
        assert len(exported["feedback"]) == 2 and exported["profile"]["n_pairs"] == 2
        reset = http.post(f"/admin/users/{user}/reset").json()
        assert reset["method"] == "default" and reset["weights"] == service.heads.default_weights.tolist()
        disabled = http.patch(f"/admin/users/{user}", json={"disabled": True}).json()
        assert disabled["disabled"] is True
        with service.client(service.keys.client) as client:
            assert client.post(f"/v1/users/{user}/feedback", json={"pairs": [pair(3)]}).status_code == 403
        assert http.delete(f"/admin/users/{user}").status_code == 204
        assert http.get(f"/admin/users/{user}").status_code == 404
        restored = http.post("/admin/users/import", json=exported)
        assert restored.status_code == 201 and restored.json()["profile"]["n_pairs"] == 2
        assert http.get(f"/admin/users/{user}/export").json()["feedback"] == exported["feedback"]
    with db.connect() as conn:
        actions = conn.execute(sa.text("SELECT action FROM audit_log WHERE target = :u ORDER BY id"),
                               {"u": user}).scalars().all()
    assert actions == ["user.create", "user.export", "profile.reset", "user.disable", "user.delete",
                       "user.import", "user.export"]


def test_activating_another_head_set_switches_scoring_live(service, tmp_path):
    set_profile(service, "carol", np.ones(service.heads.num_heads))  # over version 1
    other = random_head_set(service.heads.dim, 4, "2", seed=1)
    with service.client(service.keys.admin) as http:
        registered = http.post("/admin/head-sets", json={"uri": str(other.save(tmp_path / "v2")), "activate": True})
        assert registered.status_code == 201 and registered.json()["active"]
        try:
            with service.client(service.keys.client) as client:
                body = wait_for(lambda: (r := client.post("/v1/score", json={
                    "user_id": "carol", "prompt": "p", "responses": ["r"], "explain": True}).json())
                    ["head_set"] == "default@2" and r)
            assert body and len(body["scores"][0]["explanation"]) == 4
            assert body["profile"]["reason"] == "no_profile"  # carol's only profile is over version 1
        finally:
            assert http.post("/admin/head-sets/default/1/activate").status_code == 200
            with service.client(service.keys.client) as client:  # every replica back on version 1
                assert wait_for(lambda: all(client.post("/v1/score", json={"prompt": "p", "responses": ["r"]}).json()
                                            ["head_set"] == "default@1" for _ in range(8)))
                rolled_back = client.post("/v1/score", json={"user_id": "carol", "prompt": "p", "responses": ["r"]})
                assert rolled_back.json()["profile"]["source"] == "user"  # her version-1 profile is back
        assert http.post("/admin/head-sets", json={"uri": str(tmp_path / "nowhere")}).status_code == 422
        broken = other.save(tmp_path / "broken")  # a hand-edited headset.json: 422 naming the uri, not a 500
        saved = json.loads((broken / "headset.json").read_text())
        for meta in ("[1]", json.dumps({k: v for k, v in saved.items() if k != "head_names"})):
            (broken / "headset.json").write_text(meta)
            refused = http.post("/admin/head-sets", json={"uri": str(broken)})
            assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "uri"]
            assert "not a valid head set" in refused.json()["detail"][0]["msg"]
        edited = other.save(tmp_path / "edited")  # tensors changed after saving: refused when registered
        tensors = next(edited.glob("heads*.safetensors"))
        save_file({**load_file(tensors), "bias": np.ones(4, dtype=np.float32)}, tensors)
        refused = http.post("/admin/head-sets", json={"uri": str(edited)})
        assert refused.status_code == 422 and "content hash mismatch" in refused.json()["detail"][0]["msg"]


def long_pairs(n: int) -> list:
    """Pairs whose texts are many times the feature specs' 16 tokens, differing at both ends."""
    from rewardprism.data import PreferencePair

    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly brew tea".split()
    rng = np.random.default_rng(7)
    text = lambda: " ".join(rng.choice(words, 120))  # noqa: E731
    return [PreferencePair(f"question {i}", text(), text(), group="g") for i in range(n)]


def serve_scores(service, heads: HeadSet, folder: Path, pairs) -> tuple[np.ndarray, np.ndarray]:
    """Activate `heads` (saved in `folder`), score each pair's chosen and rejected text with the default profile
    over HTTP, then go back to version 1; (n,) chosen and (n,) rejected scores."""
    with service.client(service.keys.admin) as http:
        registered = http.post("/admin/head-sets", json={"uri": str(heads.save(folder)), "activate": True})
        assert registered.status_code == 201, registered.text
        label = f"default@{heads.version}"
        try:
            with service.client(service.keys.client) as client:
                assert wait_for(lambda: all(client.post("/v1/score", json={"prompt": "p", "responses": ["r"]}).json()
                                            ["head_set"] == label for _ in range(8)))
                bodies = [client.post("/v1/score", json={"prompt": p.prompt, "responses": [p.chosen, p.rejected]})
                          for p in pairs]
        finally:
            assert http.post("/admin/head-sets/default/1/activate").status_code == 200
            with service.client(service.keys.client) as client:
                assert wait_for(lambda: all(client.post("/v1/score", json={"prompt": "p", "responses": ["r"]}).json()
                                            ["head_set"] == "default@1" for _ in range(8)))
    assert all(b.status_code == 200 for b in bodies), bodies[0].text
    scores = [b.json()["scores"] for b in bodies]
    assert all(s["truncated"] for row in scores for s in row)
    return np.array([row[0]["score"] for row in scores]), np.array([row[1]["score"] for row in scores])


def test_served_scores_are_the_scores_of_the_features_a_drm_head_set_was_fitted_on(service, tmp_path):
    """A DRM head set fitted on 16-token embeddings: the service cuts long texts as `embed` did (not at any
    length of its own), so its scores equal the offline ones from the embedding folder (1e-5)."""
    from rewardprism.calibrate import fit_head_set
    from rewardprism.drm import PreferenceDecomposition
    from rewardprism.embed import EmbeddingSet, embed_pairs

    pairs = long_pairs(12)
    embed_pairs(pairs, load_backbone("tiny-bert", device="cpu", max_length=16), tmp_path / "emb", progress=False)
    embedded = EmbeddingSet(tmp_path / "emb")
    chosen, rejected = embedded.load()
    heads = fit_head_set(PreferenceDecomposition(3).fit(chosen, rejected), chosen, rejected, embedded.pairs(),
                         calibrate=False, features=embedded.features, name="default", version="drm-16")
    served_chosen, served_rejected = serve_scores(service, heads, tmp_path / "heads", pairs)
    offline_chosen, offline_rejected = (heads.scores(f) @ heads.default_weights for f in (chosen, rejected))
    np.testing.assert_allclose(served_chosen, offline_chosen, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(served_rejected, offline_rejected, rtol=1e-5, atol=1e-5)
    # the check can fail: the service's former cut (its own 48 tokens) gives other scores
    other = load_backbone("tiny-bert", device="cpu", max_length=MAX_TOKENS)
    assert np.abs(expected_head_scores(other, heads, pairs[0].prompt, [pairs[0].chosen])[0] @ heads.default_weights
                  - offline_chosen[0]) > 1e-3


def test_served_scores_are_the_scores_of_a_vrm_head_set_s_own_model(service, tmp_path):
    """A VRM exported with max_length 16 keeps the end of a long text: served scores equal the model's own
    objective scores at the population profile, computed offline from its folder (1e-5)."""
    import torch
    from rewardprism.data import render
    from rewardprism.embed import EmbeddingExtractor
    from rewardprism.vrm import RewardModel, RewardModelConfig

    torch.manual_seed(0)
    config = RewardModelConfig(kind="vrm", backbone="tiny-bert", max_length=16, num_objectives=3, latent_dim=4)
    folder = RewardModel(config, load_backbone("tiny-bert", device="cpu", max_length=16)).save_pretrained(
        tmp_path / "model")
    heads = RewardModel.from_pretrained(folder, device="cpu").to_head_set(str(folder), version="vrm-16")
    assert heads.feature_spec().truncation_side == "left" and heads.feature_spec().max_length == 16
    pairs = long_pairs(8)
    served_chosen, served_rejected = serve_scores(service, heads, tmp_path / "heads", pairs)
    model = RewardModel.from_pretrained(folder, device="cpu")
    extractor, tok = EmbeddingExtractor(model.backbone), model.backbone.tokenizer
    for served, side in ((served_chosen, "chosen"), (served_rejected, "rejected")):
        features, _ = extractor.embed_texts([render(p.prompt, getattr(p, side), tok) for p in pairs])
        with torch.no_grad():
            offline = model.objective_scores(torch.from_numpy(features)).numpy() @ heads.default_weights
        np.testing.assert_allclose(served, offline, rtol=1e-5, atol=1e-5)


def test_health_and_prometheus_metrics(service, ray_cluster):
    with service.client() as http:  # no key needed
        health = http.get("/healthz").json()
    assert (health["status"], health["database"], health["head_set"]) == ("ok", "ok", "default@1")
    port = ray_cluster._private.worker.global_worker.node.metrics_export_port

    def exported() -> str:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return ""
        names = ("rewardprism_responses_scored", "rewardprism_profile_cache_lookups",
                 "rewardprism_adaptation_seconds", "serve_num_http_requests")
        return text if all(n in text for n in names) else ""
    assert wait_for(exported, timeout=60, interval=2), "metrics missing from the Prometheus endpoint"


# ---------------------------------------------------------------------------------------------- faults


def set_connections(admin_engine, database: str, allowed: bool) -> None:
    with admin_engine.connect() as conn:
        conn.execute(sa.text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {str(allowed).lower()}'))
        if not allowed:
            conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
                         {"d": database})


def test_database_unreachable_scoring_goes_on_feedback_503_then_recovers(service, admin_engine, db):
    user = f"outage-{uuid.uuid4().hex[:6]}"
    set_profile(service, user, np.full(service.heads.num_heads, 0.5))
    request = {"user_id": user, "prompt": "p", "responses": ["r"]}
    with service.client(service.keys.client) as http:
        for _ in range(20):  # warm both ingress replicas: keys verified, profile cached
            assert http.post("/v1/score", json=request).json()["profile"]["source"] == "user"
        set_connections(admin_engine, service.name, False)
        try:
            during = [http.post("/v1/score", json=request) for _ in range(10)]
            assert all(r.status_code == 200 for r in during), [r.text for r in during]
            assert all(r.json()["profile"]["version"] == 1 and r.json()["profile"]["stale"] for r in during)
            stranger = http.post("/v1/score", json={**request, "user_id": "never-seen"}).json()
            assert stranger["profile"]["reason"] == "database_unavailable"
            for i in range(4):
                refused = http.post(f"/v1/users/{user}/feedback", json={"pairs": [pair(i, "outage")]})
                assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            health = http.get("/healthz").json()
            assert (health["status"], health["database"]) == ("degraded", "unreachable")
        finally:
            set_connections(admin_engine, service.name, True)
        recovered = wait_for(lambda: http.post(f"/v1/users/{user}/feedback", json={
            "pairs": [pair(9, "after")]}).status_code == 200, timeout=20)
        assert recovered, "feedback did not recover once the database was back"
        assert wait_for(lambda: http.get("/healthz").json()["status"] == "ok")
    with db.connect() as conn:
        stored = conn.execute(sa.text("SELECT f.chosen FROM feedback f JOIN users u ON u.id = f.user_id "
                                      "WHERE u.external_id = :u"), {"u": user}).scalars().all()
        n_pairs = conn.execute(sa.text("SELECT n_pairs FROM profiles p JOIN users u ON u.id = p.user_id "
                                       "WHERE u.external_id = :u"), {"u": user}).scalar_one()
    assert stored == [pair(9, "after")["chosen"]] and n_pairs == 1  # nothing half-written during the outage


def test_replica_killed_under_load_recovers_and_loses_no_feedback(service, db):
    import ray

    stop, acked, errors, slowest = threading.Event(), [], [], [0.0]
    user = f"load-{uuid.uuid4().hex[:6]}"
    lock = threading.Lock()

    def client(worker: int) -> None:
        """Send requests until told to stop; retry a failed one (5xx or a dropped connection) until it succeeds."""
        with service.client(service.keys.client) as http:
            i = 0
            while not stop.is_set():
                i += 1
                feedback = i % 4 == 0
                path, body = ((f"/v1/users/{user}/feedback", {"pairs": [pair(i, f"w{worker}")]}) if feedback
                              else ("/v1/score", {"user_id": user, "prompt": "p", "responses": ["a", "b"]}))
                started = time.monotonic()
                while True:
                    try:
                        response = http.post(path, json=body)
                        if response.status_code < 500:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() - started > 60:
                        errors.append(path)
                        return
                    time.sleep(0.2)
                with lock:
                    slowest[0] = max(slowest[0], time.monotonic() - started)
                    if response.status_code != 200:
                        errors.append(response.text)
                    elif feedback:
                        acked.append(body["pairs"][0]["chosen"])

    def replicas() -> list[dict]:
        return [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::rp#")]

    threads = [threading.Thread(target=client, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    time.sleep(3)
    killed = [next(a for a in replicas() if f"#{deployment}#" in a["name"]) for deployment in ("Embedder", "Ingress")]
    for victim in killed:
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]))
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join(timeout=90)
    assert not errors, errors[:3]
    assert acked and slowest[0] < 30, f"a request needed {slowest[0]:.1f}s to get through"
    with db.connect() as conn:
        stored = set(conn.execute(sa.text("SELECT f.chosen FROM feedback f JOIN users u ON u.id = f.user_id "
                                          "WHERE u.external_id = :u"), {"u": user}).scalars())
    assert set(acked) <= stored  # every acknowledged pair is in the database
    now = {a["name"] for a in wait_for(lambda: len(replicas()) == 4 and replicas(), timeout=60) or []}
    assert len(now) == 4 and not now & {v["name"] for v in killed}  # Serve replaced both


# ---------------------------------------------------------------------------------------------- fuzzing, SQLite


def test_openapi_fuzz_finds_no_server_errors(service):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json")
    failures: list[str] = []
    statuses: dict[int, int] = {}
    succeeded: set[str] = set()  # operations that answered 2xx
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        @given(case=schema.as_strategy(generation_mode=mode))
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:
            response = case.call(headers={"X-API-Key": service.keys.admin}, timeout=60)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code < 300:
                succeeded.add(f"{case.method} {case.operation.path}")
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} {case.body!r:.200} -> "
                                f"{response.status_code} {response.text[:200]}")
        fuzz()
    assert not failures, "\n".join(failures[:5])
    # not a vacuous run: requests got through to the service, and invalid ones were refused as such
    assert len(succeeded) >= 5 and statuses.get(422, 0) >= 20, (succeeded, statuses)


def test_sqlite_database_end_to_end(service, tmp_path):
    """The embedded default: the same app on a SQLite file, alongside the Postgres one."""
    from ray import serve

    url = f"sqlite:///{tmp_path / 'rp.db'}"
    upgrade(url)
    engine = store.make_engine(store.StoreSettings.from_env(url))
    heads = service.heads
    with store.make_sessions(engine).begin() as session:
        store.register_head_set(session, heads, uri=str(service.heads_dir), activate=True)
        _, key = store.create_api_key(session, ["score", "feedback"])
    engine.dispose()
    main = app_config("rp", "/", service.database, 2)
    local.run_config(service.port, main, app_config("rp-sqlite", "/sqlite", url, 1))
    try:
        with httpx.Client(base_url=f"{service.url}/sqlite", headers={"X-API-Key": key}, timeout=60) as http:
            fed = http.post("/v1/users/sam/feedback", json={"pairs": [pair(1), pair(2)]})
            assert fed.status_code == 200, fed.text
            scored = http.post("/v1/score", json={"user_id": "sam", "prompt": "p", "responses": ["r"]}).json()
            assert scored["profile"]["version"] == fed.json()["profile"]["version"] == 1
            assert http.get("/v1/users/sam/profile").json()["n_pairs"] == 2
    finally:
        local.run_config(service.port, main)
    assert "rp-sqlite" not in serve.status().applications
