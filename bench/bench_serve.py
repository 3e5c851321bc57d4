"""Scoring-service throughput, latency and memory, side by side in one run (issue 6's performance targets).

    python bench/bench_serve.py [--users 1000] [--concurrency 32] [--responses 4] [--phase-s 25] [--rounds 3]
                                [--embedders N] [--haproxy]

Loopback only, MiniLM, the real config (serve_apps/config.yaml, `--embedders` Embedder replicas sharing all CPUs and one
Ingress replica) over a fresh Postgres database (SQLite if Postgres is not reachable) holding `--users` users
with random profiles over a 100-head set. Requests are synthetic prompts with `--responses` responses each.
- raw forward: `EmbeddingExtractor.embed_texts` (tokenize, token-budget batches, forward) on the texts of the
  same requests, in this process, while the service is idle: the ceiling the service is held to (≥ 0.85×);
- service, closed loop at `--concurrency` over the same requests: personalized (each request a random one of
  the users) and unpersonalized (no user); responses scored per second, timed from the first request to the
  last answer. Rounds of raw / personalized / unpersonalized run back to back and ratios are taken within a
  round, so load from other work on the machine hits all three alike;
- open loop (Poisson arrivals) at 50 % and 90 % of the personalized peak: p50 / p99 latency;
- replica memory (RSS of the Serve replica processes) sampled over the whole run: it must not grow.
The run is bounded: about (3 × rounds + 3) × `--phase-s` plus start-up, 5 minutes of load by default (the
table says how long it ran). The load generator, Serve's proxy and the Ingress share this machine's CPUs with
the embedders; the raw forward has them to itself.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import psutil
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from report import write_section
from rewardprism import store
from rewardprism.backbone import load_backbone
from rewardprism.data import render
from rewardprism.embed import EmbeddingExtractor
from rewardprism.features import FeatureSpec
from rewardprism.heads import HeadSet
from rewardprism.store.migrate import upgrade
from rewardprism.synthetic import SyntheticGenerator

from serve_apps import local

POSTGRES = os.environ.get("RP_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
HEADS = 100


def requests_pool(n: int, responses: int) -> list[dict]:
    """`n` score requests: a synthetic prompt and `responses` synthetic answers each."""
    pairs = SyntheticGenerator(seed=7).dataset(n // 4 + 1)  # 4 simulated users: at least n pairs
    texts = [t for p in pairs for t in (p.chosen, p.rejected)]
    return [{"prompt": pairs[i].prompt, "responses": [texts[(i * responses + j) % len(texts)]
                                                      for j in range(responses)]} for i in range(n)]


def make_database(tmp: Path) -> tuple[str, Callable[[], None]]:
    """A fresh database URL and a function that drops it."""
    try:
        admin = sa.create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
        name = f"rp_bench_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError:
        return f"sqlite:///{tmp / 'bench.db'}", lambda: None

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    return sa.make_url(POSTGRES).set(database=name).render_as_string(hide_password=False), drop


def populate(url: str, heads: HeadSet, heads_dir: Path, users: int) -> str:
    """Register and activate the head set, create `users` users with random profiles; returns an API key."""
    upgrade(url)
    rng = np.random.default_rng(0)
    engine = store.make_engine(store.StoreSettings.from_env(url))
    with store.make_sessions(engine).begin() as session:
        row = store.register_head_set(session, heads, uri=str(heads_dir), activate=True)
        for u in range(users):
            store.create_user(session, f"user{u}")
            store.save_profile(session, f"user{u}", rng.dirichlet(np.ones(HEADS)).tolist(), method="manual",
                               expected_version=None, head_set=row)
        _, key = store.create_api_key(session, ["score"])
    engine.dispose()
    return key


class MemorySampler(threading.Thread):
    """RSS of each Serve replica process (named by Ray's process title), every `interval` seconds."""

    def __init__(self, app: str, interval: float = 2.0):
        super().__init__(daemon=True)
        self.app, self.interval, self.samples = app, interval, []  # (t, {deployment: MiB})
        self.stop = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.stop.wait(self.interval):
            rss = {}
            for proc in psutil.process_iter(["cmdline"]):
                title = " ".join(proc.info["cmdline"] or [])
                for deployment in ("Embedder", "Ingress"):
                    if f"ServeReplica:{self.app}:{deployment}" in title:
                        try:
                            rss[deployment] = rss.get(deployment, 0) + proc.memory_info().rss / 2**20
                        except psutil.Error:
                            pass
            self.samples.append((time.monotonic() - start, rss))


async def closed_loop(url: str, key: str, requests: list[dict], users: int, concurrency: int,
                      personalized: bool) -> float:
    """Responses scored per second for a fixed set of requests sent by `concurrency` clients, each sending its
    next request on an answer: all the responses over the time from the first request to the last answer (as
    the raw forward is timed over all its texts; no window that a batch's completion may fall in or out of)."""
    todo = iter(requests)
    rng = random.Random(len(requests))
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency)) as http:
        async def worker() -> None:
            for request in todo:
                body = {**request, "user_id": f"user{rng.randrange(users)}"} if personalized else request
                response = await http.post("/v1/score", json=body)
                response.raise_for_status()
                if personalized and response.json()["profile"]["source"] != "user":
                    raise RuntimeError(f"not scored with the user's profile: {response.text}")
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sum(len(r["responses"]) for r in requests) / (time.perf_counter() - started)


async def open_loop(url: str, key: str, pool: list[dict], users: int, rate: float, seconds: float) -> dict:
    """Poisson arrivals at `rate` requests/s (personalized); latency percentiles of the requests sent.

    The arrivals are a Poisson process given its count: round(rate × seconds) requests at sorted uniform times.
    Drawing gaps one by one instead left the count to chance: one seed sent 7–9 % more than asked at every rate.
    """
    latencies: list[float] = []
    rng = random.Random(1)
    arrivals = sorted(rng.uniform(0, seconds) for _ in range(max(1, round(rate * seconds))))
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, timeout=120,
                                 limits=httpx.Limits(max_connections=None)) as http:
        async def one(body: dict) -> None:
            started = time.monotonic()
            response = await http.post("/v1/score", json=body)
            response.raise_for_status()
            latencies.append(time.monotonic() - started)

        tasks, started = [], time.monotonic()
        for at in arrivals:
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            tasks.append(asyncio.create_task(one({**rng.choice(pool), "user_id": f"user{rng.randrange(users)}"})))
        await asyncio.gather(*tasks)
    ms = np.array(latencies) * 1000
    return {"sent": len(tasks) / seconds, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--responses", type=int, default=4, help="responses per score request")
    parser.add_argument("--phase-s", type=float, default=25.0, help="seconds per measured phase")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of raw / personalized / unpersonalized")
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--embedders", type=int, default=os.cpu_count() or 1,
                        help="Embedder replicas sharing the machine's CPUs (default: one per CPU, as config.yaml's "
                             "num_cpus: 1 autoscales to)")
    parser.add_argument("--haproxy", action="store_true",
                        help="Ray Serve's HAProxy front and direct ingress (RAY_SERVE_ENABLE_HA_PROXY=1, "
                             "RAY_SERVE_ENABLE_DIRECT_INGRESS=1) instead of its Python HTTP proxy")
    args = parser.parse_args()
    if args.haproxy:  # read by every Ray process at import: set before the cluster starts
        os.environ.update(RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_ENABLE_DIRECT_INGRESS="1")
    import ray

    cpus = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="rp-bench-"))
    backbone = load_backbone(args.backbone, device="cpu", max_length=args.max_tokens)
    rng = np.random.default_rng(0)
    heads = HeadSet(rng.normal(size=(HEADS, backbone.dim)) / np.sqrt(backbone.dim), np.zeros(HEADS),
                    [f"head{i}" for i in range(HEADS)], "drm", args.backbone, np.eye(HEADS)[0], name="bench",
                    features=FeatureSpec.of(backbone))
    heads_dir = heads.save(tmp / "heads")
    url, drop = make_database(tmp)
    pool = requests_pool(512, args.responses)
    try:
        key = populate(url, heads, heads_dir, args.users)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {"DATABASE_URL": url, "RP_HEAD_SET": "bench"}
        # The embedders share every CPU (Ray sets each one's torch threads from its num_cpus), as the raw forward
        # here uses them all.
        local.run_config(port, local.app_config("bench", "/", env, replicas={"Embedder": args.embedders},
                                                num_cpus={"Embedder": cpus / args.embedders, "Ingress": 0},
                                                user_config={"max_responses": max(64, args.responses)}))
        load = [os.getloadavg()[0]]
        memory = MemorySampler("bench")
        memory.start()
        service = f"http://127.0.0.1:{port}"

        # each phase scores the same requests: a multiple of `concurrency` taking about `phase_s` at the raw rate
        extractor = EmbeddingExtractor(backbone)
        started = time.perf_counter()
        extractor.embed_texts([render(r["prompt"], t, backbone.tokenizer) for r in pool[:16] for t in r["responses"]])
        rate = 16 * args.responses / (time.perf_counter() - started)
        waves = max(1, round(rate * args.phase_s / args.responses / args.concurrency))
        requests = pool[:waves * args.concurrency]
        texts = [render(r["prompt"], t, backbone.tokenizer) for r in requests for t in r["responses"]]

        def raw_forward() -> float:
            started = time.perf_counter()
            extractor.embed_texts(texts)
            return len(texts) / (time.perf_counter() - started)

        def service_run(personalized: bool) -> float:
            return asyncio.run(closed_loop(service, key, requests, args.users, args.concurrency, personalized))

        service_run(True)  # warm-up: every request once, so caches and the allocator reach their working size
        warm = memory.samples[-1][0] if memory.samples else 0.0
        # rounds of raw R, personalized P, unpersonalized U back to back: ratios within a round share the
        # machine's state at the time (other work on it shifts all three)
        rounds = [(raw_forward(), service_run(True), service_run(False)) for _ in range(args.rounds)]
        raw, personal, plain = (float(np.median(column)) for column in zip(*rounds))
        per_request = personal / args.responses
        latency = {f: asyncio.run(open_loop(service, key, pool, args.users, f * per_request, args.phase_s))
                   for f in (0.5, 0.9)}
        memory.stop.set()
        memory.join()
        load.append(os.getloadavg()[0])
    finally:
        if ray.is_initialized():
            ray.shutdown()
        drop()

    samples = memory.samples
    rows = []
    for deployment in ("Embedder", "Ingress"):
        series = np.array([(t, s[deployment]) for t, s in samples if deployment in s])
        after = series[series[:, 0] >= warm]
        slope = np.polyfit(after[:, 0], after[:, 1], 1)[0] * 60 if len(after) > 2 else float("nan")
        rows.append(f"| {deployment} | {series[0, 1]:.0f} | {after[0, 1]:.0f} | {series[-1, 1]:.0f} | "
                    f"{series[:, 1].max():.0f} | {slope:+.1f} |")
    ratio = [(p / r, u / r, (u - p) / u) for r, p, u in rounds]
    command = "python bench/bench_serve.py " + " ".join(sys.argv[1:])
    front = "HAProxy with direct ingress" if args.haproxy else "Serve's HTTP proxy"
    body = f"""\
{args.users} users with random profiles over {HEADS} heads, {args.backbone} (max {args.max_tokens} tokens), \
{args.responses} responses per request, concurrency {args.concurrency}; {args.embedders} Embedder replica(s) \
({cpus / args.embedders:g} CPUs each) and \
one Ingress replica, behind {front}; database `{sa.make_url(url).get_backend_name()}`; \
load generator on the same machine; \
load average (1 min) {load[0]:.1f} at the start, {load[1]:.1f} at the end (other work on the machine). \
Medians of {args.rounds} rounds; in each, the raw forward, then the service personalized, then unpersonalized, \
on the same {len(requests)} requests ({len(texts)} texts).

| throughput (responses/s) | median | per round | vs raw (median of per-round ratios) |
|---|---|---|---|
| raw batched backbone forward (`EmbeddingExtractor.embed_texts`, same texts) | {raw:.1f} | \
{" / ".join(f"{r:.1f}" for r, _, _ in rounds)} | 1.00 |
| service, personalized (random user of {args.users}) | {personal:.1f} | \
{" / ".join(f"{p:.1f}" for _, p, _ in rounds)} | {np.median([a for a, _, _ in ratio]):.2f} (target ≥ 0.85) |
| service, unpersonalized (no user) | {plain:.1f} | {" / ".join(f"{u:.1f}" for _, _, u in rounds)} | \
{np.median([b for _, b, _ in ratio]):.2f} |

Personalized vs. unpersonalized: {100 * np.median([c for _, _, c in ratio]):+.1f} % slower (median of per-round \
differences; target ≤ 5 %).

| open-loop load (personalized) | requests/s sent | p50 ms | p99 ms |
|---|---|---|---|
""" + "\n".join(f"| {int(f * 100)} % of peak ({f * per_request:.2f} req/s) | {v['sent']:.2f} | {v['p50']:.0f} | "
                f"{v['p99']:.0f} |" for f, v in latency.items()) + f"""

Replica memory (RSS, MiB, all replicas of a deployment), sampled every 2 s over {samples[-1][0] / 60:.1f} minutes \
of load; "after warm-up" is once every request has been served once:

| replica | start | after warm-up | end | max | slope after warm-up (MiB/min) |
|---|---|---|---|---|---|
""" + "\n".join(rows)
    print(body)
    write_section("serve-haproxy" if args.haproxy else "serve", command, body)


if __name__ == "__main__":
    main()
