"""What an adversarial review of the service broke (issue 16), each case over real HTTP against a real Postgres.

The service runs in-process (`ScoringService` behind its FastAPI app on uvicorn, the tiny backbone scoring in a
thread instead of a Serve Embedder), against a Postgres cluster of this module's own (`pg_createcluster` on
another port), so a test can freeze the whole server with SIGSTOP — a database that hangs, not one that is
down — and let it go again. The cluster is dropped at the end; the shared server is never touched.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from head_sets_for_tests import random_head_set
from rewardprism import store
from rewardprism.backbone import load_backbone
from rewardprism.heads import HeadSet
from rewardprism.scoring import BatchScorer
from rewardprism.store.migrate import upgrade

from serve_apps import local

CLUSTER, PORT = "rpadversarial", 5499
ADMIN_KEY = "a" * 16 + os.urandom(16).hex()  # the bootstrap admin key: it cannot be revoked by a fuzzer
CALL_DEADLINE_S = 2.0  # the service's db_call_timeout_s here
FUZZ_EXAMPLES = int(os.environ.get("RP_FUZZ_EXAMPLES", "25"))


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster() -> Iterator[local.PostgresCluster]:
    if shutil.which("pg_createcluster") is None or os.geteuid() != 0:
        pytest.skip("needs root and postgresql-common (pg_createcluster) for a Postgres cluster of its own")
    with local.postgres_cluster(CLUSTER, PORT) as cluster:
        upgrade(cluster.url)
        yield cluster


class NoMetrics:
    def scored(self, responses: int, personalized: bool) -> None: ...

    def cache(self, result: str) -> None: ...

    def adapted(self, seconds: float, pairs: int) -> None: ...


@dataclass
class Service:
    url: str
    heads: HeadSet
    client_key: str

    def http(self, key: str | None = ADMIN_KEY, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": key} if key else {}, timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def service(cluster, tmp_path_factory) -> Iterator[Service]:
    import uvicorn

    from serve_apps.api import create_api
    from serve_apps.service import ScoringService
    from serve_apps.settings import ServeSettings

    backbone = load_backbone("tiny-bert", device="cpu", max_length=48)
    heads = random_head_set(backbone.dim, 4, "1", seed=0)
    heads.info["hyperprior_center"] = 3.0
    heads_dir = heads.save(tmp_path_factory.mktemp("heads") / "v1")
    engine = store.make_engine(store.StoreSettings.from_env(cluster.url))
    with store.make_sessions(engine).begin() as session:
        store.register_head_set(session, heads, uri=str(heads_dir), activate=True)
        _, client_key = store.create_api_key(session, ["score", "feedback"])
    engine.dispose()
    scorer = BatchScorer(backbone)

    async def embed(ref, job):
        return (await asyncio.to_thread(scorer.score, heads, [job]))[0]

    settings = ServeSettings(database_url=cluster.url, admin_key=ADMIN_KEY, db_timeout_s=1,
                             db_call_timeout_s=CALL_DEADLINE_S)
    port, running = free_port(), {}

    def run() -> None:
        async def main() -> None:
            scoring = ScoringService(settings, embed, NoMetrics())
            await scoring.start()
            server = uvicorn.Server(uvicorn.Config(create_api(scoring), host="127.0.0.1", port=port,
                                                   log_level="warning"))
            running["server"] = server
            try:
                await server.serve()
            finally:
                await scoring.close()
        asyncio.run(main())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (running.get("server") and running["server"].started):
        assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
        time.sleep(0.1)
    yield Service(f"http://127.0.0.1:{port}", heads, client_key)
    running["server"].should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def db(cluster) -> Iterator[sa.Engine]:
    engine = sa.create_engine(cluster.url, pool_pre_ping=True)
    yield engine
    engine.dispose()


def count(db: sa.Engine, sql: str, **params) -> int:
    with db.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar_one()


def nested(levels: int) -> dict:
    document: dict = {}
    for _ in range(levels - 1):
        document = {"a": document}
    return document


def pair(i: int) -> dict:
    return {"prompt": f"question {i}", "chosen": f"a careful answer {i}", "rejected": f"rude {i}"}


# ---------------------------------------------------------------------------------------------- deep JSON


def test_deep_metadata_is_a_422_naming_the_field_and_writes_nothing(service, db):
    with service.http() as http:
        for _ in range(2):  # a retry is refused the same way, not with 409: the first wrote nothing
            refused = http.post("/admin/users", json={"external_id": "deep", "metadata": nested(400)})
            assert refused.status_code == 422, refused.text
            assert refused.json()["detail"][0]["loc"][:2] == ["body", "metadata"]
        assert http.get("/admin/users", params={"limit": 1000}).status_code == 200
        assert http.get("/admin/users/deep").status_code == 404
    assert count(db, "SELECT count(*) FROM users WHERE external_id = 'deep'") == 0
    assert count(db, "SELECT count(*) FROM audit_log WHERE target = 'deep'") == 0


def test_a_too_deep_document_stored_by_an_older_version_still_reads_back(service, db):
    with service.http() as http:
        assert http.post("/admin/users", json={"external_id": "old-deep"}).status_code == 201
        with db.begin() as conn:  # as an older version, without the depth check, stored it
            conn.execute(sa.text("UPDATE users SET metadata = CAST(:m AS json) WHERE external_id = 'old-deep'"),
                         {"m": json.dumps(nested(400))})
        listed = http.get("/admin/users", params={"search": "old-deep"})
        got = http.get("/admin/users/old-deep")
        exported = http.get("/admin/users/old-deep/export")
    assert listed.status_code == got.status_code == exported.status_code == 200, (listed.text, got.text)
    assert got.json()["metadata"] == {} and "deeper" in got.json()["metadata_error"]
    assert exported.json()["metadata"] == {} and "deeper" in exported.json()["metadata_error"]


def test_audit_details_and_imports_are_checked_for_depth_too(service, db):
    export = {"format": "rewardprism.user/1", "external_id": "deep-import", "display_name": None,
              "metadata": nested(200), "disabled": False, "created_at": "2026-01-01T00:00:00+00:00",
              "profile": None, "feedback": []}
    with service.http() as http:
        refused = http.post("/admin/users/import", json=export)
    assert refused.status_code == 422 and "nests deeper" in refused.text, refused.text
    assert count(db, "SELECT count(*) FROM users WHERE external_id = 'deep-import'") == 0
    with pytest.raises(store.InvalidInput, match="audit details nests deeper"):
        store.record_audit(None, "me", "act", "target", nested(100))  # refused before the session is used


# ---------------------------------------------------------------------------------------------- export/import


def test_export_then_import_round_trips_a_history_over_the_per_call_limit(service, cluster, db):
    user, pairs = "long-history", store.Limits().max_pairs_per_call + 1
    engine = store.make_engine(store.StoreSettings.from_env(cluster.url))
    with store.make_sessions(engine).begin() as session:
        created = store.create_user(session, user)
        session.add_all(store.Feedback(user_id=created.id, prompt=f"q{i}", chosen="c", rejected="r", source="api")
                        for i in range(pairs))
    engine.dispose()
    with service.http() as http:
        export = http.get(f"/admin/users/{user}/export").json()
        assert len(export["feedback"]) == pairs
        assert http.delete(f"/admin/users/{user}").status_code == 204
        broken = json.loads(json.dumps(export))
        broken["feedback"][pairs - 1]["chosen"] = 7  # the last batch fails: the first ones must not stay
        refused = http.post("/admin/users/import", json=broken)
        assert refused.status_code == 422 and f"feedback[{pairs - 1}]" in refused.text, refused.text
        assert count(db, "SELECT count(*) FROM users WHERE external_id = :u", u=user) == 0
        imported = http.post("/admin/users/import", json=export)
        assert imported.status_code == 201, imported.text
        assert http.get(f"/admin/users/{user}/export").json()["feedback"] == export["feedback"]


def test_import_bounds_weights_as_the_api_does(service, db):
    with service.http() as http:
        assert http.post("/admin/users", json={"external_id": "huge"}).status_code == 201
        assert http.put("/admin/users/huge/profile", json={"weights": [1e308] * 4}).status_code == 422
        assert http.put("/admin/users/huge/profile", json={"weights": [0.5] * 4}).status_code == 200
        export = http.get("/admin/users/huge/export").json()
        assert http.delete("/admin/users/huge").status_code == 204
        for field, value in (("weights", [1e308, 0, 0, 0]), ("weights", [0, 0, 0, -1.5e6]), ("bias", 1e7)):
            refused = http.post("/admin/users/import", json={**export, "profile": {**export["profile"],
                                                                                   field: value}})
            assert refused.status_code == 422 and "1e+06" in refused.text, (field, refused.text)
    assert count(db, "SELECT count(*) FROM users WHERE external_id = 'huge'") == 0


# ---------------------------------------------------------------------------------------------- request parsing


def test_booleans_are_strict(service):
    score = {"prompt": "p", "responses": ["r"]}
    with service.http() as http:
        assert http.post("/admin/users", json={"external_id": "flags"}).status_code == 201
        for body, path, method in (({**score, "explain": "yes"}, "/v1/score", "POST"),
                                   ({**score, "explain": 1}, "/v1/score", "POST"),
                                   ({"disabled": "true"}, "/admin/users/flags", "PATCH")):
            refused = http.request(method, path, json=body)
            assert refused.status_code == 422, (body, refused.text)
        assert http.get("/admin/users/flags").json()["disabled"] is False


def test_invalid_utf8_and_absurd_nesting_are_422(service):
    headers = {"Content-Type": "application/json"}
    with service.http() as http:
        for body in (b'{"prompt": "\xff\xfe", "responses": ["r"]}', b"[" * 50_000 + b"]" * 50_000,
                     b'{"external_id": "x", "metadata": ' + b'{"a": ' * 5_000 + b"1" + b"}" * 5_001):
            for path in ("/v1/score", "/admin/users"):
                refused = http.post(path, content=body, headers=headers)
                assert refused.status_code == 422, (path, body[:40], refused.status_code, refused.text)
                assert refused.json()["detail"][0]["type"] == "json_invalid" or "metadata" in refused.text


def test_openapi_lists_the_errors_the_service_answers(service):
    with service.http() as http:
        schema = http.get("/openapi.json").json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            documented = set(operation["responses"])
            assert {"401", "403", "413", "503"} <= documented, (method, path, documented)
            if path.startswith("/admin/users/{user_id}"):
                assert {"404", "409"} <= documented, (method, path)


# ---------------------------------------------------------------------------------------------- a hung database


def test_a_frozen_database_answers_503_in_time_writes_nothing_and_health_stays_quick(service, cluster, db):
    with service.http() as http:
        assert http.post("/admin/users", json={"external_id": "before-freeze"}).status_code == 201
        assert http.get("/healthz").json()["database"] == "ok"
    with service.http(service.client_key) as http:  # the key is verified now, and trusted through the freeze
        assert http.get("/v1/users/before-freeze/profile").status_code == 200
    stores = [("POST", "/v1/users/frozen-feedback/feedback", {"pairs": [pair(1), pair(2)]}, service.client_key),
              ("POST", "/admin/users", {"external_id": "frozen-user"}, ADMIN_KEY),
              ("DELETE", "/admin/users/before-freeze", None, ADMIN_KEY)]
    calls = stores * 12  # more than the service has database threads (15): none may queue without bound

    def send(call) -> httpx.Response:
        method, path, body, key = call
        with service.http(key, timeout=CALL_DEADLINE_S + 10) as http:  # a hung call fails the test here
            return http.request(method, path, json=body)

    with cluster.frozen():
        with cf.ThreadPoolExecutor(len(calls)) as pool:
            pending = [pool.submit(send, call) for call in calls]
            time.sleep(0.5)
            with service.http(timeout=1.0) as http:  # healthz within a second, while the calls hang
                for _ in range(3):
                    health = http.get("/healthz")
                    assert health.status_code == 200 and health.json()["status"] == "degraded", health.text
            answers = [answer.result() for answer in pending]
        with service.http(timeout=1.0) as http:
            assert http.get("/healthz").json()["database"] == "unreachable"
    assert {a.status_code for a in answers} == {503}, [(a.status_code, a.text) for a in answers]
    assert all(a.headers.get("Retry-After") for a in answers)

    def recovered() -> bool:
        with service.http(timeout=1.0) as http:
            return http.get("/healthz").json()["database"] == "ok"
    deadline = time.monotonic() + 30
    while not recovered():
        assert time.monotonic() < deadline, "the service did not see the database come back"
        time.sleep(0.2)
    time.sleep(CALL_DEADLINE_S)  # the abandoned calls, continued, finish (and must roll back)
    assert count(db, "SELECT count(*) FROM users WHERE external_id IN ('frozen-user', 'frozen-feedback')") == 0
    assert count(db, "SELECT count(*) FROM users WHERE external_id = 'before-freeze'") == 1
    assert count(db, "SELECT count(*) FROM audit_log WHERE target IN ('frozen-user', 'before-freeze') "
                     "AND action <> 'user.create'") == 0
    with service.http(service.client_key) as http:
        fed = http.post("/v1/users/frozen-feedback/feedback", json={"pairs": [pair(1)]})
    assert fed.status_code == 200 and fed.json()["stored"] == 1, fed.text


# ---------------------------------------------------------------------------------------------- fuzzing


def test_openapi_fuzz_finds_no_server_errors_and_no_undocumented_statuses(service):
    """Bounded schemathesis run with the bootstrap admin key (no revocation can lock the fuzzer out)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json")
    failures: list[str] = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        @given(case=schema.as_strategy(generation_mode=mode))
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:
            response = case.call(headers={"X-API-Key": ADMIN_KEY}, timeout=30)
            documented = case.operation.definition.raw["responses"]
            if response.status_code >= 500 or str(response.status_code) not in documented:
                failures.append(f"{case.method} {case.formatted_path} {case.body!r:.200} -> "
                                f"{response.status_code} {response.text[:200]}")
        fuzz()
    assert not failures, "\n".join(failures[:5])


def test_stateful_fuzz_over_inferred_links_finds_no_server_errors(service, tmp_path):
    """Schemathesis' stateful phase (its CLI: sequences of calls over the links it infers, e.g. create a user,
    then read, patch, export and import it), bounded in examples and time.

    Isolated from the tests above by running last, with the bootstrap admin key, and without key revocation, so
    it can neither lock itself out nor revoke the keys other tests use.
    """
    cli = Path(sys.executable).with_name("schemathesis")
    run = subprocess.run(
        [str(cli), "run", f"{service.url}/openapi.json", "--phases", "stateful", "-n", str(FUZZ_EXAMPLES),
         "--max-time", "25", "--seed", "16", "--workers", "1", "-H", f"X-API-Key: {ADMIN_KEY}",
         "--exclude-name", "DELETE /admin/keys/{prefix}", "--request-timeout", "30",
         "--checks", "not_a_server_error,status_code_conformance,response_schema_conformance"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "stateful" in run.stdout.lower(), run.stdout[-2000:]
