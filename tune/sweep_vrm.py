"""A Ray Tune sweep over VRM's λ, β_w, β_z and latent size; every trial is one Ray Train + DeepSpeed run.

    python tune/sweep_vrm.py --config tune/vrm_small.yaml            # the default space on this machine's CPU
    python tune/sweep_vrm.py --config tune/vrm_small.yaml --override samples=1 --override seeds=1
    python tune/sweep_vrm.py --config tune/vrm_small.yaml --resume   # finish an interrupted sweep (Tuner.restore)
    ray job submit --working-dir . -- python tune/sweep_vrm.py --config tune/vrm_small.yaml

Ray's pattern for Tune over Train (Train V2, the default in Ray 2.60): a Tune trial is a driver function that runs
the training recipe (`rewardprism.recipes.vrm.VrmRecipe`: its `TorchTrainer` over `TrainingWorker`s) with one
run callback, `TuneReportCallback`, which hands what rank 0 reports — held-out pairwise accuracy every
`train.eval_every` steps — to Tune, where ASHA stops weak trials early. Each Train run is named after its trial,
so a restored trial resumes from its latest checkpoint.

Random configurations are drawn from `space` (seeded) and each runs once per seed (`train.seed`); `points` run as
given — λ = 0, the unsupervised VRM, is one. At the end: the results table, the best configuration (mean held-out
accuracy over seeds) with its exported model and head set, and the plots of `report.py`.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from report import finish
from rewardprism.cli_common import fail, overrides
from rewardprism.config import ConfigError, from_dict, load_config, set_field
from rewardprism.data import DataError
from rewardprism.recipes import connect_ray
from rewardprism.recipes.vrm import VrmConfig, VrmRecipe, exported_model, total_steps
from rewardprism.train_data import prepare_data
from sweeps import (
    BEST_DIR,
    NoTrialFinished,
    Resume,
    RunSettings,
    best_or_exit,
    fit_or_restore,
    max_concurrent_trials,
    refuse_existing_sweep,
    resume_command,
    save_head_set,
    stop_if_interrupted,
    write_best,
    write_results,
)

Overrides = overrides("samples=2")
METRIC = "eval_accuracy"  # held-out pairwise accuracy, as `TrainingWorker.evaluate` reports it
TIME = "step"  # ASHA's clock: optimizer steps, the same unit in every trial and across a resume
SEED = "train.seed"


@dataclass
class Asha:
    grace_period: int = 4  # steps every trial trains before ASHA may stop it
    reduction_factor: int = 2  # each rung keeps the best 1/reduction_factor of the trials that reach it

    def __post_init__(self) -> None:
        if self.grace_period < 1:
            raise ConfigError("grace_period", f"must be a positive number of steps, got {self.grace_period}")
        if self.reduction_factor < 2:
            raise ConfigError("reduction_factor", f"must be at least 2, got {self.reduction_factor}")


@dataclass
class VrmSweep:
    """The sweep file; `space` and `points` are checked by `search_space` and `explicit_points` (their keys are
    dotted recipe fields, which `--override` cannot address: change them in the file)."""

    recipe: str = "configs/vrm_tiny.yaml"  # the training recipe every trial starts from
    overrides: list[str] = field(default_factory=list)  # key.sub=value on the recipe, as `train_vrm.py --override`
    samples: int = 4  # random configurations drawn from `space`
    seeds: int = 2  # each configuration runs with train.seed = 0 .. seeds-1
    search_seed: int = 0  # seeds the draws, so a sweep file always means the same configurations
    space: dict[str, Any] = field(default_factory=dict)  # recipe field → Tune domain (`search_space`)
    points: list[Any] | None = None  # configurations run as given (`explicit_points`)
    asha: Asha = field(default_factory=Asha)
    run: RunSettings = field(default_factory=lambda: RunSettings(name="vrm-sweep"))

    def __post_init__(self) -> None:
        if self.samples < 0:
            raise ConfigError("samples", f"must be 0 or more, got {self.samples}")
        if self.seeds < 1:
            raise ConfigError("seeds", f"must be a positive integer, got {self.seeds}")


DOMAINS = ("loguniform", "uniform", "randint", "choice")


def search_space(space: Any) -> dict[str, Any]:
    """`{field: {loguniform|uniform|randint: [low, high]} | {choice: [values]}}` → Tune domains."""
    import ray.tune

    if not isinstance(space, dict) or not space:
        raise ConfigError("space", "must map recipe fields to domains, e.g. model.lam: {loguniform: [0.01, 10]}")
    domains = {}
    for key, spec in space.items():
        kind, args = next(iter(spec.items())) if isinstance(spec, dict) and len(spec) == 1 else (None, None)
        if kind not in DOMAINS or not isinstance(args, list) or (kind != "choice" and len(args) != 2):
            raise ConfigError(f"space.{key}", "must be {loguniform: [low, high]}, {uniform: [low, high]}, "
                                              f"{{randint: [low, high]}} or {{choice: [values]}}, got {spec!r}")
        if key == SEED:
            raise ConfigError(f"space.{key}", "is set by `seeds`: every configuration runs once per seed")
        if kind == "choice" and not args:
            raise ConfigError(f"space.{key}", "choice needs at least one value")
        if kind != "choice":
            number, what = (int, "integers") if kind == "randint" else ((int, float), "numbers")
            if not all(isinstance(a, number) and not isinstance(a, bool) for a in args):
                raise ConfigError(f"space.{key}", f"{kind} bounds must be {what}, got {args!r}")
            if not args[0] < args[1]:
                raise ConfigError(f"space.{key}", f"{kind} needs low < high, got {args!r}"
                                                  + (" (high is exclusive)" if kind == "randint" else ""))
        try:
            domains[key] = getattr(ray.tune, kind)(args) if kind == "choice" else getattr(ray.tune, kind)(*args)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"space.{key}", str(exc)) from None
    return domains


def explicit_points(points: Any) -> list[dict[str, Any]]:
    """Configurations run as given (once per seed), besides the random samples."""
    if points is None:
        return []
    if not isinstance(points, list) or not all(isinstance(p, dict) and p for p in points):
        raise ConfigError("points", "must be a list of {field: value} mappings, e.g. - {model.lam: 0.0, "
                                    "data.supervision: none}")
    for i, point in enumerate(points):
        if SEED in point:
            raise ConfigError(f"points[{i}].{SEED}", "is set by `seeds`")
    return points


PATH_FIELDS = ("data.source", "data.drm_heads", "data.drm_backbone", "model.backbone")


def trial_recipe(recipe: dict[str, Any], params: dict[str, Any]) -> VrmConfig:
    """The recipe with dotted `params` set, validated field by field (errors name the field)."""
    data = copy.deepcopy(recipe)
    for key, value in params.items():
        set_field(data, key, value.item() if isinstance(value, np.generic) else value)  # Tune samples numpy
    return from_dict(VrmConfig, data, "")


def field_value(recipe: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        recipe = recipe[part]
    return recipe


def absolute_paths(recipe: dict[str, Any]) -> dict[str, Any]:
    """Tune runs each trial in its own folder: local files the recipe names become absolute paths."""
    recipe = copy.deepcopy(recipe)
    for key in PATH_FIELDS:
        value = field_value(recipe, key)
        if value and Path(value).expanduser().exists():
            set_field(recipe, key, str(Path(value).expanduser().resolve()))
    return recipe


def check_values(recipe: dict[str, Any], space: dict[str, Any], points: list[dict[str, Any]]) -> None:
    """Every end of every range, every choice and every point makes a valid recipe: fail here, not in a trial."""
    for key, spec in space.items():
        kind, args = next(iter(spec.items()))
        for value in args if kind == "choice" else [args[0], args[1] - 1 if kind == "randint" else args[1]]:
            trial_recipe(recipe, {key: value})
    for point in points:
        trial_recipe(recipe, point)


def check_reports(recipe: VrmConfig) -> None:
    """Tune refuses a report without the metric it schedules on, so every report must carry an evaluation."""
    train = recipe.train
    for name in ("log_every", "checkpoint_every"):
        if getattr(train, name) % train.eval_every:
            raise ConfigError(f"train.{name}", f"is {getattr(train, name)}, not a multiple of train.eval_every="
                                               f"{train.eval_every}: in a sweep every report must carry {METRIC}")


def trial_resources(recipe: VrmConfig) -> dict[str, float]:
    """What one trial holds: its driver (Tune's default 1 CPU; it prepares the data) and its Train workers,
    custom resources included (`ray.worker_resources`: on a cluster where only some nodes have them, they,
    not the CPUs, bound how many trials run at once). The Train controller takes no resources."""
    workers = recipe.ray.num_workers
    return {"CPU": 1 + workers * recipe.ray.cpus_per_worker, "GPU": workers * recipe.ray.use_gpu,
            **{name: workers * amount for name, amount in recipe.ray.worker_resources.items()}}


# ----------------------------------------------------------------------------------------------- trials
# Ray ships these functions to the trial actors by value (this file runs as __main__): they use only
# rewardprism and Ray, never the sibling modules, which workers cannot import under `ray job submit`.

def run_trial(params: dict[str, Any], recipe: dict[str, Any], train_storage: str) -> None:
    """One Tune trial: the recipe with this trial's values, trained as one Ray Train run whose reports go to Tune.

    The run is named after the trial, so a restored trial continues it (`ray.resume`)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    name = f"train-{ray.tune.get_context().get_trial_id()}"  # stable across restores: the run resumes
    config = trial_recipe(recipe, {**params, "ray.name": name, "ray.storage_path": train_storage,
                                   "ray.resume": True})
    trial = VrmRecipe(config, callbacks=[TuneReportCallback()], evaluate_in_worker=True)
    trial.setup()
    trial.train()


# ----------------------------------------------------------------------------------------------- driver

def best_trial(rows: list[dict[str, Any]], keys: list[str], max_t: int) -> tuple[dict[str, Any], list[dict]]:
    """The configuration with the best mean last accuracy over its seeds, among those with a finished trial,
    and its best finished trial. Seeds stopped early count with their last accuracy: a cautious mean."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get(METRIC) is not None:
            groups.setdefault(tuple(row[f"config/{k}"] for k in keys), []).append(row)
    finished = {k: g for k, g in groups.items() if any(r[TIME] >= max_t for r in g)}
    if not finished:
        raise NoTrialFinished("no trial finished training; see the errors in sweep.json")
    group = max(finished.values(), key=lambda g: np.mean([r[METRIC] for r in g]))
    return max((r for r in group if r[TIME] >= max_t), key=lambda r: r[METRIC]), group


def export_best(row: dict[str, Any], group: list[dict], recipe: dict[str, Any], keys: list[str],
                run: RunSettings) -> dict[str, Any]:
    """Copy the best trial's exported model out of its last checkpoint; save its head set and configuration."""
    import ray.train

    folder = run.experiment_dir / BEST_DIR
    params = {k: row[f"config/{k}"] for k in [*keys, SEED]}
    config = trial_recipe(recipe, {**params, "ray.name": f"{run.name}-best"})
    # a finished sweep reported again (--resume) replaces its earlier best, which may have changed
    with exported_model(ray.train.Checkpoint(row["checkpoint_path"]), folder / "model") as (model, _):
        head_set = model.to_head_set(str(folder / "model"), name=run.name, dataset=config.data.source)
    head_set = save_head_set(head_set, folder / "headset", row["trial_id"])
    accuracies = [r[METRIC] for r in group]
    summary = {"kind": "vrm", "params": params, "trial_id": row["trial_id"], METRIC: row[METRIC],
               "mean_over_seeds": float(np.mean(accuracies)), "std_over_seeds": float(np.std(accuracies)),
               "seeds": len(accuracies)}
    write_best(folder, summary, config.to_dict(), head_set)
    return summary


def main(
    config: Annotated[Path, typer.Option(help="sweep file, e.g. tune/vrm_small.yaml")],
    override: Overrides = None,
    resume: Resume = False,
) -> None:
    """Sweep VRM hyperparameters with Ray Tune; write the results table, the best model and the plots."""
    import ray
    import ray.tune
    from ray.tune.schedulers import AsyncHyperBandScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    try:
        sweep = load_config(VrmSweep, config, override or [])
        refuse_existing_sweep(sweep.run, resume)
        points = explicit_points(sweep.points)
        if sweep.samples + len(points) == 0:
            raise ConfigError("samples", "is 0 and there are no points: the sweep would run nothing")
        domains = search_space(sweep.space)
        base = load_config(VrmConfig, sweep.recipe, sweep.overrides)
        check_reports(base)
        recipe = absolute_paths(base.to_dict())
        check_values(recipe, sweep.space, points)
        data = prepare_data(base.data, base.model)  # the data is checked here, before any cluster starts
        max_t = total_steps(base, len(data.train))
        connect_ray()
        per_trial = trial_resources(base)
        # Tune presets only fields of the space: a point's other fields join it at the recipe's values
        constants = {k: field_value(recipe, k) for p in points for k in p if k not in domains}
        param_space = {**domains, **constants, SEED: ray.tune.grid_search(list(range(sweep.seeds)))}
        tune_config = ray.tune.TuneConfig(
            metric=METRIC, mode="max", num_samples=sweep.samples + len(points),
            # Tune ignores TuneConfig.max_concurrent_trials beside a search generator: the cap goes here
            search_alg=BasicVariantGenerator(
                points_to_evaluate=copy.deepcopy(points), constant_grid_search=True, random_state=sweep.search_seed,
                max_concurrent=max_concurrent_trials(per_trial, sweep.run.max_concurrent_trials)),
            # stop_last_trials=False: a trial that reaches max_t ends by itself, so its Train run exports the
            # model and shuts down cleanly instead of being killed at its last report
            scheduler=AsyncHyperBandScheduler(time_attr=TIME, max_t=max_t, grace_period=sweep.asha.grace_period,
                                              reduction_factor=sweep.asha.reduction_factor, stop_last_trials=False))
        trainable = ray.tune.with_parameters(run_trial, recipe=recipe,
                                             train_storage=str(sweep.run.experiment_dir / "train"))
        grid = fit_or_restore(sweep.run, trainable, resume=resume, param_space=param_space,
                              tune_config=tune_config)
    except (ConfigError, DataError) as exc:
        fail(str(exc))
    stop_if_interrupted(grid, (sweep.samples + len(points)) * sweep.seeds,
                        resume_command("sweep_vrm.py", config, override))
    keys = [k for k in param_space if k != SEED]
    rows = write_results(grid, "vrm", {"config": asdict(sweep), "keys": keys, "metric": METRIC, "max_t": max_t})
    summary = best_or_exit(lambda: export_best(*best_trial(rows, keys, max_t), recipe, keys, sweep.run))
    finish(sweep.run, summary)


if __name__ == "__main__":
    typer.run(main)
