"""What a request with a wrong API key costs the service, side by side with an unknown prefix and a valid key.

    python bench/bench_auth.py [--requests 400] [--concurrency 32]

Issue 16, item 4: prefixes are public, and with scrypt hashes a wrong secret on a real prefix cost ~100 ms of
Ingress CPU (400 such requests, 32 at a time, starved legitimate traffic) and answered slower than an unknown
prefix (an oracle for which prefixes exist). One Ingress (`create_api` over `ScoringService`, under uvicorn in a
child process, no Ray) on a fresh Postgres database (SQLite if Postgres is not reachable); the load generator
in this process sends `--requests` requests per case, `--concurrency` at a time, to `GET /admin/users/x` (a
score-only key gets 403 after authentication, so only auth is measured). Cases, in this order: a wrong secret
on a key made before migration 0002 (scrypt), an unknown prefix, a wrong secret on a new key (sha256), and the
valid new key. Per case: requests/s, the child's CPU ms per request, and p50 latency; the ratio to the unknown
prefix is what matters (load from other work on the machine hits all cases alike).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from report import write_section  # bench/ is not a package
from rewardprism import store
from rewardprism.store.migrate import upgrade

POSTGRES = os.environ.get("RP_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
LEGACY_PREFIX = "5c5c5c5c"


def serve(port: int) -> None:
    """The child: one Ingress on DATABASE_URL (no head set needed: nothing is scored)."""
    import uvicorn

    from serve_apps.api import create_api
    from serve_apps.service import ScoringService
    from serve_apps.settings import ServeSettings

    class NoMetrics:
        def scored(self, responses: int, personalized: bool) -> None: ...

        def cache(self, result: str) -> None: ...

        def adapted(self, seconds: float, pairs: int) -> None: ...

    uvicorn.run(create_api(ScoringService(ServeSettings.from_env(), None, NoMetrics())), host="127.0.0.1",
                port=port, log_level="warning")


def database() -> tuple[str, str, Callable[[], None]]:
    """A fresh database (its URL, its kind) and how to drop it."""
    admin = sa.create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    name = f"rp_bench_auth_{uuid.uuid4().hex[:8]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError:
        folder = tempfile.mkdtemp()
        return f"sqlite:///{folder}/auth.db", "sqlite", lambda: None

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    return sa.make_url(POSTGRES).set(database=name).render_as_string(hide_password=False), "postgresql", drop


def make_keys(url: str) -> tuple[str, str]:
    """A new (sha256) score key, and a score key as migration 0001 left it (scrypt): their tokens."""
    upgrade(url)
    engine = store.make_engine(store.StoreSettings.from_env(url))
    salt, secret = secrets.token_bytes(16), secrets.token_urlsafe(32)
    with store.make_sessions(engine).begin() as session:
        _, token = store.create_api_key(session, ["score"])
        session.add(store.ApiKey(prefix=LEGACY_PREFIX, salt=salt, scopes=["score"], hash_scheme="scrypt",
                                 key_hash=hashlib.scrypt(secret.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)))
    engine.dispose()
    return token, f"rp_{LEGACY_PREFIX}_{secret}"


async def load(url: str, tokens: list[str], concurrency: int) -> tuple[float, list[float], set[int]]:
    """Send one request per token, `concurrency` at a time: elapsed seconds, latencies, statuses seen."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for token in tokens:
        queue.put_nowait(token)
    latencies, statuses = [], set()

    async def worker(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            token = queue.get_nowait()
            started = time.perf_counter()
            response = await http.get("/admin/users/x", headers={"X-API-Key": token})
            latencies.append(time.perf_counter() - started)
            statuses.add(response.status_code)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return time.perf_counter() - started, sorted(latencies), statuses


def wrong(token: str) -> str:
    return token[:-8] + secrets.token_urlsafe(6)[:8]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the child's port
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve)
    url, kind, drop = database()
    try:
        run(args, url, kind)
    finally:
        drop()


def run(args: argparse.Namespace, url: str, kind: str) -> None:
    new, legacy = make_keys(url)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)]),
           "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], env=env)
    base = f"http://127.0.0.1:{port}"
    load_before = os.getloadavg()[0]
    try:
        for _ in range(300):
            try:
                httpx.get(f"{base}/healthz", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        process = psutil.Process(child.pid)
        n = args.requests
        cases = [  # wrong secrets first: a valid use of the legacy key would rehash it
            ("wrong secret, key made before 0002 (scrypt)", [wrong(legacy) for _ in range(n)]),
            ("unknown prefix", [f"rp_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}" for _ in range(n)]),
            ("wrong secret, new key (sha256)", [wrong(new) for _ in range(n)]),
            ("valid new key", [new] * n),
        ]
        rows = []
        for name, tokens in cases:
            asyncio.run(load(base, tokens[: args.concurrency], args.concurrency))  # warm-up (connections)
            cpu = process.cpu_times()
            elapsed, latencies, statuses = asyncio.run(load(base, tokens, args.concurrency))
            after = process.cpu_times()
            cpu_ms = 1000 * ((after.user - cpu.user) + (after.system - cpu.system)) / n
            rows.append((name, n / elapsed, cpu_ms, 1000 * latencies[len(latencies) // 2], statuses))
            print(f"{name}: {n / elapsed:.0f} req/s, {cpu_ms:.2f} CPU ms/request, statuses {sorted(statuses)}")
    finally:
        child.terminate()
        child.wait(30)
    load_after = os.getloadavg()[0]
    unknown = next(r for r in rows if r[0] == "unknown prefix")
    lines = [
        f"One Ingress (`create_api` over `ScoringService`, uvicorn, no Ray) on {kind}; {args.requests} requests "
        f"per case, {args.concurrency} at a time, to `GET /admin/users/x` with a score-only key (403 after "
        f"authentication, 401 for a bad key). Load average (1 min) {load_before:.1f} at the start, "
        f"{load_after:.1f} at the end, on {os.cpu_count()} cores (other work on the machine). CPU is the "
        "Ingress process's own (user + system).",
        "",
        "| case | status | requests/s | Ingress CPU ms / request | p50 ms | CPU vs unknown prefix |",
        "|---|---|---|---|---|---|",
        *(f"| {name} | {'/'.join(map(str, sorted(statuses)))} | {rate:.0f} | {cpu:.2f} | {p50:.1f} | "
          f"{cpu / unknown[2]:.2f}× |" for name, rate, cpu, p50, statuses in rows),
        "",
        "Keys made since migration 0002 hash with one SHA-256 (`rewardprism.store.keys`), so a wrong secret "
        "costs what an unknown prefix costs and its timing tells nothing; a key left from before pays scrypt "
        "until its first valid use rehashes it.",
    ]
    write_section("auth", "python bench/bench_auth.py " + " ".join(sys.argv[1:]), "\n".join(lines))


if __name__ == "__main__":
    main()
