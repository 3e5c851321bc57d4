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
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")  # a busy 2-core machine starts raylets slowly

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

WORKER = "rp_worker"  # the custom resource of worker nodes: what the work under test asks for


class TestCluster:
    """A head (no `rp_worker`) and `workers` worker nodes, each with `rp_worker: 1` and `worker_cpus` CPUs."""

    def __init__(self, workers: int = 2, worker_cpus: int = 1, head_cpus: int = 2):
        address_file = Path(ray._private.utils.get_ray_address_file(None))
        before = address_file.read_text() if address_file.exists() else None
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus,
                                                                     "include_dashboard": False})
        # Cluster records its address for `ray.init()` to join: other jobs on this machine must not join ours
        if before is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(before)
        self.worker_cpus = worker_cpus
        self.nodes = [self.add() for _ in range(workers)]
        ray.init(address=self.cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})

    def add(self):
        return self.cluster.add_node(num_cpus=self.worker_cpus, resources={WORKER: 1},
                                     object_store_memory=150 * 1024 ** 2)

    def remove(self, node_id: str) -> float:
        """Kill the node `node_id` outright (no graceful shutdown); returns when it went."""
        node = next(n for n in self.cluster.worker_nodes if n.node_id == node_id)
        self.nodes.remove(node)
        went = time.time()
        self.cluster.remove_node(node, allow_graceful=False)
        return went

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
            fault_at = cluster.remove((out / "held.0").read_text())
            time.sleep(replace_after_s)
            cluster.add()
            replaced_at = time.time()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenario", choices=["train"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-fault", dest="fault", action="store_false")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--per-user", type=int, default=40)
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--hold-step", type=int, default=6)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--replace-after-s", type=float, default=0.0)
    args = parser.parse_args()
    result = train(args.out, fault=args.fault, epochs=args.epochs, per_user=args.per_user,
                   checkpoint_every=args.checkpoint_every, hold_step=args.hold_step,
                   zero_stage=args.zero_stage, replace_after_s=args.replace_after_s)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
