"""The scoring service under load while its database hangs and then goes down (issue 16's fault script).

    python bench/bench_faults.py [--workers 8] [--phase-s 15] [--port 5498]

The real config (serve_apps/config.yaml: one Ingress, one Embedder, the tiny backbone) over a Postgres cluster
of this script's own (`pg_createcluster` on `--port`, dropped at the end; the shared server is never touched).
`--workers` clients each loop: score a request for a random user, then send feedback of one new pair, whose
text carries a unique id. Phases of `--phase-s` seconds: healthy; frozen (SIGSTOP on every server process: a
hung machine); healthy again; stopped (`pg_ctlcluster stop`); healthy again. Reported per phase: scoring
success, feedback 2xx / 503 / other counts; recovery time (from the database's return to the first feedback
2xx); and from the database at the end, rows lost (pairs acknowledged 2xx but not stored: must be 0) and pairs
stored although their call answered an error.
"""
from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from report import write_section
from rewardprism import store
from rewardprism.backbone import load_backbone
from rewardprism.features import FeatureSpec
from rewardprism.heads import HeadSet
from rewardprism.store.migrate import upgrade

from serve_apps import local

USERS = 20
CALL_DEADLINE_S = 2.0  # the service's db_call_timeout_s in this run


class Load:
    """Worker threads scoring and sending feedback; counts per phase, and every pair id answered 2xx or not."""

    def __init__(self, url: str, key: str, workers: int):
        self.url, self.key, self.phase = url, key, "healthy"
        self.counts: dict[str, Counter] = {}
        self.acknowledged: set[str] = set()  # pair ids of feedback answered 2xx
        self.refused: set[str] = set()  # pair ids of feedback answered anything else
        self.first_feedback_ok: dict[str, float] = {}  # phase → when its first feedback 2xx came
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self.work, args=(i,), daemon=True) for i in range(workers)]

    def count(self, what: str) -> None:
        with self.lock:
            self.counts.setdefault(self.phase, Counter())[what] += 1

    def work(self, worker: int) -> None:
        rng = random.Random(worker)
        with httpx.Client(base_url=self.url, headers={"X-API-Key": self.key}, timeout=30) as http:
            while not self.stop.is_set():
                user = f"user-{rng.randrange(USERS)}"
                try:
                    scored = http.post("/v1/score", json={"user_id": user, "prompt": "How do I start running?",
                                                          "responses": ["Slowly, three times a week.", "Just run."]})
                    self.count("score ok" if scored.status_code == 200 else "score failed")
                except httpx.HTTPError:
                    self.count("score failed")
                pair_id = uuid.uuid4().hex
                pair = {"prompt": f"question {pair_id}", "chosen": "a careful, kind answer", "rejected": "rude"}
                try:
                    fed = http.post(f"/v1/users/{user}/feedback", json={"pairs": [pair]})
                    status = fed.status_code
                except httpx.HTTPError:
                    status = 0
                with self.lock:
                    (self.acknowledged if 200 <= status < 300 else self.refused).add(pair_id)
                    if 200 <= status < 300:
                        self.first_feedback_ok.setdefault(self.phase, time.monotonic())
                kind = "2xx" if 200 <= status < 300 else "503" if status == 503 else "other"
                self.count(f"feedback {kind}")

    def enter(self, phase: str) -> float:
        with self.lock:
            self.phase = phase
        return time.monotonic()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare(url: str, heads_dir: Path) -> str:
    """Migrate, register a random head set over the tiny backbone and return a score + feedback key."""
    upgrade(url)
    backbone = load_backbone("tiny-bert", device="cpu", max_length=48)
    dim = backbone.dim
    rng = np.random.default_rng(0)
    names = [f"h{i}" for i in range(8)]
    heads = HeadSet(rng.normal(size=(8, dim)) / np.sqrt(dim), np.zeros(8), names, "drm", "tiny-bert",
                    np.full(8, 1 / 8), name="default", version="1", features=FeatureSpec.of(backbone))
    heads.save(heads_dir)
    engine = store.make_engine(store.StoreSettings.from_env(url))
    with store.make_sessions(engine).begin() as session:
        store.register_head_set(session, HeadSet.load(heads_dir), uri=str(heads_dir), activate=True)
        _, key = store.create_api_key(session, ["score", "feedback"])
    engine.dispose()
    return key


def stored_pairs(url: str) -> set[str]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        prompts = conn.execute(sa.text("SELECT prompt FROM feedback")).scalars().all()
    engine.dispose()
    return {str(p).removeprefix("question ") for p in prompts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--phase-s", type=float, default=15.0)
    parser.add_argument("--port", type=int, default=5498)
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    import ray
    from ray import serve

    load_start = os.getloadavg()[0]
    with local.postgres_cluster("rpbenchfaults", args.port) as cluster:
        import tempfile

        key = prepare(cluster.url, Path(tempfile.mkdtemp()) / "heads")
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        port = free_port()
        env = {"DATABASE_URL": cluster.url, "RP_DB_TIMEOUT_S": "1",
               "RP_DB_CALL_TIMEOUT_S": str(CALL_DEADLINE_S), "RP_HEAD_SET_POLL_S": "0.5"}
        local.run_config(port, local.app_config("faults", "/", env, replicas=1))
        load = Load(f"http://127.0.0.1:{port}", key, args.workers)
        for thread in load.threads:
            thread.start()
        returned: dict[str, float] = {}
        try:
            time.sleep(args.phase_s)
            load.enter("frozen")
            with cluster.frozen():
                time.sleep(args.phase_s)
            returned["after freeze"] = load.enter("after freeze")
            time.sleep(args.phase_s)
            load.enter("stopped")
            cluster.ctl("stop")
            time.sleep(args.phase_s)
            cluster.ctl("start")
            returned["after stop"] = load.enter("after stop")
            time.sleep(args.phase_s)
        finally:
            load.stop.set()
            for thread in load.threads:
                thread.join(60)
            serve.shutdown()
            ray.shutdown()
        stored = stored_pairs(cluster.url)
    load_end = os.getloadavg()[0]

    lost = load.acknowledged - stored
    stored_after_error = load.refused & stored
    rows = []
    for phase in ("healthy", "frozen", "after freeze", "stopped", "after stop"):
        c = load.counts.get(phase, Counter())
        scores = c["score ok"] + c["score failed"]
        recovery = (f"{load.first_feedback_ok[phase] - returned[phase]:.1f}"
                    if phase in returned and phase in load.first_feedback_ok else "")
        rows.append(f"| {phase} | {c['score ok']}/{scores} | {c['feedback 2xx']} | {c['feedback 503']} | "
                    f"{c['feedback other']} | {recovery} |")
    body = (
        f"One Ingress and one Embedder replica (tiny backbone) over a Postgres cluster of the script's own; "
        f"{args.workers} clients, each scoring then sending one feedback pair, in a loop; phases of "
        f"{args.phase_s:g} s; database call deadline {CALL_DEADLINE_S:g} s. Load average (1 min) "
        f"{load_start:.1f} at the start, {load_end:.1f} at the end (other work on the machine).\n\n"
        "| phase | scored ok | feedback 2xx | feedback 503 | feedback other | recovery s |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"Rows lost (acknowledged 2xx, not stored): **{len(lost)}** of {len(load.acknowledged)} acknowledged. "
        f"Pairs stored although their call answered an error: {len(stored_after_error)} of {len(load.refused)}. "
        "Recovery: from the database's return (SIGCONT, or `pg_ctlcluster start` returning) to the first "
        "feedback 2xx."
    )
    print(body)
    if not args.no_write:
        write_section("faults", "python bench/bench_faults.py " + " ".join(sys.argv[1:]), body)
    if lost:
        sys.exit(1)


if __name__ == "__main__":
    main()
