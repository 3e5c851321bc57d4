"""VRM vs BT training-step time, side by side, and training throughput with 1 vs 2 Ray workers (issue 5).

    python bench/bench_vrm.py [--steps 10] [--batch-pairs 8] [--max-length 256] [--scaling-steps 12]

Step time: the same backbone weights (MiniLM, fully fine-tuned), the same batch of pairs, one training step
each — forward (chosen and rejected in one pass; for VRM also the prompts, without gradient), backward,
AdamW step. VRM and BT steps alternate (VB VB ...) so machine noise hits both alike; medians count. Two
batches: synthetic pairs (short prompts) and HH-RLHF harmless (long multi-turn prompts, the worst case for
VRM's extra prompt pass). Target: VRM ≤ 1.15 × BT.

Throughput: the real recipe (`rewardprism.recipes.vrm.run`, DeepSpeed ZeRO-2, gloo) with 1 and then 2 workers of 1 CPU
each, the same steps per worker; tokens/s counts real (unpadded) tokens read by all workers over the training
steps (start-up and evaluation excluded).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section
from rewardprism.backbone import load_backbone
from rewardprism.config import load_config
from rewardprism.data import iter_pairs
from rewardprism.recipes.vrm import VrmConfig, run
from rewardprism.synthetic import SyntheticGenerator
from rewardprism.train_data import PairCollator
from rewardprism.vrm import RewardModel, RewardModelConfig

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def make_model(kind: str, max_length: int) -> RewardModel:
    torch.manual_seed(0)
    config = RewardModelConfig(kind=kind, backbone="minilm", max_length=max_length, num_objectives=6, latent_dim=16)
    return RewardModel(config, load_backbone("minilm", device="cpu", max_length=max_length)).train()


def step_times(pairs, steps: int, max_length: int) -> dict[str, float]:
    """Median seconds per training step of VRM and BT on one batch, alternating, after one warm-up step each."""
    rows = {"pair": np.array([json.dumps(p.to_row()) for p in pairs], dtype=object)}
    runs = {}
    for kind in ("vrm", "bt"):
        model = make_model(kind, max_length)
        runs[kind] = (model, torch.optim.AdamW(model.parameters(), lr=1e-5),
                      PairCollator(model.backbone, model.is_vrm, model.config.prompt_max_length)(rows))
    times: dict[str, list[float]] = {kind: [] for kind in runs}
    for i in range(steps + 1):
        for kind, (model, optimizer, batch) in runs.items():
            start = time.perf_counter()
            optimizer.zero_grad()
            model(**batch)["loss"].backward()
            optimizer.step()
            if i:  # the first step of each is the warm-up
                times[kind].append(time.perf_counter() - start)
    vrm_batch = runs["vrm"][2]
    return {"vrm_s": statistics.median(times["vrm"]), "bt_s": statistics.median(times["bt"]),
            "pair_tokens": int(vrm_batch["attention_mask"].sum()), "prompt_tokens": int(vrm_batch["prompt_mask"].sum())}


def throughput(workers: int, steps: int, batch_pairs: int, max_length: int) -> dict[str, float]:
    """tokens/s of the real recipe over `steps` optimizer steps per worker (one epoch, no evaluation between)."""
    n_train = steps * batch_pairs * workers
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(VrmConfig, ROOT / "configs" / "vrm_tiny.yaml", [
            "model.backbone=minilm", f"model.max_length={max_length}", "train.epochs=1",
            f"train.batch_pairs={batch_pairs}", "train.lr=1.0e-5", "train.log_every=1000000",
            "train.eval_every=1000000", "train.checkpoint_every=1000000", "train.personalize=false",
            f"data.synthetic_per_user={int(np.ceil(n_train / 4 / 0.75)) + 2}",
            f"ray.num_workers={workers}", f"ray.storage_path={tmp}", f"ray.name=bench-{workers}"])
        metrics = run(config)
    return {"tokens_per_s": metrics["train"]["tokens_per_s"], "steps": metrics["train"]["step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model and batch")
    parser.add_argument("--batch-pairs", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the step-time comparison")
    parser.add_argument("--scaling-steps", type=int, default=12, help="optimizer steps per worker, 1 vs 2 workers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    batches = {"synthetic": SyntheticGenerator(0).dataset(args.batch_pairs)[::4][:args.batch_pairs],
               "HH-RLHF harmless": list(itertools.islice(iter_pairs(HH, skip_bad_rows=True), args.batch_pairs))}
    steps = {name: step_times(pairs, args.steps, args.max_length) for name, pairs in batches.items()}
    scaling = {w: throughput(w, args.scaling_steps, args.batch_pairs, args.max_length) for w in (1, 2)}

    lines = ["| batch | pair tokens | prompt tokens | BT step (s) | VRM step (s) | VRM / BT |", "|---" * 6 + "|"]
    for name, r in steps.items():
        lines.append(f"| {name} | {r['pair_tokens']} | {r['prompt_tokens']} | {r['bt_s']:.3f} | {r['vrm_s']:.3f} "
                     f"| **{r['vrm_s'] / r['bt_s']:.3f}** |")
    scale = ["| Ray workers (1 CPU each) | steps per worker | tokens/s |", "|---" * 3 + "|"]
    for w, r in scaling.items():
        scale.append(f"| {w} | {r['steps']} | {r['tokens_per_s']:,.0f} |")
    speedup = scaling[2]["tokens_per_s"] / scaling[1]["tokens_per_s"]
    step_note = (f"MiniLM fully fine-tuned, {args.batch_pairs} pairs per step, max_length {args.max_length}, "
                 f"{args.threads} torch thread(s), median of {args.steps} alternating steps after a warm-up. "
                 "Target: VRM / BT ≤ 1.15.")
    scale_note = (f"Recipe throughput (DeepSpeed ZeRO-2 on CPU, gloo; synthetic pairs, {args.batch_pairs} pairs "
                  f"per worker per step): 2 workers / 1 worker = **{speedup:.2f}×**.")
    body = "\n".join([step_note, "", *lines, "", scale_note, "", *scale])
    print(body)
    write_section("vrm", "python bench/bench_vrm.py " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    main()
