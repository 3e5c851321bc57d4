"""The VRM recipe's Ray Train worker: DeepSpeed, Ray Data shards, periodic evaluation, checkpoints, resume.

`TrainingWorker` has torchtune's recipe shape (setup / train / save_checkpoint / cleanup) and receives its parts
(the model's config, the training loop's, whether it runs on GPUs). DeepSpeed's ZeRO stage comes from the
config; bf16 on CUDA, fp32 + gloo on CPU. Ray Train runs `train_loop_per_worker` on every worker.
"""
from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rewardprism.backbone import load_backbone
from rewardprism.config import ConfigError
from rewardprism.data import PreferencePair
from rewardprism.train_data import PairCollator
from rewardprism.vrm import RewardModel, RewardModelConfig

DS_TAG = "deepspeed"  # DeepSpeed's sub-folder inside each Ray checkpoint
EXPORT_DIR = "model"  # the exported model inside the final Ray checkpoint
StepHook = Callable[[int, int, "int | None"], None]  # (step, rank, step resumed from or None) after each step


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule ends there too); None: epochs
    batch_pairs: int = 8  # pairs per worker per micro-batch (2× texts in the forward pass)
    grad_accum: int = 1
    lr: float = 2e-5  # backbone
    head_lr: float = 1e-3  # reward heads, trained from scratch
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    zero_stage: int = 2
    gradient_checkpointing: bool = False
    disable_dropout: bool = False  # TRL's default: on CPU dropout's random masks cost ~30 % of a MiniLM step
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    checkpoint_every: int = 50
    personalize: bool = True  # final evaluation: also fit each group's profile on its training pairs

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_pairs", "grad_accum", "log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be a positive integer, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps", f"must be a positive integer or null (all epochs), got {self.max_steps}")
        for name in ("lr", "head_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("weight_decay" if self.weight_decay < 0 else "warmup_steps" if self.warmup_steps < 0
                              else "grad_clip", "must be >= 0")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError("zero_stage", f"must be 0, 1 or 2, got {self.zero_stage} (ZeRO-3 shards the "
                                            "parameters, which the export does not gather yet)")


def ray_dataset(pairs: list[PreferencePair], targets: np.ndarray | None):
    """Rows of JSON-encoded pairs (any prompt shape fits one column) and their (2, K) targets."""
    import ray.data

    rows = [{"pair": json.dumps(p.to_row())} for p in pairs]
    if targets is not None:
        for row, t in zip(rows, targets):
            row["targets"] = t
    return ray.data.from_items(rows)


def deepspeed_config(train: TrainConfig, *, world_size: int, cuda: bool) -> dict[str, Any]:
    """DeepSpeed's config from ours. torch's AdamW: DeepSpeed's fused and CPU Adams are compiled ops."""
    return {
        "train_micro_batch_size_per_gpu": train.batch_pairs,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_pairs * train.grad_accum * world_size,
        "optimizer": {"type": "AdamW", "params": {"lr": train.lr, "weight_decay": train.weight_decay,
                                                  "torch_adam": True}},
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": cuda},
        "steps_per_print": 10 ** 9,
    }


def skip_cpu_inference_ops() -> None:
    """DeepSpeed's comm backend builds its shared-memory all-reduce op on every CPU start (a C++ compile of about
    100 CPU-s wherever the torch extensions cache is cold: a new machine, container or user). Only inference's
    all-reduce uses it; training reduces through torch.distributed (gloo). Marked unavailable, it is never built."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout layer of the model set to p = 0 (attention's too: HF passes `dropout.p` to SDPA)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def param_groups(model: RewardModel, train: TrainConfig) -> list[dict[str, Any]]:
    """The optimizer's groups: the backbone at `lr` (left out when frozen), the heads, trained from scratch, at
    `head_lr`."""
    head_params = {id(p) for p in model.heads.parameters()}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in head_params],
               "lr": train.lr},
              {"params": list(model.heads.parameters()), "lr": train.head_lr}]
    return [g for g in groups if g["params"]]


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over `warmup` steps, then linear decay to 0 at `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


class TrainingWorker:
    """The loop each Ray Train worker runs, in torchtune's recipe shape: setup, train, save_checkpoint, cleanup.

    A step is one optimizer step (`grad_accum` micro-batches). Every `checkpoint_every` steps all ranks save
    their DeepSpeed state (rank 0 the weights, each rank its ZeRO partition) and report it; Ray merges the
    files into one checkpoint. After a failure the worker group restarts from the latest one, skipping the
    batches of the interrupted epoch that the checkpoint had already seen.
    """

    def __init__(self, *, model: RewardModelConfig, train: TrainConfig, use_gpu: bool, steps_per_epoch: int,
                 total_steps: int, tensorboard_dir: str, final_eval: bool, on_step: StepHook | None = None):
        self.model_config, self.train_config, self.use_gpu = model, train, use_gpu
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.tensorboard_dir, self.final_eval, self.on_step = tensorboard_dir, final_eval, on_step

    def setup(self) -> None:
        import deepspeed
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        train, cuda = self.train_config, self.use_gpu
        torch.manual_seed(train.seed)  # same heads on every rank (DeepSpeed also broadcasts rank 0's)
        if not cuda:
            skip_cpu_inference_ops()
        backbone = load_backbone(self.model_config.backbone, device=ray.train.torch.get_device(),
                                 dtype=torch.bfloat16 if cuda else torch.float32,
                                 max_length=self.model_config.max_length)
        if train.gradient_checkpointing:
            backbone.model.gradient_checkpointing_enable()
        model = RewardModel(self.model_config, backbone).train()
        if train.disable_dropout:
            disable_dropout(model)
        schedule = linear_schedule(train.warmup_steps, self.total_steps)
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, train),
            config=deepspeed_config(train, world_size=self.world, cuda=cuda),
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule))
        self.collate = PairCollator(backbone, model.is_vrm, model.config.prompt_max_length)
        self.step, self.resumed_from = 0, None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                _, client_state = self.engine.load_checkpoint(folder, tag=DS_TAG)
            self.step = self.resumed_from = int(client_state["step"])
        self.writer = None
        if self.rank == 0:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(self.tensorboard_dir)

    def train(self) -> None:
        import ray.train

        cfg = self.train_config
        shard = ray.train.get_dataset_shard("train")
        self.window = LogWindow()
        while self.step < self.total_steps:
            epoch, done = divmod(self.step, self.steps_per_epoch)
            # Iterate the whole shard: every split of an epoch is consumed before the next epoch starts.
            for micro, batch in enumerate(shard.iter_batches(batch_size=cfg.batch_pairs, batch_format="numpy",
                                                             drop_last=True)):
                if micro < done * cfg.grad_accum or micro >= self.steps_per_epoch * cfg.grad_accum:
                    continue  # seen before the checkpoint we resumed from, or a partial accumulation
                inputs = self.collate(batch)
                out = self.engine(**inputs)
                self.engine.backward(out["loss"])
                self.engine.step()
                self.window.add(out, inputs, cfg.grad_accum)
                if (micro + 1) % cfg.grad_accum:
                    continue
                self.step += 1
                self.window.steps += 1
                if self.on_step is not None:
                    self.on_step(self.step, self.rank, self.resumed_from)
                if self.step == self.total_steps:
                    break  # `finish` logs, evaluates and exports the last step
                if self.step % cfg.log_every and self.step % cfg.eval_every and self.step % cfg.checkpoint_every:
                    continue
                metrics = {**self.train_metrics(epoch), **(self.evaluate() if self.step % cfg.eval_every == 0
                                                           else {})}
                self.write_tensorboard(metrics)
                if self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint(metrics)
                else:
                    ray.train.report(metrics)
        self.finish()

    def train_metrics(self, epoch: int) -> dict[str, float]:
        """Means over the log window and cluster-wide tokens/s, summed over ranks in one small all-reduce."""
        totals, seen = self._all_reduce(self.window.totals()), self.window.seen
        self.window = LogWindow()
        *sums, steps, tokens, seconds = totals.tolist()  # steps and seconds: sums over ranks
        means = dict(zip(LogWindow.TERMS, (s / max(steps, 1) for s in sums)))
        metrics = {"step": self.step, "epoch": epoch, "start_step": self.resumed_from or 0,
                   "lr": self.engine.get_lr()[0], "tokens_per_s": tokens / max(seconds / self.world, 1e-9),
                   **{f"train_{k}": v for k, v in means.items() if k in seen}}
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Pairwise accuracy and BT loss at the posterior means, over every rank's share of the eval split."""
        import ray.train

        model = self.engine.module
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        with torch.no_grad():
            for batch in ray.train.get_dataset_shard("eval").iter_batches(batch_size=2 * self.train_config.batch_pairs,
                                                                           batch_format="numpy"):
                out = model(**self.collate(batch))
                margin = (out["rewards_chosen"] - out["rewards_rejected"]).double().cpu()  # (B,)
                totals += torch.stack([-F.logsigmoid(margin).sum(), (margin > 0).sum(), torch.tensor(len(margin))])
        model.train()
        loss, correct, count = self._all_reduce(totals).tolist()
        return {"eval_loss": loss / max(count, 1), "eval_accuracy": correct / max(count, 1)}

    def population_weights(self) -> torch.Tensor:
        """The average posterior E[w | x] over the training prompts: the exported head set's default profile."""
        import ray.train

        model = self.engine.module
        model.eval()
        k = len(model.default_weights)
        totals = torch.zeros(k + 1, dtype=torch.float64)
        with torch.no_grad():
            for batch in ray.train.get_dataset_shard("train").iter_batches(batch_size=4 * self.train_config.batch_pairs,
                                                                            batch_format="numpy"):
                inputs = self.collate(batch)
                weights = model.expected_weights(model.backbone(inputs["prompt_ids"], inputs["prompt_mask"]))
                totals += torch.cat([weights.double().sum(0).cpu(), torch.tensor([len(weights)])])
        model.train()
        totals = self._all_reduce(totals)
        return totals[:k] / totals[k]

    def finish(self) -> None:
        """The final checkpoint, with the exported model (rank 0) next to the DeepSpeed state. The held-out split
        is evaluated here only when the driver will not evaluate the export (`final_eval`: a Tune trial)."""
        epoch = max(self.step - 1, 0) // self.steps_per_epoch
        metrics = {**self.train_metrics(epoch), **(self.evaluate() if self.final_eval else {})}
        self.write_tensorboard(metrics)
        model = self.engine.module
        if model.is_vrm:
            model.default_weights.copy_(self.population_weights())
        self.save_checkpoint(metrics, export=True)

    def save_checkpoint(self, metrics: dict[str, float], export: bool = False) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as folder:
            self.engine.save_checkpoint(folder, tag=DS_TAG, client_state={"step": self.step})
            if export and self.rank == 0:
                self.engine.module.save_pretrained(Path(folder) / EXPORT_DIR)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def write_tensorboard(self, metrics: dict[str, float]) -> None:
        if self.writer is None:
            return
        for key, value in metrics.items():
            if key not in ("step", "epoch", "start_step"):
                self.writer.add_scalar(key, value, self.step)
        self.writer.flush()

    def cleanup(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def _all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (on the engine's device: NCCL reduces CUDA tensors only)."""
        import torch.distributed as dist

        values = values.to(self.engine.device)
        if dist.is_initialized():
            dist.all_reduce(values)
        return values.cpu()


class LogWindow:
    """Loss terms, tokens and time since the last log line, on one rank."""

    TERMS = ("loss", "bt", "kl_w", "kl_z", "sup", "center")

    def __init__(self):
        self.sums = dict.fromkeys(self.TERMS, 0.0)
        self.seen: set[str] = set()
        self.steps, self.tokens, self.start = 0, 0, time.perf_counter()

    def add(self, out: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], grad_accum: int) -> None:
        for key in self.TERMS:
            if key in out:
                self.sums[key] += out[key].item() / grad_accum
                self.seen.add(key)
        self.tokens += sum(int(inputs[k].sum()) for k in ("attention_mask", "prompt_mask") if k in inputs)

    def totals(self) -> torch.Tensor:
        """[term sums..., steps, tokens, seconds] as one float64 vector, ready to sum over ranks."""
        return torch.tensor([*self.sums.values(), self.steps, self.tokens, time.perf_counter() - self.start],
                            dtype=torch.float64)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker: `loop_config` holds `TrainingWorker`'s keyword arguments."""
    worker = TrainingWorker(**loop_config)
    worker.setup()
    worker.train()
    worker.cleanup()
