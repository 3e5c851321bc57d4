"""Pieces of the reward-model training recipe (`train_vrm.py`): config, data, the Ray Train worker, evaluation.

- Config: YAML → `RecipeConfig` dataclasses; unknown fields, wrong types and bad values fail on the driver
  with the dotted field name, before any cluster starts.
- Data: preference pairs → train/eval split by prompt → optional supervision targets (attribute ratings, or
  standardized DRM head scores) → Ray Datasets of JSON rows. Texts are rendered and tokenized in the worker,
  per batch (`PairCollator`), so the driver never loads the backbone.
- `TrainingWorker`: one Ray Train worker (torchtune recipe shape: setup / train / save_checkpoint / cleanup):
  DeepSpeed (ZeRO stage from the config; bf16 on CUDA, fp32 + gloo on CPU), Ray Data shards, periodic
  evaluation (pairwise accuracy), `ray.train.report` with DeepSpeed checkpoints, resume from the latest one.
- `evaluate_model`: held-out accuracy per group, per-user personalized accuracy over the exported head set,
  and objective/attribute correlations, on the driver with the exported model.
- `TrainRecipe` / `run`: the driver, shared by `train_vrm.py` and `rewardprism train`: check everything,
  `TorchTrainer.fit`, export the final model folder and head set, evaluate.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from rewardprism.backbone import Backbone, load_backbone
from rewardprism.data import DataError, PreferencePair, render, render_prompt, split_by_prompt
from rewardprism.embed import EmbeddingExtractor
from rewardprism.vrm import CONFIG_FILE, ConfigError, RewardModel, RewardModelConfig

DS_TAG = "deepspeed"  # DeepSpeed's sub-folder inside each Ray checkpoint
EXPORT_DIR = "model"  # the exported model inside the final Ray checkpoint
METRICS_FILE = "metrics.json"  # final evaluation, next to the exported model
HEADSET_DIR = "headset"  # the exported head set, inside the model folder
log = logging.getLogger(__name__)
StepHook = Callable[[int, int, "int | None"], None]  # (step, rank, step resumed from or None) after each step


# ----------------------------------------------------------------------------------------------- config

@dataclass
class DataConfig:
    source: str = "synthetic"  # 'synthetic', a json/jsonl(.gz)/parquet file or folder, or a hub dataset name
    format: Literal["auto", "canonical", "trl", "hh-rlhf", "alpaca-eval"] = "auto"
    split: str = "train"  # hub split
    limit: int | None = None  # first N pairs of the source
    group: str | None = None  # group of pairs that carry none
    skip_bad_rows: bool = False  # leave out (and log) rows that fail to parse instead of stopping
    synthetic_per_user: int = 200
    seed: int = 0  # synthetic generator and train/eval split
    test_fraction: float = 0.2
    supervision: Literal["none", "ratings", "drm"] = "none"
    drm_heads: str | None = None  # supervision: drm from a head set folder (`rewardprism decompose`) ...
    drm_backbone: str | None = None  # ... or from a DRM fitted here on the training split with this backbone
    drm_head_names: list[str] = field(default_factory=list)  # heads to use; empty: +pc0 ... +pc{K-1}

    def __post_init__(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError("test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        if self.limit is not None and self.limit < 2:
            raise ConfigError("limit", f"must be at least 2 pairs (one to train, one to evaluate), got {self.limit}")
        if self.synthetic_per_user < 1:
            raise ConfigError("synthetic_per_user", f"must be positive, got {self.synthetic_per_user}")
        if self.supervision == "drm" and bool(self.drm_heads) == bool(self.drm_backbone):
            raise ConfigError("drm_heads", "supervision: drm needs either drm_heads (a DRM head set folder) or "
                                           "drm_backbone (fit a DRM on the training split), not both")


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_pairs: int = 8  # pairs per worker per micro-batch (2× texts in the forward pass)
    grad_accum: int = 1
    lr: float = 2e-5  # backbone
    head_lr: float = 1e-3  # reward heads, trained from scratch
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    zero_stage: int = 2
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    checkpoint_every: int = 50
    personalize: bool = True  # final evaluation: also fit each group's profile on its training pairs

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_pairs", "grad_accum", "log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be a positive integer, got {getattr(self, name)}")
        for name in ("lr", "head_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("weight_decay" if self.weight_decay < 0 else "warmup_steps" if self.warmup_steps < 0
                              else "grad_clip", "must be >= 0")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError("zero_stage", f"must be 0, 1 or 2, got {self.zero_stage} (ZeRO-3 shards the "
                                            "parameters, which the export does not gather yet)")


@dataclass
class ClusterConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 1  # worker failures to recover from (from the latest checkpoint)
    resume: bool = False  # continue the run <storage_path>/<name> from its latest checkpoint
    keep_checkpoints: int = 2
    storage_path: str = "~/rewardprism-runs"  # Ray checkpoints and TensorBoard logs (shared storage on clusters)
    name: str = "vrm"  # run name: <storage_path>/<name>

    def __post_init__(self) -> None:
        for name in ("num_workers", "cpus_per_worker", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be a positive integer, got {getattr(self, name)}")
        if self.max_failures < -1:
            raise ConfigError("max_failures", "must be >= 0, or -1 to retry forever")
        if not self.name or "/" in self.name:
            raise ConfigError("name", f"must be a non-empty name without '/', got {self.name!r}")


@dataclass
class RecipeConfig:
    model: RewardModelConfig = field(default_factory=RewardModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: ClusterConfig = field(default_factory=ClusterConfig)
    output_dir: str = ""  # exported model folder; empty: <storage_path>/<name>/model

    @property
    def run_dir(self) -> Path:
        return output_path(self.ray.storage_path, "ray.storage_path") / self.ray.name

    def check_run_dir(self) -> None:
        """Ray continues any run it finds under the same name; make that a choice, not a surprise. The export
        replaces `output_dir`: only an empty folder or an earlier export may be there."""
        if not self.ray.resume and self.run_dir.exists() and any(self.run_dir.glob("checkpoint_*")):
            raise ConfigError("ray.resume", f"{self.run_dir} holds checkpoints of an earlier run: set ray.resume: "
                                            "true to continue it, or choose another ray.name")
        out = self.export_dir
        if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / CONFIG_FILE).exists())):
            raise ConfigError("output_dir", f"{out} exists and is not an exported reward model (no {CONFIG_FILE}); "
                                            "choose a new or empty folder")

    @property
    def export_dir(self) -> Path:
        return output_path(self.output_dir, "output_dir") if self.output_dir else self.run_dir / "model"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RecipeConfig:
    """A YAML file plus `key.sub=value` overrides (values parsed as YAML) → a validated `RecipeConfig`."""
    data = read_config_file(path) if path is not None else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("--override", f"expected key.sub=value, got {item!r}")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"{part} is not a section")
        node[leaf] = yaml.safe_load(value)
    return from_dict(RecipeConfig, data, "")


def output_path(value: str, name: str) -> Path:
    """An output folder as an absolute path. Under `ray job submit --working-dir .` a job runs in Ray's temporary
    copy of that folder, which is deleted with the job: a relative output path there is refused, naming the field,
    instead of writing results that vanish."""
    path = Path(value).expanduser()
    if not path.is_absolute() and "runtime_resources" in Path.cwd().parts:
        raise ConfigError(name, f"{value} is relative, and this job runs in Ray's temporary copy of its working "
                                f"directory ({Path.cwd()}), deleted with the job: give an absolute path (e.g. "
                                "~/rewardprism-runs/... or a volume every node mounts)")
    return path.resolve()


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds; a missing, unreadable or malformed file is an error on --config."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("--config", f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path} must hold a mapping of fields, got {type(data).__name__}")
    return data


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, checking names and types against its annotations."""
    if not isinstance(data, dict):
        raise ConfigError(where or "config", f"must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(name, f"unknown field; {cls.__name__} has {', '.join(names)}")
        kwargs[key] = _check_type(hints[key], value, name)
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # the dataclass names its own field; add the section
        raise ConfigError(f"{where}.{exc.field}" if where else exc.field, exc.message) from None


def _check_type(hint: Any, value: Any, name: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, name)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _check_type(next(a for a in args if a is not type(None)), value, name)
    if origin is Literal:
        if value not in args:
            raise ConfigError(name, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(name, f"must be a list, got {value!r}")
        return [_check_type(args[0], v, f"{name}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(name, f"must be {getattr(hint, '__name__', hint)}, got {value!r}")


# ----------------------------------------------------------------------------------------------- data

@dataclass
class PreparedData:
    """Validated pairs, split by prompt, with (N, 2, K) targets (chosen, rejected) when supervised."""

    train: list[PreferencePair]
    eval: list[PreferencePair]
    train_targets: np.ndarray | None = None
    eval_targets: np.ndarray | None = None


def prepare_data(config: RecipeConfig) -> PreparedData:
    """Everything the driver checks and computes before the cluster starts; errors name the field or row."""
    from rewardprism.cli import load_dataset_arg

    data, model = config.data, config.model
    if data.supervision != "none" and model.lam == 0:
        raise ConfigError("model.lam", f"is 0 with data.supervision: {data.supervision}; set lam > 0 to "
                                       "supervise, or supervision: none for the unsupervised model")
    if data.supervision == "none" and model.lam > 0:
        raise ConfigError("data.supervision", "is none but model.lam > 0: choose ratings or drm")
    pairs = list(load_dataset_arg(data.source, split=data.split, fmt=data.format, limit=data.limit,
                                  group=data.group, synthetic_per_user=data.synthetic_per_user, seed=data.seed,
                                  skip_bad_rows=data.skip_bad_rows))
    if len(pairs) < 2:
        raise DataError(f"needs at least 2 pairs, got {len(pairs)}", source=data.source)
    train_idx, eval_idx = split_by_prompt(pairs, data.test_fraction, data.seed)
    if not train_idx or not eval_idx:
        raise ConfigError("data.test_fraction", f"leaves an empty split of {len(pairs)} pairs; "
                                                "use more pairs or another fraction")
    prepared = PreparedData([pairs[i] for i in train_idx], [pairs[i] for i in eval_idx])
    if data.supervision == "ratings":
        targets = rating_targets(pairs, model.objective_names, data.source)
        if model.sup_loss == "ce" and (targets.min() < 0 or targets.max() > 1):
            raise ConfigError("model.sup_loss", "ce reads ratings as probabilities, but they leave [0, 1]; "
                                                "use mse or rescale the ratings")
    elif data.supervision == "drm":
        targets = drm_targets(pairs, train_idx, data, model)
    else:
        return prepared
    prepared.train_targets, prepared.eval_targets = targets[train_idx], targets[eval_idx]
    return prepared


def rating_targets(pairs: list[PreferencePair], names: list[str], source: str) -> np.ndarray:
    """(N, 2, K) attribute ratings of the chosen and rejected responses, read by objective name."""
    if not names:
        raise ConfigError("model.objective_names", "supervision: ratings needs the K rating attributes to supervise, "
                                                   "e.g. [length, formality, lists, hedging, humour, refusal]")
    out = np.empty((len(pairs), 2, len(names)), dtype=np.float32)
    for i, pair in enumerate(pairs):
        for s, side in enumerate(("chosen", "rejected")):
            ratings = (pair.attributes or {}).get(side)
            if not isinstance(ratings, dict):
                raise DataError("supervision: ratings needs attribute ratings on every pair", source=source, row=i,
                                field=f"attributes.{side}")
            for k, name in enumerate(names):
                value = ratings.get(name)
                if not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise DataError(f"missing or non-finite rating (have {sorted(ratings)})", source=source, row=i,
                                    field=f"attributes.{side}.{name}")
                out[i, s, k] = value
    return out


def drm_targets(pairs: list[PreferencePair], train_idx: list[int], data: DataConfig,
                model: RewardModelConfig) -> np.ndarray:
    """(N, 2, K) standardized scores of K DRM heads: the supervision that needs no ratings.

    The heads come from `data.drm_heads`, or from a DRM (`rewardprism.drm`) fitted on the training pairs only,
    so held-out labels never shape the targets. Responses are embedded once with the head set's backbone (a
    small one, such as MiniLM, serves any VRM backbone: targets are just numbers per response). Each head is
    oriented toward the preference, standardized with the mean and std of the training responses, and for
    `ce` squashed by a sigmoid into a soft label.
    """
    from rewardprism.drm import PreferenceDecomposition, build_head_set
    from rewardprism.heads import HeadSet

    k = model.num_objectives
    names = data.drm_head_names or [f"+pc{i}" for i in range(k)]
    heads = None
    if data.drm_heads:
        try:
            heads = HeadSet.load(data.drm_heads)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError("data.drm_heads", str(exc)) from None
    available = heads.head_names if heads else [f"{sign}pc{i}" for sign in "+-" for i in range(k)]
    missing = [n for n in names if n not in available]
    if len(names) != k or missing:
        raise ConfigError("data.drm_head_names", f"needs {k} (model.num_objectives) heads; missing {missing}, "
                                                 f"available {available}")
    # The text the VRM reads: its max_length, keeping the end (targets the model's features cannot see are noise).
    backbone = load_backbone(heads.backbone if heads else data.drm_backbone, max_length=model.max_length)
    backbone.tokenizer.truncation_side = "left"
    chosen, rejected, _ = EmbeddingExtractor(backbone).embed_pairs(pairs)  # (N, d) each
    if heads is None:
        decomposition = PreferenceDecomposition(k).fit(chosen[train_idx], rejected[train_idx])
        heads = build_head_set(decomposition, backbone=data.drm_backbone)
    columns = [heads.head_names.index(n) for n in names]
    scores = np.stack([heads.scores(chosen)[:, columns], heads.scores(rejected)[:, columns]], axis=1)  # (N, 2, K)
    # A component's sign is arbitrary, and Dirichlet weights are non-negative: orient every target so that the
    # chosen response scores higher on average over the training pairs, so that the reward can use it.
    scores *= np.where((scores[train_idx, 0] - scores[train_idx, 1]).mean(0) < 0, -1.0, 1.0)
    reference = scores[train_idx].reshape(-1, k)
    standardized = (scores - reference.mean(0)) / np.maximum(reference.std(0), 1e-6)
    return (1 / (1 + np.exp(-standardized)) if model.sup_loss == "ce" else standardized).astype(np.float32)


def steps_per_epoch(config: RecipeConfig, n_train: int) -> int:
    """Optimizer steps per epoch: every worker gets n_train // workers pairs and drops its last partial batch."""
    per_step = config.train.batch_pairs * config.train.grad_accum
    steps = n_train // config.ray.num_workers // per_step
    if steps < 1:
        raise ConfigError("train.batch_pairs", f"{n_train} training pairs over {config.ray.num_workers} workers "
                                               f"make no full step of {per_step} pairs; lower batch_pairs or "
                                               "grad_accum, or use more data")
    return steps


def ray_dataset(pairs: list[PreferencePair], targets: np.ndarray | None):
    """Rows of JSON-encoded pairs (any prompt shape fits one column) and their (2, K) targets."""
    import ray.data

    rows = [{"pair": json.dumps(p.to_row())} for p in pairs]
    if targets is not None:
        for row, t in zip(rows, targets):
            row["targets"] = t
    return ray.data.from_items(rows)


class PairCollator:
    """A batch of Ray Data rows → the padded tensors `RewardModel.forward` takes, on the backbone's device."""

    def __init__(self, backbone: Backbone, with_prompts: bool, prompt_max_length: int | None = None):
        self.extractor, self.with_prompts = EmbeddingExtractor(backbone), with_prompts
        self.prompt_max_length = prompt_max_length  # tokens of the prompt alone, for q(w | x)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        pairs = [PreferencePair.from_row(json.loads(row)) for row in batch["pair"]]
        tok = self.extractor.backbone.tokenizer
        texts = [render(p.prompt, p.chosen, tok) for p in pairs] + [render(p.prompt, p.rejected, tok) for p in pairs]
        input_ids, attention_mask = self.extractor.pad(self.extractor.tokenize(texts))  # (2B, T)
        device = input_ids.device
        out = {"input_ids": input_ids, "attention_mask": attention_mask,
               "weight": torch.tensor([p.weight for p in pairs], device=device)}
        if self.with_prompts:
            prompts = self.extractor.tokenize([render_prompt(p.prompt, tok) for p in pairs], self.prompt_max_length)
            out["prompt_ids"], out["prompt_mask"] = self.extractor.pad(prompts)  # (B, Tp)
        if "targets" in batch:
            targets = torch.as_tensor(np.stack(batch["targets"]), device=device)  # (B, 2, K)
            out["targets"] = torch.cat([targets[:, 0], targets[:, 1]])  # (2B, K) rows as in input_ids
        return out


# ----------------------------------------------------------------------------------------------- worker

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

    def __init__(self, config: RecipeConfig, steps_per_epoch: int, tensorboard_dir: str,
                 on_step: StepHook | None = None):
        self.config, self.steps_per_epoch, self.tensorboard_dir = config, steps_per_epoch, tensorboard_dir
        self.on_step = on_step
        self.total_steps = steps_per_epoch * config.train.epochs

    def setup(self) -> None:
        import deepspeed
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        cfg, cuda = self.config, self.config.ray.use_gpu
        torch.manual_seed(cfg.train.seed)  # same heads on every rank (DeepSpeed also broadcasts rank 0's)
        backbone = load_backbone(cfg.model.backbone, device=ray.train.torch.get_device(),
                                 dtype=torch.bfloat16 if cuda else torch.float32, max_length=cfg.model.max_length)
        if cfg.train.gradient_checkpointing:
            backbone.model.gradient_checkpointing_enable()
        model = RewardModel(cfg.model, backbone).train()
        heads = {id(p) for p in model.heads.parameters()}
        groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in heads],
                   "lr": cfg.train.lr},
                  {"params": list(model.heads.parameters()), "lr": cfg.train.head_lr}]
        schedule = linear_schedule(cfg.train.warmup_steps, self.total_steps)
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=[g for g in groups if g["params"]],
            config=deepspeed_config(cfg.train, world_size=self.world, cuda=cuda),
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

        cfg = self.config.train
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
                    continue  # `finish` logs, evaluates and exports the last step
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
            for batch in ray.train.get_dataset_shard("eval").iter_batches(batch_size=2 * self.config.train.batch_pairs,
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
            for batch in ray.train.get_dataset_shard("train").iter_batches(batch_size=4 * self.config.train.batch_pairs,
                                                                            batch_format="numpy"):
                inputs = self.collate(batch)
                weights = model.expected_weights(model.backbone(inputs["prompt_ids"], inputs["prompt_mask"]))
                totals += torch.cat([weights.double().sum(0).cpu(), torch.tensor([len(weights)])])
        model.train()
        totals = self._all_reduce(totals)
        return totals[:k] / totals[k]

    def finish(self) -> None:
        """The final checkpoint, with the exported model (rank 0) next to the DeepSpeed state."""
        metrics = {**self.train_metrics(self.config.train.epochs - 1), **self.evaluate()}
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
    """Ray Train's entry point on every worker."""
    worker = TrainingWorker(**loop_config)
    worker.setup()
    worker.train()
    worker.cleanup()


# ----------------------------------------------------------------------------------------------- evaluation

@dataclass
class PairScores:
    """A model's view of N pairs: E[w | x] (N, K) and objective scores of each side (N, K)."""

    weights: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray

    @property
    def margins(self) -> np.ndarray:
        """r_chosen − r_rejected with the prompt's expected weights, (N,)."""
        return (self.weights * (self.chosen - self.rejected)).sum(1)


@torch.no_grad()
def score_pairs(model: RewardModel, pairs: list[PreferencePair]) -> PairScores:
    """Features by the length-sorted batched extractor, then the heads at the posterior means."""
    extractor = EmbeddingExtractor(model.backbone)
    chosen, rejected, _ = extractor.embed_pairs(pairs)  # (N, d) each
    device, dtype = model.backbone.device, model.heads["score"].weight.dtype  # features come back as float32

    def heads(features: np.ndarray) -> np.ndarray:
        return model.objective_scores(torch.from_numpy(features).to(device, dtype)).float().cpu().numpy()

    if model.is_vrm:
        prompts, _ = extractor.embed_texts([render_prompt(p.prompt, model.backbone.tokenizer) for p in pairs],
                                           model.config.prompt_max_length)
        weights = model.expected_weights(torch.from_numpy(prompts).to(device, dtype)).float().cpu().numpy()
    else:
        weights = np.ones((len(pairs), 1), dtype=np.float32)
    return PairScores(weights, heads(chosen), heads(rejected))


def evaluate_model(model: RewardModel, train: list[PreferencePair], held_out: list[PreferencePair], *,
                   personalize: bool = True) -> dict[str, Any]:
    """Held-out pairwise accuracy, overall and per group; per-group personalized accuracy; objective correlations.

    Personalized: each group's profile over the exported heads, fitted on that group's training pairs by
    `rewardprism.adapt.bt` (MAP, centred on the population profile), scores its held-out pairs — how a user of
    the platform is served. Correlations (when pairs carry attribute ratings): of each objective score s_k
    with each attribute over the held-out responses.
    """
    from rewardprism.adapt import bt as fit_profiles
    from rewardprism.data import groups_of

    scores = score_pairs(model, held_out)
    groups = groups_of(held_out)
    correct = scores.margins > 0
    result: dict[str, Any] = {"eval_pairs": len(held_out), "accuracy": float(correct.mean()),
                              "accuracy_by_group": {g: float(correct[groups == g].mean()) for g in sorted(set(groups))}}
    if personalize:
        train_scores, train_groups = score_pairs(model, train), groups_of(train)
        prior = model.default_weights.float().cpu().numpy()
        personalized = {}
        for g in result["accuracy_by_group"]:
            mine = train_groups == g
            if not mine.any():
                continue
            weights, _ = fit_profiles(train_scores.chosen[mine][None], train_scores.rejected[mine][None], prior=prior)
            held = groups == g
            personalized[g] = float((((scores.chosen[held] - scores.rejected[held]) @ weights[0]) > 0).mean())
        result["personalized_accuracy_by_group"] = personalized
    names = sorted(set.intersection(*(set(p.attributes["chosen"]) for p in held_out))) \
        if held_out and all(p.attributes for p in held_out) else []  # the ratings every pair carries
    if names:
        ratings = np.array([[p.attributes[side][n] for n in names] for side in ("chosen", "rejected")
                            for p in held_out])  # (2N, A)
        objectives = np.concatenate([scores.chosen, scores.rejected])  # (2N, K)
        corr = np.corrcoef(objectives.T, ratings.T)[:objectives.shape[1], objectives.shape[1]:]  # (K, A)
        result["objective_attribute_corr"] = {
            h: {a: round(float(c), 4) for a, c in zip(names, row)} for h, row in zip(model.config.head_names, corr)}
    return result


# ----------------------------------------------------------------------------------------------- driver

@contextlib.contextmanager
def replacing(folder: Path) -> Iterator[Path]:
    """A staging path next to `folder` that replaces it once the block succeeds; on failure `folder` stays as
    it was. (Between the two renames an interruption leaves the old one at `.<name>.old`, never nothing.)"""
    staged, old = folder.with_name(f".{folder.name}.new"), folder.with_name(f".{folder.name}.old")
    for leftover in (staged, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if folder.exists():
        os.replace(folder, old)
    os.replace(staged, folder)
    shutil.rmtree(old, ignore_errors=True)


class TrainRecipe:
    """The driver, in torchtune's recipe shape.

    `setup` checks the config and data and computes supervision targets — a bad field fails here, before any
    worker starts; `train` runs `TorchTrainer` (each worker runs `TrainingWorker`); `save_checkpoint` exports
    the final model from the last Ray checkpoint, adds its head set and evaluates it; `cleanup` stops a local
    cluster this recipe started.
    """

    def __init__(self, config: RecipeConfig, on_step: StepHook | None = None):
        self.config, self.on_step = config, on_step
        self.started_ray = False

    def setup(self) -> None:
        start = time.perf_counter()
        self.config.check_run_dir()
        self.data = prepare_data(self.config)
        self.steps_per_epoch = steps_per_epoch(self.config, len(self.data.train))
        log.info("data: %d training and %d held-out pairs, supervision %s, %d steps per epoch (%.0f s)",
                 len(self.data.train), len(self.data.eval), self.config.data.supervision, self.steps_per_epoch,
                 time.perf_counter() - start)

    def train(self) -> None:
        import ray
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        cfg = self.config
        if not ray.is_initialized():
            ray.init()  # joins RAY_ADDRESS or a `ray start` cluster on this machine, else starts a local one
            self.started_ray = True
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": cfg, "steps_per_epoch": self.steps_per_epoch,
                               "tensorboard_dir": str(cfg.run_dir / "tensorboard"), "on_step": self.on_step},
            scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                         resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
            torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
            datasets={"train": ray_dataset(self.data.train, self.data.train_targets),
                      "eval": ray_dataset(self.data.eval, self.data.eval_targets)},
            run_config=RunConfig(
                name=cfg.ray.name, storage_path=str(cfg.run_dir.parent),
                failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.keep_checkpoints)),
        )
        start = time.perf_counter()
        self.result = trainer.fit()
        log.info("trained %d steps in %.0f s; run folder %s", self.result.metrics.get("step", 0),
                 time.perf_counter() - start, self.config.run_dir)

    def save_checkpoint(self) -> dict[str, Any]:
        """Copy the exported model out of the final Ray checkpoint, add its head set, evaluate it."""
        start, out = time.perf_counter(), self.config.export_dir
        with self.result.checkpoint.as_directory() as folder, replacing(out) as staged:
            shutil.copytree(Path(folder) / EXPORT_DIR, staged)
            model = RewardModel.from_pretrained(staged, device="cpu")
            model.to_head_set(str(out), name=self.config.ray.name,
                              dataset=self.config.data.source).save(staged / HEADSET_DIR)
            metrics = {"train": {k: v for k, v in self.result.metrics.items() if isinstance(v, (int, float))},
                       "eval": evaluate_model(model, self.data.train, self.data.eval,
                                              personalize=self.config.train.personalize),
                       "config": self.config.to_dict()}
            (staged / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
        log.info("exported and evaluated %s (%.0f s)", out, time.perf_counter() - start)
        return metrics

    def cleanup(self) -> None:
        import ray

        if self.started_ray:
            ray.shutdown()


def run(config: RecipeConfig, on_step: StepHook | None = None) -> dict[str, Any]:
    """Train, export and evaluate; returns what `metrics.json` holds."""
    recipe = TrainRecipe(config, on_step)
    recipe.setup()
    try:
        recipe.train()
        return recipe.save_checkpoint()
    finally:
        recipe.cleanup()
