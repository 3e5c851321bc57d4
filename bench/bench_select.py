"""Active pair selection (`rewardprism.select`): the cost of choosing, in process and over HTTP.

    python bench/bench_select.py                  # pools of 10k and 100k pairs, 20 and 100 heads; HTTP on 10k
    python bench/bench_select.py --sizes 10000 --heads 100 --queries 50   # a quick look

In process, one BLAS and one torch thread, CPU time per query: choosing k pairs by information (k = 1, 5, 10)
next to the margin baseline (`uncertainty`, one matrix-vector product and a sort) on the same pool and posterior,
for a new user (the population prior, every strength of the ladder kept) and for one with 15 labels.

Over HTTP: `POST /v1/users/{id}/queries` against a registered pool of `--http-pool` pairs over a 100-head set
(tiny-bert features: a pool query makes no forward pass), a Serve app on this machine with one Ingress replica,
queries sent one at a time: p50 / p99 latency for k = 1 and 5, for a new user and for one with 15 labels.
Writes the "select" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from bench_serve import make_database
from report import write_section
from rewardprism import store
from rewardprism.backbone import load_backbone
from rewardprism.features import FeatureSpec
from rewardprism.heads import HeadSet
from rewardprism.select import posteriors, select_pairs
from rewardprism.store.migrate import upgrade

from serve_apps import local


def user_beliefs(heads: int, gaps: np.ndarray, rng: np.random.Generator) -> dict[str, object]:
    """The posterior of a new user and of one with 15 labelled pairs, over a population profile on head 0."""
    prior = np.eye(heads)[0]
    chosen, rejected = rng.standard_normal((1, 15, heads)), rng.standard_normal((1, 15, heads))
    empty = np.zeros((1, 0, heads))
    return {"new user": posteriors(empty, empty, prior, pool_gaps=[gaps])[0],
            "15 labels": posteriors(chosen, rejected, prior, pool_gaps=[gaps])[0]}


def cpu_per_query(gaps: np.ndarray, belief, k: int, method: str, repeats: int) -> float:
    select_pairs(gaps, belief, k, method)  # warm: first-touch pages and BLAS set-up are not a query's cost
    started = time.process_time()
    for _ in range(repeats):
        select_pairs(gaps, belief, k, method)
    return (time.process_time() - started) / repeats


def in_process(sizes: list[int], head_counts: list[int]) -> list[str]:
    lines = ["| pool | heads | user | strengths kept | uncertainty k=10 | information k=1 | k=5 | k=10 |",
             "|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        for heads in head_counts:
            rng = np.random.default_rng(0)
            gaps = rng.standard_normal((size, heads))
            for who, belief in user_beliefs(heads, gaps, rng).items():
                repeats = 3 if size >= 100_000 else 10
                times = {k: cpu_per_query(gaps, belief, k, "information", repeats) for k in (1, 5, 10)}
                margin = cpu_per_query(gaps, belief, 10, "uncertainty", repeats)
                lines.append(f"| {size:,} | {heads} | {who} | {len(belief.probabilities)} | {margin * 1e3:.0f} ms | "
                             + " | ".join(f"{times[k] * 1e3:.0f} ms" for k in (1, 5, 10)) + " |")
                print(lines[-1], flush=True)
    return lines


def over_http(pool_size: int, queries: int) -> list[str]:
    """p50 / p99 of sequential queries against a registered pool, for a new user and one with 15 labels."""
    import ray

    heads_count = 100
    tmp = Path(tempfile.mkdtemp(prefix="rp-bench-select-"))
    backbone = load_backbone("tiny-bert", device="cpu", max_length=48)
    rng = np.random.default_rng(0)
    heads = HeadSet(rng.normal(size=(heads_count, backbone.dim)) / np.sqrt(backbone.dim), np.zeros(heads_count),
                    [f"head{i}" for i in range(heads_count)], "drm", "tiny-bert", np.eye(heads_count)[0],
                    name="bench", features=FeatureSpec.of(backbone))
    heads_dir = heads.save(tmp / "heads")
    url, drop = make_database(tmp)
    try:
        upgrade(url)
        engine = store.make_engine(store.StoreSettings.from_env(url))
        with store.make_sessions(engine).begin() as session:
            row = store.register_head_set(session, heads, uri=str(heads_dir), activate=True)
            texts = [(f"prompt {i}", f"answer a {i}", f"answer b {i}") for i in range(pool_size)]
            store.register_query_pool(session, row, "bench", texts, rng.standard_normal((pool_size, heads_count)))
            _, key = store.create_api_key(session, ["score", "feedback"])
        engine.dispose()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        local.run_config(port, local.app_config("bench", "/", {"DATABASE_URL": url, "RP_HEAD_SET": "bench"}))
        lines = ["| user | k | p50 | p99 | queries |", "|---|---|---|---|---|"]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": key}, timeout=60) as http:
            labels = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(15)]
            assert http.post("/v1/users/labelled/feedback", json={"pairs": labels}).status_code == 200
            for user in ("new", "labelled"):
                for k in (1, 5):
                    body = {"pool": "bench", "k": k}
                    assert http.post(f"/v1/users/{user}/queries", json=body).status_code == 200  # warm the cache
                    latencies = []
                    for _ in range(queries):
                        started = time.perf_counter()
                        response = http.post(f"/v1/users/{user}/queries", json=body)
                        latencies.append(time.perf_counter() - started)
                        assert response.status_code == 200, response.text
                    p50, p99 = np.percentile(latencies, [50, 99]) * 1e3
                    lines.append(f"| {'new' if user == 'new' else '15 labels'} | {k} | {p50:.0f} ms | {p99:.0f} ms | "
                                 f"{queries} |")
                    print(lines[-1], flush=True)
        return lines
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        drop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="pool sizes in process")
    parser.add_argument("--heads", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--http-pool", type=int, default=10_000, help="pairs of the pool queried over HTTP")
    parser.add_argument("--queries", type=int, default=200, help="HTTP queries per row")
    args = parser.parse_args()
    command = "python bench/bench_select.py " + " ".join(sys.argv[1:])
    load = os.getloadavg()[0]
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        table = in_process(args.sizes, args.heads)
    http = over_http(args.http_pool, args.queries)
    body = "\n".join([
        (f"CPU time per query in process, one BLAS and one torch thread (load average {load:.1f} on "
         f"{os.cpu_count()} cores at the start): choosing k pairs of the pool by information, and the margin "
         "baseline. Strengths kept: those of the ladder with posterior probability above 1e-6."), "",
        *table, "",
        (f"`POST /v1/users/{{id}}/queries` over HTTP on loopback, a registered pool of {args.http_pool:,} pairs × 100 "
         f"heads, one query at a time (load average {os.getloadavg()[0]:.1f} at the end):"), "", *http])
    write_section("select", command, body)


if __name__ == "__main__":
    main()
