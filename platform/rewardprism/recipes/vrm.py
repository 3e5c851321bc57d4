"""The VRM / BT reward-model recipe: train on Ray Train with DeepSpeed, export the model folder and its head set.

    python train_vrm.py --config configs/vrm_tiny.yaml [--override train.epochs=3 ...]   # = rewardprism train

torchtune's recipe shape over the components: `setup` checks the config and prepares the data
(`rewardprism.train_data`) — a bad field fails here, before any worker starts; `train` runs `TorchTrainer`, each
worker a `rewardprism.train_worker.TrainingWorker`; `save_checkpoint` exports the final model from the last Ray
checkpoint, adds its head set and evaluates it (`rewardprism.train_eval`); `cleanup` stops a local cluster the
recipe started. Hooks: `on_step` runs in every worker after each optimizer step; `callbacks` are Ray Train run
callbacks (a Tune trial hands the recipe's reports to Tune with one, tune/sweep_vrm.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rewardprism.config import ConfigError, output_path
from rewardprism.recipes import connect_ray
from rewardprism.train_data import DataConfig, prepare_data
from rewardprism.train_eval import evaluate_model
from rewardprism.train_worker import EXPORT_DIR, StepHook, TrainConfig, ray_dataset, train_loop_per_worker
from rewardprism.vrm import CONFIG_FILE, RewardModel, RewardModelConfig

METRICS_FILE = "metrics.json"  # final evaluation, next to the exported model
HEADSET_DIR = "headset"  # the exported head set, inside the model folder
log = logging.getLogger(__name__)


@dataclass
class ClusterConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    # custom resources each worker also needs, e.g. {trainer: 1} on nodes started with --resources='{"trainer": 1}':
    # pins the workers to those nodes (one per node when each node has 1)
    worker_resources: dict[str, float] = field(default_factory=dict)
    max_failures: int = 1  # worker failures to recover from (from the latest checkpoint)
    resume: bool = False  # continue the run <storage_path>/<name> from its latest checkpoint
    keep_checkpoints: int = 2
    storage_path: str = "~/rewardprism-runs"  # Ray checkpoints and TensorBoard logs (shared storage on clusters)
    name: str = "vrm"  # run name: <storage_path>/<name>

    def __post_init__(self) -> None:
        for name in ("num_workers", "cpus_per_worker", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be a positive integer, got {getattr(self, name)}")
        for key, amount in self.worker_resources.items():
            if key in ("CPU", "GPU") or not amount > 0:
                raise ConfigError(f"worker_resources.{key}", "must be a custom resource (CPU and GPU come from "
                                  f"cpus_per_worker and use_gpu) with an amount > 0, got {amount}")
        if self.max_failures < -1:
            raise ConfigError("max_failures", "must be >= 0, or -1 to retry forever")
        if not self.name or "/" in self.name:
            raise ConfigError("name", f"must be a non-empty name without '/', got {self.name!r}")


@dataclass
class VrmConfig:
    """The recipe's config file: one section per component, validated field by field on loading."""

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


def steps_per_epoch(config: VrmConfig, n_train: int) -> int:
    """Optimizer steps per epoch: every worker gets n_train // workers pairs and drops its last partial batch."""
    per_step = config.train.batch_pairs * config.train.grad_accum
    steps = n_train // config.ray.num_workers // per_step
    if steps < 1:
        raise ConfigError("train.batch_pairs", f"{n_train} training pairs over {config.ray.num_workers} workers "
                                               f"make no full step of {per_step} pairs; lower batch_pairs or "
                                               "grad_accum, or use more data")
    return steps


def total_steps(config: VrmConfig, n_train: int) -> int:
    """Optimizer steps of the whole run: all epochs, or `train.max_steps` when that comes first."""
    steps = steps_per_epoch(config, n_train) * config.train.epochs
    return min(steps, config.train.max_steps or steps)


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


@contextlib.contextmanager
def exported_model(checkpoint: Any, out: Path) -> Iterator[tuple[RewardModel, Path]]:
    """The model a run exported into its final Ray checkpoint, copied to a staging folder that replaces `out`
    once the block succeeds (`replacing`); yields the model, loaded on the CPU, and that staging folder."""
    with checkpoint.as_directory() as folder, replacing(out) as staged:
        shutil.copytree(Path(folder) / EXPORT_DIR, staged)
        yield RewardModel.from_pretrained(staged, device="cpu"), staged


class VrmRecipe:
    """setup → train → save_checkpoint → cleanup (see the module's docstring)."""

    def __init__(self, config: VrmConfig, *, on_step: StepHook | None = None, callbacks: Sequence[Any] = (),
                 evaluate_in_worker: bool = False):
        """`evaluate_in_worker`: the workers' last report carries the held-out evaluation, for a caller that never
        calls `save_checkpoint` (a Tune trial schedules on it); otherwise `save_checkpoint` evaluates, once."""
        self.config, self.on_step, self.callbacks = config, on_step, list(callbacks)
        self.evaluate_in_worker, self.started_ray = evaluate_in_worker, False

    def setup(self) -> None:
        start = time.perf_counter()
        self.config.check_run_dir()
        self.data = prepare_data(self.config.data, self.config.model)
        self.steps_per_epoch = steps_per_epoch(self.config, len(self.data.train))
        self.total_steps = total_steps(self.config, len(self.data.train))
        log.info("data: %d training and %d held-out pairs, supervision %s, %d steps per epoch, %d in all (%.0f s)",
                 len(self.data.train), len(self.data.eval), self.config.data.supervision, self.steps_per_epoch,
                 self.total_steps, time.perf_counter() - start)

    def train(self) -> None:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        cfg = self.config
        if connect_ray():  # joins RAY_ADDRESS or a `ray start` cluster on this machine, else starts a local one
            self.started_ray = True
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"model": cfg.model, "train": cfg.train, "use_gpu": cfg.ray.use_gpu,
                               "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                               "final_eval": self.evaluate_in_worker,
                               "tensorboard_dir": str(cfg.run_dir / "tensorboard"), "on_step": self.on_step},
            scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                         resources_per_worker={"CPU": cfg.ray.cpus_per_worker,
                                                               **cfg.ray.worker_resources}),
            torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
            datasets={"train": ray_dataset(self.data.train, self.data.train_targets),
                      "eval": ray_dataset(self.data.eval, self.data.eval_targets)},
            run_config=RunConfig(
                name=cfg.ray.name, storage_path=str(cfg.run_dir.parent), callbacks=self.callbacks,
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
        with exported_model(self.result.checkpoint, out) as (model, staged):
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


def run(config: VrmConfig, *, on_step: StepHook | None = None) -> dict[str, Any]:
    """Train, export and evaluate; returns what `metrics.json` holds."""
    recipe = VrmRecipe(config, on_step=on_step)
    recipe.setup()
    try:
        recipe.train()
        return recipe.save_checkpoint()
    finally:
        recipe.cleanup()
