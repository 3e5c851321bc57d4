"""Faults on a cluster: bench/cluster_faults.py's scenarios in their fuller form, one process each.

    python bench/bench_cluster.py [--baselines 2] [--phase-s 20] [--work DIR] [--no-write]

A head and two worker nodes (`ray.cluster_utils.Cluster`, real raylets on this machine); in each scenario one
worker node is removed outright. Training runs the fault run next to `--baselines` uninterrupted runs of the
same recipe (their spread is the noise a resumed run's accuracy is judged against); embedding loses a node
mid-window with a replacement coming 5 s later; serving and the sweep as in cluster_faults.py. Writes the
section "Faults on a cluster" of BENCHMARKS.md and the same table into docs/deploy.md.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench")]
from report import write_section  # noqa: E402

SECTION = "Faults on a cluster"
DEPLOY = ROOT / "docs" / "deploy.md"


def scenario(name: str, out: Path, *args: str) -> dict:
    """Run one scenario in its own process, or reuse its result from an earlier run into the same `--work`."""
    saved = out.with_suffix(".json")
    if saved.exists():
        return json.loads(saved.read_text())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)])}
    env.pop("RAY_ADDRESS", None)
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "cluster_faults.py"), name, "--out", str(out),
                               *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                              timeout=1800, check=False)
    if proc.returncode:
        raise SystemExit(f"{name} {' '.join(args)} failed; see {out.with_suffix('.log')}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    saved.write_text(json.dumps(result))
    print(name, json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baselines", type=int, default=2, help="uninterrupted training runs")
    parser.add_argument("--phase-s", type=float, default=20.0, help="serving: seconds per phase")
    parser.add_argument("--redis", default="127.0.0.1:6379", help="the head case: a Redis for the GCS's tables")
    parser.add_argument("--work", type=Path, help="folder of the runs; the results of a run there are reused")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave the files alone")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    work.mkdir(parents=True, exist_ok=True)

    train = scenario("train", work / "train-fault")
    baselines = [scenario("train", work / f"train-{i}", "--no-fault") for i in range(args.baselines)]
    embed = scenario("embed", work / "embed", "--per-user", "100", "--replace-after-s", "5")
    serve = scenario("serve", work / "serve", "--phase-s", str(args.phase_s))
    tune = scenario("tune", work / "tune", "--epochs", "6")
    host, _, port = args.redis.rpartition(":")
    try:  # the head case needs a Redis for the GCS's tables; without one its row says so
        socket.create_connection((host, int(port)), timeout=2).close()
        redis_up = True
    except OSError:
        redis_up = False
    gcs = scenario("gcs", work / "gcs", "--phase-s", str(args.phase_s), "--redis", args.redis) if redis_up else None

    base_acc = [b["accuracy"] for b in baselines]
    moved = serve["counts"].get("node removed", {})
    calls = sum(moved.values())
    failed = serve["failed_after_fault"]
    window = "–".join(f"{t:g}" for t in serve["failure_window_s"]) or "none"
    rows = [
        ("a worker node removed during training (train_vrm.py recipe, ZeRO-2, 2 workers on 2 nodes)",
         f"{train['recovery_s']:g} s to the first resumed step (replacement node up after "
         f"{train['replaced_after_s']:g} s)",
         "—", f"{train['steps_redone']} of {train['total_steps']} steps (resumed from step {train['start_step']})",
         "0 (final step {}; accuracy {:.3f} vs uninterrupted {})".format(
             train["final_step"], train["accuracy"], ", ".join(f"{a:.3f}" for a in base_acc))),
        ("a worker node removed during embedding (Ray Data actor pool, 1 actor per node)",
         f"finished {embed['after_fault_s']:g} s after the fault (replacement after {embed['replaced_after_s']:g} s)",
         "—", f"in-flight shards of the window (fault after shard {embed['written_at_fault']} of "
              f"{embed['shards']}); 0 shards written twice",
         f"0 ({embed['pairs_in_output']} pairs, each once; shards equal a local run: "
         f"{embed['shards_equal_local']})"),
        ("a worker node removed under scoring + feedback load (config.yaml's app: 2 Ingress + 2 Embedder, "
         "spread 1 of each per node; HeadOnly proxy)",
         f"node seen dead {serve['dead_s']:g} s after the fault; last failed call at "
         f"{serve['failure_window_s'][-1] if failed else 0:g} s; app healthy again (2 replicas each, RUNNING) "
         + (f"at {serve['healthy_s']:g} s; " if serve["healthy_s"] is not None
            else f"not within {3 * serve['phase_s']:g} s; ")
         + (f"replicas back on a new node {serve['rebalance_s']} s after it joined" if serve["rebalance_s"]
            else "replicas stay where they are when a node joins (no rebalance)"),
         f"{failed} of {calls} calls ({window} s after the fault)", "—",
         f"{serve['lost']} feedback rows of {serve['acknowledged']} acknowledged"),
        ("a worker node removed during a sweep (tune/sweep_vrm.py, 2 trials, 1 Train worker each)",
         f"sweep finished {tune['after_fault_s']:g} s after the fault",
         "—", f"steps after the last checkpoint of the trial on the node (resumed from step "
              f"{max(tune['start_steps'])} of {tune['max_t']})",
         f"0 ({tune['trials']} trials, {tune['distinct_configs']} configurations, each reported once; "
         f"errors: {len(tune['errors'])})"),
    ]
    if gcs is None:
        rows.append(("the head's GCS", f"not run: no Redis at {args.redis}", "", "", ""))
    else:
        rows.append((
         "the head's GCS (killed, restarted on its port after {:g} s; GCS fault tolerance: tables in Redis)"
         .format(gcs["phase_s"]),
         f"app RUNNING {gcs['running_after_restart_s']} s after the restart; replicas "
         + ("where they were" if gcs["before"] == gcs["after"] else f"moved: {gcs['before']} → {gcs['after']}"),
         f"{gcs['failed_while_down']} of {sum(gcs['counts'].get('GCS down', {}).values())} calls while it was "
         f"down, {gcs['failed_after_restart']} after", "none",
         f"{gcs['lost']} feedback rows of {gcs['acknowledged']} acknowledged"))
    loads = [train, *baselines, embed, serve, tune, *([gcs] if gcs else [])]
    table = ("| fault | recovery | requests failed | work redone | data lost |\n"
             "|---|---|---|---|---|\n" + "\n".join("| " + " | ".join(r) + " |" for r in rows))
    load_note = ("Load average (1 min) as each scenario ended: " + ", ".join(
        f"{name} {r['load'][0]:.1f}" for name, r in zip(
            ["training (fault)", *[f"training (uninterrupted {i + 1})" for i in range(len(baselines))],
             "embedding", "serving", "tuning", "GCS"], loads)))
    serve_note = (f"Serving: {args.phase_s:g} s phases, 4 closed-loop clients (score, then one feedback pair); "
                  f"app status {args.phase_s:g} s after the fault: {serve['status_after_fault']}, after a node joined: "
                  f"{serve['status_after_add']}; replicas by node: before {serve['placed']}, after the fault "
                  f"{serve['after_fault']}, after a node joined {serve['after_add']}.")
    body = (
        "A head and two worker nodes from `ray.cluster_utils.Cluster` (real raylets, each with its own object "
        "store, on this one machine); the work asks for the custom resource `rp_worker` that only worker nodes "
        "have; `remove_node(allow_graceful=False)` kills a worker node outright. Shared storage is a local "
        "folder.\n\n" + table + "\n\n" + load_note + " (other work on the machine). " + serve_note
        + f" Training accuracy is on {train['eval_pairs']} held-out pairs (one pair is "
        f"{1 / train['eval_pairs']:.3f}): the resumed run is "
        f"{round(abs(train['accuracy'] - base_acc[0]) * train['eval_pairs'])} pair(s) off the first uninterrupted "
        f"one; the uninterrupted runs {'agree with each other' if len(set(base_acc)) == 1 else 'differ too'}. "
        "A resumed run is not bit-identical to an uninterrupted one: its workers seed their random draws (the "
        "VRM's latent samples) again at the resume instead of continuing them; a few pairs either way is the "
        "noise to expect at this size."
    )
    print(body)
    if not args.no_write:
        command = "python bench/bench_cluster.py " + " ".join(sys.argv[1:])
        write_section(SECTION, command, body)
        write_section(SECTION, command, body, path=DEPLOY)


if __name__ == "__main__":
    main()
