"""Losing a node on a real multi-node Ray cluster (bench/cluster_faults.py: a head and two worker nodes, each a
real raylet, via `ray.cluster_utils.Cluster`). Each scenario runs in a process of its own, because a process
joins one Ray cluster and this session's tests share another (conftest.py); it prints its measurements as
JSON. The reduced forms run here; bench/bench_cluster.py runs the fuller ones and writes the tables.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rewardprism.config import ConfigError, load_config
from rewardprism.recipes.vrm import VrmConfig

ROOT = Path(__file__).resolve().parents[1]


def scenario(name: str, out: Path, *args: str, timeout: float = 600) -> dict:
    """Run one scenario of bench/cluster_faults.py; its last line of output is the JSON of its measurements."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)])}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "cluster_faults.py"), name, "--out", str(out),
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_worker_resources_are_custom_resources_named_in_errors():
    tiny = ROOT / "configs" / "vrm_tiny.yaml"
    assert load_config(VrmConfig, tiny, ["ray.worker_resources={trainer: 1}"]).ray.worker_resources == {"trainer": 1}
    for bad, field in (("{CPU: 1}", "ray.worker_resources.CPU"), ("{trainer: 0}", "ray.worker_resources.trainer"),
                       ("{trainer: x}", "ray.worker_resources.trainer: must be float")):
        with pytest.raises(ConfigError, match=f"^{field}"):
            load_config(VrmConfig, tiny, [f"ray.worker_resources={bad}"])


def test_training_resumes_from_its_checkpoint_when_a_node_goes_away(tmp_path):
    """train_vrm.py's recipe, ZeRO-2, one worker on each worker node. At step 3 (after the step-2 checkpoint)
    rank 0's node is removed and a replacement added: FailureConfig restarts both workers from the step-2
    checkpoint (every rank's optimizer partition in it), so only step 3 is redone and the run finishes."""
    result = scenario("train", tmp_path, "--epochs", "1", "--checkpoint-every", "2", "--hold-step", "3")
    total = result["total_steps"]
    assert result["final_step"] == total and result["start_step"] == 2 and result["first_resumed_step"] == 3
    assert result["steps_redone"] == 1 and result["steps_run"] == total + 1
    assert result["checkpoint_steps"][0] == 2 and 4 in result["checkpoint_steps"]  # 4: after the resume
    assert result["optimizer_partitions"] == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    assert result["accuracy"] > 0.5


def test_embedding_finishes_on_the_remaining_node_with_every_pair_once(tmp_path):
    """embed_pairs_ray, one actor on each worker node, 100 pairs in shards of 8 (windows of 8 shards). A worker
    node is removed once 3 shards are written (the rest of the window in flight) and none replaces it: the run
    finishes on the other node; every pair is in the folder once, in order, and every shard equals a
    fault-free local run's."""
    result = scenario("embed", tmp_path, "--per-user", "25", "--fault-after", "3", "--replace-after-s", "-1")
    assert 3 <= result["written_at_fault"] < 8  # the fault came inside the first window
    assert result["pairs_in_output"] == result["distinct_pairs"] == result["pairs"] == 100
    assert result["pairs_equal_input"] and result["index_equal_local"] and result["shards_equal_local"]
    assert result["shards"] == result["shard_files"] == 13
