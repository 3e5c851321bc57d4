"""What an adversarial review broke in auth and writes (issue 16, items 1, 4 and 6), over real HTTP on Postgres.

Two Ingress replicas whose roles the tests choose: the module's Serve app (`test_serve.service`, 2 replicas
behind Serve's proxy) and a second Ingress of the same code (`create_api` over `ScoringService`) under uvicorn
in this process, on the same database, embedding with the same tiny backbone. A key that replica B has
cached must stop working there the moment the Serve app commits a delete, disable or revoke; idempotent
answers stored through one are replayed by the other. The hash-scheme cases run on the store alone.
"""
from __future__ import annotations

import asyncio
import hashlib
import secrets
import threading
import uuid
from collections.abc import Iterator

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from rewardprism import store
from rewardprism.scoring import BatchScorer, ScoredJob, ScoreJob
from rewardprism.store.migrate import upgrade
from test_serve import Service, admin_engine, backbone, db, free_port, pair, service  # noqa: F401 (fixtures)

from serve_apps.api import create_api
from serve_apps.service import HeadSetRef, ScoringService
from serve_apps.settings import ServeSettings


class NoMetrics:
    def scored(self, responses: int, personalized: bool) -> None: ...

    def cache(self, result: str) -> None: ...

    def adapted(self, seconds: float, pairs: int) -> None: ...


@pytest.fixture(scope="module")
def replica_b(service: Service, backbone) -> Iterator[str]:  # noqa: F811 (fixtures)
    """The URL of a second Ingress on the service's database, with the default 30 s key cache."""
    scorer = BatchScorer(backbone)

    async def embed(_: HeadSetRef, job: ScoreJob) -> ScoredJob:
        return scorer.score(service.heads, [job])[0]

    settings = ServeSettings(database_url=service.database, head_set=service.heads.name)
    scoring = ScoringService(settings, embed, NoMetrics())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_api(scoring), host="127.0.0.1", port=port, log_level="warning"))

    async def run() -> None:
        await scoring.start()
        try:
            await server.serve()
        finally:
            await scoring.close()
    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        for _ in range(300):
            try:
                if http.get("/healthz").json()["status"] == "ok":
                    break
            except httpx.TransportError:
                pass
            threading.Event().wait(0.1)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def on(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=60)


def new_user_with_key(service: Service, scopes: list[str]) -> tuple[str, str]:  # noqa: F811
    """A new user and a key bound to them, through the Serve app."""
    user = f"adv-{uuid.uuid4().hex[:8]}"
    with service.client(service.keys.admin) as admin:
        assert admin.post("/admin/users", json={"external_id": user}).status_code == 201
        created = admin.post("/admin/keys", json={"scopes": scopes, "user_id": user})
    assert created.status_code == 201, created.text
    return user, created.json()["token"]


def user_exists(db: sa.Engine, user: str) -> bool:  # noqa: F811
    with db.connect() as conn:
        return conn.scalar(sa.select(sa.func.count()).select_from(store.User)
                           .where(store.User.external_id == user)) == 1


SCORE = {"prompt": "p", "responses": ["r"]}


# ---------------------------------------------------------------------------------------------- item 1


def test_a_deleted_user_stays_deleted_on_every_replica(service, replica_b, db):  # noqa: F811
    user, token = new_user_with_key(service, ["score", "feedback"])
    with on(replica_b, token) as b:  # B caches the key
        assert b.post("/v1/score", json=SCORE).status_code == 200
        with service.client(service.keys.admin) as admin:
            assert admin.delete(f"/admin/users/{user}").status_code == 204
        assert b.post("/v1/score", json=SCORE).status_code == 401
        assert b.post(f"/v1/users/{user}/feedback", json={"pairs": [pair(0, user)]}).status_code == 401
    with on(replica_b, service.keys.client) as b:  # an unbound key with the feedback scope cannot recreate them
        gone = b.post(f"/v1/users/{user}/feedback", json={"pairs": [pair(1, user)]})
    assert gone.status_code == 410 and "deleted" in gone.json()["detail"], gone.text
    with service.client(service.keys.client) as a:
        assert a.post(f"/v1/users/{user}/feedback", json={"pairs": [pair(2, user)]}).status_code == 410
    assert not user_exists(db, user)
    with service.client(service.keys.admin) as admin:  # an admin may bring the id back on purpose
        assert admin.post("/admin/users", json={"external_id": user}).status_code == 201
    with on(replica_b, service.keys.client) as b:
        assert b.post(f"/v1/users/{user}/feedback", json={"pairs": [pair(3, user)]}).status_code == 200


@pytest.mark.parametrize("how", ["revoke", "disable"])
def test_a_revoked_key_or_disabled_user_is_refused_at_once_on_the_other_replica(service, replica_b, how):  # noqa: F811
    user, token = new_user_with_key(service, ["score", "feedback"])
    with on(replica_b, token) as b:
        assert b.post("/v1/score", json=SCORE).status_code == 200
        with service.client(service.keys.admin) as admin:
            if how == "revoke":
                prefix = token.split("_")[1]
                assert admin.delete(f"/admin/keys/{prefix}").status_code == 200
            else:
                assert admin.patch(f"/admin/users/{user}", json={"disabled": True}).status_code == 200
        assert b.post("/v1/score", json=SCORE).status_code == 401
        assert b.post(f"/v1/users/{user}/feedback", json={"pairs": [pair(0, user)]}).status_code == 401


def test_a_key_revoked_by_the_cli_stops_at_once(service, replica_b):  # noqa: F811
    """`rewardprism keys revoke` says the key "stops working at once": the store's revoke alone does it."""
    _, token = new_user_with_key(service, ["score"])
    with on(replica_b, token) as b:
        assert b.post("/v1/score", json=SCORE).status_code == 200
        engine = store.make_engine(store.StoreSettings.from_env(service.database))
        with store.make_sessions(engine).begin() as session:
            store.revoke_api_key(session, token.split("_")[1])
        engine.dispose()
        assert b.post("/v1/score", json=SCORE).status_code == 401


def test_a_write_rechecks_its_key_in_its_own_transaction(service, replica_b, db):  # noqa: F811
    """Belt and braces: even with the epoch not (yet) seen to move, a write never commits under a key that is no
    longer valid — here revoked behind the store's back, so only the in-transaction check can catch it."""
    user, token = new_user_with_key(service, ["score", "feedback"])
    with on(replica_b, token) as b:
        assert b.post("/v1/score", json=SCORE).status_code == 200
        with db.begin() as conn:
            conn.execute(sa.update(store.ApiKey).where(store.ApiKey.prefix == token.split("_")[1])
                         .values(revoked_at=sa.func.now()))
        assert b.post("/v1/score", json=SCORE).status_code == 200  # reads trust the cache until the epoch moves
        refused = b.post(f"/v1/users/{user}/feedback", json={"pairs": [pair(0, user)]})
    assert refused.status_code == 401, refused.text
    assert count_feedback(db, user) == 0


# ---------------------------------------------------------------------------------------------- item 6


def count_feedback(db: sa.Engine, user: str) -> int:  # noqa: F811
    with db.connect() as conn:
        return conn.scalar(sa.select(sa.func.count()).select_from(store.Feedback).join(store.User)
                           .where(store.User.external_id == user))


def test_a_retried_feedback_is_stored_once_whichever_replica_gets_the_retry(service, replica_b, db):  # noqa: F811
    user, body = f"idem-{uuid.uuid4().hex[:8]}", {"pairs": [pair(0, "idem"), pair(1, "idem")]}
    retry = {"Idempotency-Key": uuid.uuid4().hex}
    with service.client(service.keys.client) as a, on(replica_b, service.keys.client) as b:
        first = a.post(f"/v1/users/{user}/feedback", json=body, headers=retry)
        assert first.status_code == 200 and "Idempotent-Replayed" not in first.headers, first.text
        again = b.post(f"/v1/users/{user}/feedback", json=body, headers=retry)
        assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true", again.text
        assert again.json() == first.json()
        assert count_feedback(db, user) == 2
        other = b.post(f"/v1/users/{user}/feedback", json={"pairs": [pair(2, "idem")]}, headers=retry)
        assert other.status_code == 422 and "Idempotency-Key" in str(other.json()["detail"]), other.text
        fresh = b.post(f"/v1/users/{user}/feedback", json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
        assert fresh.status_code == 200 and count_feedback(db, user) == 4


def test_retried_admin_writes_replay_their_first_answer(service, replica_b):  # noqa: F811
    user = f"idem-admin-{uuid.uuid4().hex[:8]}"
    create, delete = {"Idempotency-Key": f"create-{user}"}, {"Idempotency-Key": f"delete-{user}"}
    with service.client(service.keys.admin) as a, on(replica_b, service.keys.admin) as b:
        created = a.post("/admin/users", json={"external_id": user}, headers=create)
        assert created.status_code == 201
        replayed = b.post("/admin/users", json={"external_id": user}, headers=create)
        assert (replayed.status_code, replayed.json()) == (201, created.json())  # not 409: the same request
        assert replayed.headers["Idempotent-Replayed"] == "true"
        assert a.delete(f"/admin/users/{user}", headers=delete).status_code == 204
        gone = b.delete(f"/admin/users/{user}", headers=delete)
        assert gone.status_code == 204 and gone.headers["Idempotent-Replayed"] == "true"  # not 404
        assert b.delete(f"/admin/users/{user}").status_code == 404
        mismatch = b.post("/admin/users", json={"external_id": user + "x"}, headers=create)
        assert mismatch.status_code == 422 and "Idempotency-Key" in str(mismatch.json()["detail"])


def test_expired_idempotent_answers_are_forgotten(tmp_path):
    url = f"sqlite:///{tmp_path / 'idem.db'}"
    upgrade(url)
    engine = store.make_engine(store.StoreSettings.from_env(url))
    sessions = store.make_sessions(engine)
    request = store.IdempotentRequest("key", "k1", "f" * 64, 200, ttl_s=3600)
    with sessions.begin() as session:
        store.idempotency.remember(session, request, {"ok": True})
    with sessions.begin() as session:
        assert store.idempotency.replay(session, request).body == {"ok": True}
        assert store.idempotency.forget_expired(session, ttl_s=3600) == 0
        session.execute(sa.update(store.IdempotentAnswer).values(created_at=sa.func.datetime("now", "-2 hours")))
    with sessions.begin() as session:
        assert store.idempotency.replay(session, request) is None  # expired: as if never sent
        store.idempotency.remember(session, request, {"ok": False})
    with sessions.begin() as session:
        session.execute(sa.update(store.IdempotentAnswer).values(created_at=sa.func.datetime("now", "-2 hours")))
        assert store.idempotency.forget_expired(session, ttl_s=3600) == 1
    engine.dispose()


# ---------------------------------------------------------------------------------------------- item 4


@pytest.fixture
def sessions(tmp_path):
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    upgrade(url)
    engine = store.make_engine(store.StoreSettings.from_env(url))
    yield store.make_sessions(engine)
    engine.dispose()


def test_new_keys_use_a_fast_hash_so_a_wrong_secret_costs_what_an_unknown_prefix_costs(sessions):
    """scrypt made each wrong secret on a public prefix cost ~100 ms of CPU (a DoS, and an oracle for which
    prefixes exist); new keys are one salted SHA-256 (the timing ratio itself is in bench/bench_auth.py)."""
    with sessions.begin() as session:
        key, token = store.create_api_key(session, ["score"])
        assert key.hash_scheme == store.HASH_SCHEME == "sha256"
        secret = token.split("_", 2)[2]
        assert key.key_hash == hashlib.sha256(key.salt + secret.encode()).digest()
        assert store.verify_api_key(session, token).prefix == key.prefix
        for wrong in (token[:-1] + ("A" if token[-1] != "A" else "B"), f"rp_{secrets.token_hex(4)}_{secret}"):
            with pytest.raises(store.InvalidApiKey, match="invalid or revoked"):
                store.verify_api_key(session, wrong)


def test_keys_hashed_with_scrypt_still_verify_and_are_rehashed_on_use(sessions):
    salt, secret = secrets.token_bytes(16), secrets.token_urlsafe(32)
    with sessions.begin() as session:
        session.add(store.ApiKey(prefix="5c5c5c5c", salt=salt, scopes=["score"], hash_scheme="scrypt",
                                 key_hash=hashlib.scrypt(secret.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)))
    token = f"rp_5c5c5c5c_{secret}"
    with sessions.begin() as session:
        assert store.verify_api_key(session, token).hash_scheme == "scrypt"
        with pytest.raises(store.InvalidApiKey):
            store.verify_api_key(session, token + "x")
        store.upgrade_api_key_hash(session, token)
    with sessions.begin() as session:
        assert store.verify_api_key(session, token).hash_scheme == "sha256"


def test_guesses_at_a_scrypt_key_cost_a_bounded_number_of_hashes(sessions, monkeypatch):
    """A key made before 0002 and never used since still hashes with scrypt: 50 wrong secrets at once cost the
    budget's burst of hashes, not 50; once the budget refills, its owner's secret works."""
    from rewardprism.store import keys

    salt, secret = secrets.token_bytes(16), secrets.token_urlsafe(32)
    with sessions.begin() as session:
        session.add(store.ApiKey(prefix="5d5d5d5d", salt=salt, scopes=["score"], hash_scheme="scrypt",
                                 key_hash=hashlib.scrypt(secret.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)))
    now = [0.0]
    monkeypatch.setattr(keys, "LEGACY_HASHES", keys.LegacyHashBudget(burst=3, per_s=1, clock=lambda: now[0]))
    hashed = []
    scrypt = hashlib.scrypt
    monkeypatch.setattr(hashlib, "scrypt", lambda *a, **k: hashed.append(1) or scrypt(*a, **k))
    with sessions.begin() as session:
        for _ in range(50):
            with pytest.raises(store.InvalidApiKey, match="invalid or revoked"):
                store.verify_api_key(session, f"rp_5d5d5d5d_{secrets.token_urlsafe(32)}")
        assert len(hashed) == 3
        now[0] = 1.0  # a second later: one more attempt may hash
        assert store.verify_api_key(session, f"rp_5d5d5d5d_{secret}").hash_scheme == "scrypt"


def test_delete_disable_and_revoke_move_the_auth_epoch_and_a_deleted_user_is_not_recreated(sessions):
    with sessions.begin() as session:
        epochs = [store.auth_epoch(session)]
        store.create_user(session, "gone")
        key, _ = store.create_api_key(session, ["score"])
        for change in (lambda: store.set_user_disabled(session, "gone", True),
                       lambda: store.revoke_api_key(session, key.prefix),
                       lambda: store.delete_user(session, "gone")):
            change()
            epochs.append(store.auth_epoch(session))
        assert epochs == [0, 1, 2, 3]
        with pytest.raises(store.UserDeleted, match="deleted"):
            store.get_or_create_user(session, "gone")
        store.create_user(session, "gone")  # explicit: allowed, and the tombstone goes
        assert not store.was_deleted(session, "gone")
