"""Faults on a real multi-node Ray cluster: a node goes away in training (and the scenarios after it).

    python bench/cluster_faults.py train --out /tmp/cf [--no-fault] [--epochs 2]

`ray.cluster_utils.Cluster` (as Ray's own tests do) starts a head and two worker nodes on this machine, each a
real raylet with its own object store, workers and resources; `remove_node` kills one of them outright (a
preempted VM), `add_node` brings a replacement. Worker nodes carry the custom resource `rp_worker: 1`, and the
work under test asks for it, so placement is deterministic: one training worker (or replica, or actor) per
worker node, nothing of it on the head. Every node sees the same local folder (`storage_path`), as every pod
of a KubeRay cluster mounts the same volume.

Each scenario runs in its own process (one cluster per process, beside any other Ray on the machine) and prints
one JSON line of measurements as its last line: tests/test_cluster.py asserts on it, bench/bench_cluster.py
runs the fuller form and writes the tables.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")  # a busy 2-core machine starts raylets slowly

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

WORKER = "rp_worker"  # the custom resource of worker nodes: what the work under test asks for


class TestCluster:
    """A head (no `rp_worker`) and `workers` worker nodes, each with `rp_worker: 1` and `worker_cpus` CPUs."""

    def __init__(self, workers: int = 2, worker_cpus: int = 1, head_cpus: int = 2, gcs_port: int = 0):
        address_file = Path(ray._private.utils.get_ray_address_file(None))
        before = address_file.read_text() if address_file.exists() else None
        head = {"num_cpus": head_cpus, "include_dashboard": False}
        if gcs_port:  # a GCS restarted on the same port is found again by every raylet
            head["gcs_server_port"] = gcs_port
        self.cluster = Cluster(initialize_head=True, head_node_args=head)
        # Cluster records its address for `ray.init()` to join: other jobs on this machine must not join ours
        if before is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(before)
        self.worker_cpus = worker_cpus
        self.added: list = []  # every worker node ever added, in order
        self.nodes = [self.add() for _ in range(workers)]
        ray.init(address=self.cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})

    def add(self):
        node = self.cluster.add_node(num_cpus=self.worker_cpus, resources={WORKER: 1},
                                     object_store_memory=150 * 1024 ** 2)
        self.added.append(node)
        return node

    def remove(self, node_id: str) -> float:
        """Kill the node `node_id` outright (no graceful shutdown); returns when it went."""
        node = next(n for n in self.cluster.worker_nodes if n.node_id == node_id)
        self.nodes.remove(node)
        went = time.time()
        self.cluster.remove_node(node, allow_graceful=False)
        return went

    def fail(self, node_id: str, replace_after_s: float) -> tuple[float, float | None]:
        """Kill `node_id`, and add a fresh worker node `replace_after_s` later (never when negative): the times
        the node went and its replacement came (None)."""
        went = self.remove(node_id)
        if replace_after_s < 0:
            return went, None
        time.sleep(replace_after_s)
        self.add()
        return went, time.time()

    def close(self) -> None:
        ray.shutdown()
        self.cluster.shutdown()


def wait_for(check, what: str, timeout: float = 300, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


# ----------------------------------------------------------------------------------------------- training

@dataclass
class StepLog:
    """The recipe's `on_step` hook: rank 0 logs each step with its time; with `hold_step`, every rank of the
    first attempt stops at that step (and says on which node) until the node under it is removed: the fault
    comes at a known step, after a known checkpoint."""

    folder: str
    hold_step: int | None = None

    def __call__(self, step: int, rank: int, resumed_from: int | None) -> None:
        if rank == 0:
            with open(Path(self.folder) / "steps.jsonl", "a") as log:
                log.write(json.dumps({"step": step, "resumed_from": resumed_from, "t": time.time()}) + "\n")
        if self.hold_step is not None and resumed_from is None and step == self.hold_step:
            (Path(self.folder) / f"held.{rank}").write_text(ray.get_runtime_context().get_node_id())
            time.sleep(900)


def train(out: Path, *, fault: bool, epochs: int, per_user: int, checkpoint_every: int, hold_step: int,
          zero_stage: int, replace_after_s: float) -> dict[str, Any]:
    """train_vrm.py's recipe (configs/vrm_tiny.yaml), 2 workers pinned to the 2 worker nodes. With `fault`: at
    `hold_step` (after the checkpoint of step `checkpoint_every`) rank 0's node is removed, and a replacement is
    added `replace_after_s` later; FailureConfig restarts the group from the latest checkpoint."""
    from rewardprism.config import load_config
    from rewardprism.recipes.vrm import VrmConfig, VrmRecipe
    from rewardprism.train_worker import DS_TAG

    out.mkdir(parents=True, exist_ok=True)
    config = load_config(VrmConfig, ROOT / "configs" / "vrm_tiny.yaml", [
        f"ray.storage_path={out / 'runs'}", f"ray.worker_resources={{{WORKER}: 1}}", "ray.max_failures=1",
        "ray.keep_checkpoints=100", f"train.epochs={epochs}", f"data.synthetic_per_user={per_user}",
        f"train.checkpoint_every={checkpoint_every}", f"train.eval_every={checkpoint_every}",
        f"train.log_every={checkpoint_every}", f"train.zero_stage={zero_stage}"])
    recipe = VrmRecipe(config, on_step=StepLog(str(out), hold_step if fault else None))
    recipe.setup()
    total = epochs * recipe.steps_per_epoch
    assert checkpoint_every < hold_step < total, (checkpoint_every, hold_step, total)
    cluster = TestCluster()
    start = time.time()
    try:
        errors: list[BaseException] = []

        def fit() -> None:
            try:
                recipe.train()
            except BaseException as exc:  # noqa: BLE001 -- reported by the main thread
                errors.append(exc)

        thread = threading.Thread(target=fit, daemon=True)
        thread.start()
        fault_at = replaced_at = None
        if fault:
            wait_for(lambda: all((out / f"held.{r}").exists() for r in (0, 1)), f"both ranks at step {hold_step}")
            wait_for((config.run_dir / "checkpoint_manager_snapshot.json").exists,
                     f"the step-{checkpoint_every} checkpoint registered")
            fault_at, replaced_at = cluster.fail((out / "held.0").read_text(), replace_after_s)
        thread.join()
        if errors:
            raise errors[0]
        metrics = recipe.save_checkpoint()
    finally:
        cluster.close()
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    resumed = [s for s in steps if s["resumed_from"] is not None]
    final = recipe.result.metrics
    checkpoint_steps = sorted(m["step"] for _, m in recipe.result.best_checkpoints)
    partitions = sorted(p.name for p in Path(recipe.result.checkpoint.path, DS_TAG).rglob("*optim_states.pt"))
    return {
        "fault": fault, "zero_stage": zero_stage, "total_steps": total, "final_step": final["step"],
        "start_step": final["start_step"], "checkpoint_steps": checkpoint_steps,
        "first_resumed_step": resumed[0]["step"] if resumed else None,
        "steps_run": len(steps), "steps_redone": len(steps) - total,
        "recovery_s": round(resumed[0]["t"] - fault_at, 1) if resumed else None,
        "replaced_after_s": round(replaced_at - fault_at, 1) if fault else None,
        "wall_s": round(time.time() - start, 1), "accuracy": metrics["eval"]["accuracy"],
        "eval_pairs": metrics["eval"]["eval_pairs"], "optimizer_partitions": partitions,
    }


# ----------------------------------------------------------------------------------------------- embedding

def embed(out: Path, *, fault: bool, per_user: int, shard_size: int, shards_per_actor: int, fault_after: int,
          replace_after_s: float) -> dict[str, Any]:
    """`embed_pairs_ray` with one actor on each worker node (tiny-bert). With `fault`: once `fault_after` shards
    are written, one worker node is removed (a replacement is added `replace_after_s` later; never if < 0).
    The folder is then compared with a local, fault-free `embed_pairs` run of the same pairs."""
    import numpy as np
    from rewardprism.backbone import load_backbone
    from rewardprism.embed import EmbeddingSet, embed_pairs
    from rewardprism.embed_ray import embed_pairs_ray
    from rewardprism.features import FeatureSpec
    from rewardprism.synthetic import SyntheticGenerator

    pairs = SyntheticGenerator(1).dataset(per_user)
    tiny = load_backbone("tiny-bert", device="cpu", max_length=64)
    folder, index = out / "ray", out / "ray" / "index.json"
    cluster = TestCluster()
    start = time.time()
    try:
        errors: list[BaseException] = []

        def run() -> None:
            try:
                embed_pairs_ray(pairs, FeatureSpec.of(tiny), folder, dim=tiny.dim, num_actors=2,
                                shard_size=shard_size, shards_per_actor=shards_per_actor,
                                actor_resources={WORKER: 1}, progress=False)
            except BaseException as exc:  # noqa: BLE001 -- reported by the main thread
                errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        fault_at = replaced_at = None
        if fault:
            def written() -> int:
                return len(json.loads(index.read_text())["shards"]) if index.exists() else 0

            wait_for(lambda: written() >= fault_after, f"{fault_after} shards written", every=0.05)
            written_at_fault = written()
            fault_at, replaced_at = cluster.fail(cluster.nodes[0].node_id, replace_after_s)
        thread.join()
        if errors:
            raise errors[0]
        done = time.time()
    finally:
        cluster.close()
    embed_pairs(pairs, tiny, out / "local", shard_size=shard_size, progress=False)
    got, want = EmbeddingSet(folder), EmbeddingSet(out / "local")
    same = all(np.allclose(c1, c2, atol=1e-5) and np.allclose(r1, r2, atol=1e-5)
               for (c1, r1), (c2, r2) in zip(got.shards(), want.shards(), strict=True))
    texts = [json.dumps(p.to_row(), sort_keys=True) for p in got.pairs()]
    return {
        "fault": fault, "pairs": len(pairs), "pairs_in_output": len(texts), "distinct_pairs": len(set(texts)),
        "pairs_equal_input": got.pairs() == pairs, "index_equal_local": got.index == want.index,
        "shards": len(got.index["shards"]), "shard_files": len(list(folder.glob("shard-*"))),
        "shards_equal_local": same, "written_at_fault": written_at_fault if fault else None,
        "replaced_after_s": round(replaced_at - fault_at, 1) if replaced_at else None,
        "after_fault_s": round(done - fault_at, 1) if fault else None, "wall_s": round(done - start, 1),
    }


# ----------------------------------------------------------------------------------------------- serving

def replicas_by_node(cluster: TestCluster) -> dict[str, list[str]]:
    """Deployment → the worker nodes (by place: "w0", "w1", ... in the order they were added) of its live
    replicas; "head" if one is there."""
    places = {n.node_id: f"w{i}" for i, n in enumerate(cluster.added)}
    found: dict[str, list[str]] = {}
    for actor in ray._private.state.actors().values():
        name = actor["ActorClassName"]
        if name.startswith("ServeReplica:") and actor["State"] == "ALIVE":
            node = actor["Address"]["NodeID"]
            found.setdefault(name.rpartition(":")[2], []).append(places.get(node, "head"))
    return {k: sorted(v) for k, v in sorted(found.items())}


def serve(out: Path, *, clients: int, phase_s: float, pg_port: int, fault: str = "node") -> dict[str, Any]:
    """config.yaml's app (tiny backbone, a Postgres cluster of its own on `pg_port`), 2 Ingress and 2
    Embedder replicas on the worker nodes (Serve spreads them: one of each per node); `clients` closed-loop
    clients each score, then send one feedback pair. Phases of `phase_s`: healthy; a worker node removed; a
    node added back. Measured: failed calls and their window after the fault, when the app is healthy again,
    whether replicas move to the new node, and every feedback answered 2xx found in the database."""
    from bench_faults import Load, free_port, prepare, stored_pairs
    from ray import serve as ray_serve

    from serve_apps import local

    class TimedLoad(Load):
        """Load, with the time of every failed call."""

        failures: list[float] = []

        def count(self, what: str) -> None:
            super().count(what)
            if what in ("score failed", "feedback 503", "feedback other"):
                with self.lock:
                    self.failures.append(time.monotonic())

    cluster = None
    with local.postgres_cluster(f"rpcluster{pg_port}", pg_port) as database:
        try:
            url = database.url
            key = prepare(url, out / "heads")
            cluster = TestCluster(gcs_port=free_port() if fault == "gcs" else 0)
            port = free_port()
            env = {"DATABASE_URL": url, "RP_DB_TIMEOUT_S": "1", "RP_DB_CALL_TIMEOUT_S": "2", "RP_HEAD_SET_POLL_S": "1"}
            app = local.app_config("cluster", "/", env, replicas=2)
            for deployment in app["deployments"]:
                deployment["ray_actor_options"]["resources"] = {WORKER: 0.1}
            local.run_config(port, app, proxy_location="HeadOnly")
            placed = replicas_by_node(cluster)
            load = TimedLoad(f"http://127.0.0.1:{port}", key, clients)
            for thread in load.threads:
                thread.start()
            time.sleep(phase_s)
            if fault == "gcs":
                return gcs_outage(cluster, load, phase_s, url)
            fault_at = load.enter("node removed")
            victim = cluster.nodes[0].node_id
            cluster.remove(victim)
            wait_for(lambda: not any(n["Alive"] for n in ray.nodes() if n["NodeID"] == victim),
                     "the node seen dead", every=0.2)
            dead_s = round(time.monotonic() - fault_at, 1)
            try:  # healthy again: two live replicas of each deployment, and the app RUNNING
                wait_for(lambda: all(len(v) == 2 for v in replicas_by_node(cluster).values())
                         and ray_serve.status().applications["cluster"].status.value == "RUNNING",
                         "the app healthy again", timeout=phase_s * 3, every=0.5)
                healthy_s = round(time.monotonic() - fault_at, 1)
            except TimeoutError:
                healthy_s = None
            time.sleep(max(0.0, phase_s - (time.monotonic() - fault_at)))
            after_fault = replicas_by_node(cluster)
            status_after_fault = ray_serve.status().applications["cluster"].status.value
            added_at = load.enter("node added")
            cluster.add()
            try:
                rebalanced = wait_for(lambda: all(len(set(v)) == 2 for v in replicas_by_node(cluster).values()),
                                      "replicas on both worker nodes", timeout=max(phase_s, 60), every=0.5)
                rebalance_s = round(time.monotonic() - added_at, 1) if rebalanced else None
            except TimeoutError:
                rebalance_s = None
            time.sleep(max(0.0, phase_s - (time.monotonic() - added_at)))
            load.stop.set()
            for thread in load.threads:
                thread.join(60)
            after_add = replicas_by_node(cluster)
            status_after_add = ray_serve.status().applications["cluster"].status.value
            stored = stored_pairs(url)
        finally:
            if cluster is not None:
                cluster.close()
    failures = [t for t in load.failures if t >= fault_at]
    return {
        "clients": clients, "phase_s": phase_s, "placed": placed, "after_fault": after_fault,
        "status_after_fault": status_after_fault, "dead_s": dead_s,
        "healthy_s": healthy_s, "after_add": after_add,
        "status_after_add": status_after_add, "rebalance_s": rebalance_s,
        "counts": {phase: dict(c) for phase, c in load.counts.items()},
        "failed_after_fault": len(failures),
        "failure_window_s": [round(failures[0] - fault_at, 1), round(failures[-1] - fault_at, 1)] if failures else [],
        "failed_before_fault": len([t for t in load.failures if t < fault_at]),
        "acknowledged": len(load.acknowledged), "lost": len(load.acknowledged - stored),
        "stored_after_error": len(load.refused & stored), "refused": len(load.refused),
    }


def gcs_outage(cluster: TestCluster, load: Any, phase_s: float, url: str) -> dict[str, Any]:
    """The head's GCS (the cluster's control plane) killed for `phase_s` and started again on its port; the
    cluster runs with GCS fault tolerance (RAY_REDIS_ADDRESS: its tables live in Redis). Returns the calls
    that failed while it was down and after, the replicas and app status after, feedback lost."""
    from bench_faults import stored_pairs
    from ray import serve as ray_serve

    before = replicas_by_node(cluster)
    down_at = load.enter("GCS down")
    cluster.cluster.head_node.kill_gcs_server()
    time.sleep(phase_s)
    up_at = load.enter("GCS restarted")
    cluster.cluster.head_node.start_gcs_server()
    status = wait_for(lambda: ray_serve.status().applications["cluster"].status.value == "RUNNING",
                      "the app RUNNING after the GCS restart", timeout=120, every=0.5)
    running_s = round(time.monotonic() - up_at, 1) if status else None
    time.sleep(phase_s)
    load.stop.set()
    for thread in load.threads:
        thread.join(60)
    stored = stored_pairs(url)
    down = [t for t in load.failures if down_at <= t < up_at]
    return {
        "fault": "gcs", "phase_s": phase_s, "before": before, "after": replicas_by_node(cluster),
        "running_after_restart_s": running_s, "counts": {phase: dict(c) for phase, c in load.counts.items()},
        "failed_while_down": len(down), "failed_after_restart": len([t for t in load.failures if t >= up_at]),
        "failed_before": len([t for t in load.failures if t < down_at]),
        "acknowledged": len(load.acknowledged), "lost": len(load.acknowledged - stored),
        "stored_after_error": len(load.refused & stored),
    }


# ----------------------------------------------------------------------------------------------- tuning

def tune(out: Path, *, fault: bool, epochs: int, per_user: int, replace_after_s: float) -> dict[str, Any]:
    """tune/sweep_vrm.py, as its own driver process joining this cluster: two configurations, each a Train run
    of one worker pinned to a worker node (so one trial on each). With `fault`: once both runs have a
    checkpoint, a worker node is removed (a replacement added `replace_after_s` later; never if < 0). The
    trial there resumes its Train run from its checkpoint (FailureConfig of Train, then of Tune)."""
    import subprocess

    import yaml
    from rewardprism.config import load_config
    from rewardprism.recipes.vrm import VrmConfig, steps_per_epoch
    from rewardprism.train_data import prepare_data

    recipe = ROOT / "configs" / "vrm_tiny.yaml"
    overrides = [f"data.synthetic_per_user={per_user}", f"train.epochs={epochs}", "ray.num_workers=1",
                 "train.log_every=5", "train.eval_every=5", "train.checkpoint_every=5",
                 f"ray.worker_resources={{{WORKER}: 1}}"]
    config = load_config(VrmConfig, recipe, overrides)
    max_t = epochs * steps_per_epoch(config, len(prepare_data(config.data, config.model).train))
    sweep = {"recipe": str(recipe), "overrides": overrides,
             "samples": 2, "seeds": 1, "space": {"model.lam": {"loguniform": [0.1, 1.0]}},
             "asha": {"grace_period": max_t, "reduction_factor": 2},  # no early stopping: every trial runs out
             "run": {"name": "cluster-sweep", "storage_path": str(out / "tune"), "max_concurrent_trials": 2}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    experiment = out / "tune" / "cluster-sweep"
    cluster = TestCluster()
    start = time.time()
    fault_at = replaced_at = None
    try:
        env = {**os.environ, "RAY_ADDRESS": cluster.cluster.address}
        with open(out / "sweep.log", "w") as log:
            proc = subprocess.Popen([sys.executable, str(ROOT / "tune" / "sweep_vrm.py"), "--config",
                                     str(out / "sweep.yaml")], cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
            if fault:
                wait_for(lambda: proc.poll() is not None or len(list(
                    experiment.glob("train/*/checkpoint_manager_snapshot.json"))) >= 2,
                    "a checkpoint of both trials' Train runs", every=0.05)
                if proc.poll() is not None:
                    raise RuntimeError(f"sweep_vrm.py exited early: {(out / 'sweep.log').read_text()[-3000:]}")
                fault_at, replaced_at = cluster.fail(cluster.nodes[0].node_id, replace_after_s)
            code = proc.wait(timeout=900)
        done = time.time()
    finally:
        cluster.close()
    if code != 0:
        raise RuntimeError(f"sweep_vrm.py exited {code}: {(out / 'sweep.log').read_text()[-3000:]}")
    rows = json.loads((experiment / "results.json").read_text())
    return {
        "fault": fault, "exit_code": code, "trials": len(rows), "max_t": max_t,
        "distinct_configs": len({r["config/model.lam"] for r in rows}),
        "final_steps": sorted(r["step"] for r in rows), "start_steps": sorted(r["start_step"] for r in rows),
        "errors": json.loads((experiment / "sweep.json").read_text()).get("errors", {}),
        "replaced_after_s": round(replaced_at - fault_at, 1) if replaced_at else None,
        "after_fault_s": round(done - fault_at, 1) if fault else None, "wall_s": round(done - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenario", choices=["train", "embed", "serve", "tune", "gcs"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-fault", dest="fault", action="store_false")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--per-user", type=int, default=40)
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--hold-step", type=int, default=6)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--replace-after-s", type=float, default=0.0, help="< 0: no replacement node")
    parser.add_argument("--shard-size", type=int, default=8, help="embed")
    parser.add_argument("--shards-per-actor", type=int, default=4, help="embed")
    parser.add_argument("--fault-after", type=int, default=3, help="embed: shards written before the fault")
    parser.add_argument("--clients", type=int, default=4, help="serve")
    parser.add_argument("--phase-s", type=float, default=20.0, help="serve")
    parser.add_argument("--pg-port", type=int, default=5518, help="serve: its own Postgres cluster's port")
    parser.add_argument("--redis", default="127.0.0.1:6379", help="gcs: the Redis that keeps the GCS's tables")
    args = parser.parse_args()
    if args.scenario == "train":
        result = train(args.out, fault=args.fault, epochs=args.epochs, per_user=args.per_user,
                       checkpoint_every=args.checkpoint_every, hold_step=args.hold_step,
                       zero_stage=args.zero_stage, replace_after_s=args.replace_after_s)
    elif args.scenario == "tune":
        result = tune(args.out, fault=args.fault, epochs=args.epochs, per_user=args.per_user,
                      replace_after_s=args.replace_after_s)
    elif args.scenario in ("serve", "gcs"):
        if args.scenario == "gcs":  # GCS fault tolerance: the GCS keeps its tables in Redis, under a namespace
            os.environ["RAY_REDIS_ADDRESS"] = args.redis
            os.environ["RAY_external_storage_namespace"] = namespace = f"rp-cluster-{os.getpid()}"
        try:
            result = serve(args.out, clients=args.clients, phase_s=args.phase_s, pg_port=args.pg_port,
                           fault="node" if args.scenario == "serve" else "gcs")
        finally:
            if args.scenario == "gcs":
                from ray._private.gcs_utils import cleanup_redis_storage

                host, _, port = args.redis.rpartition(":")
                cleanup_redis_storage(host, int(port), "", False, namespace)
    else:
        result = embed(args.out, fault=args.fault, per_user=args.per_user, shard_size=args.shard_size,
                       shards_per_actor=args.shards_per_actor, fault_after=args.fault_after,
                       replace_after_s=args.replace_after_s)
    result["load"] = [round(x, 1) for x in os.getloadavg()]  # 1, 5, 15 min, as the scenario ends
    print(json.dumps(result))


if __name__ == "__main__":
    main()
