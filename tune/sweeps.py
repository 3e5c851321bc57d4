"""Driver-side pieces both sweeps share: the experiment folder, concurrency, results, the best head set.

`sweep_vrm.py` and `sweep_drm.py` import this as a sibling module (their folder is on `sys.path`). Only the driver
runs it: Tune trials run functions defined in the sweep scripts themselves, which Ray ships by value, so workers
never need this file — not even under `ray job submit --working-dir .`, where the scripts' folder is not on the
workers' path.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
import yaml
from rewardprism.config import ConfigError, output_path
from rewardprism.embed import write_text_atomically
from rewardprism.heads import HeadSet

RESULTS_CSV = "results.csv"  # one row per trial: its config and its last reported metrics
RESULTS_JSON = "results.json"  # the same rows, for `report.py` and scripts
SWEEP_JSON = "sweep.json"  # what ran: the kind of sweep and its settings
BEST_DIR = "best"  # the best configuration, its head set and a summary
PLOTS_DIR = "plots"  # report.py's PNGs

# The scripts' --resume flag
Resume = Annotated[bool, typer.Option(help="finish the interrupted sweep named in the file (Tuner.restore)")]


@dataclass
class RunSettings:
    """Where a sweep lives and how wide it runs; the `run:` section of every sweep file."""

    name: str = "sweep"  # the experiment: <storage_path>/<name>
    storage_path: str = "~/rewardprism-runs/tune"  # on several nodes: a folder every node mounts (NFS)
    max_concurrent_trials: int | None = None  # None: as many trials as the cluster's CPUs and GPUs hold

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError("name", f"must be a folder name (not empty, '.' or '..', no '/'), got {self.name!r}")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ConfigError("max_concurrent_trials", "must be a positive integer, or null to fit the cluster")

    @property
    def experiment_dir(self) -> Path:
        return output_path(self.storage_path, "run.storage_path") / self.name


def max_concurrent_trials(per_trial: dict[str, float], configured: int | None) -> int:
    """Trials that fit the cluster at once, by its scarcest resource — what Ray advises for Tune + Train.

    Without a cap Tune would start every trial's driver and leave their Train workers waiting for resources.
    On an autoscaling cluster the current size undercounts: set `run.max_concurrent_trials` there.
    """
    import ray

    if configured is not None:
        return configured
    cluster = ray.cluster_resources()
    fits = {name: int(cluster.get(name, 0) // need) for name, need in per_trial.items() if need > 0}
    scarcest = min(fits, key=fits.get)
    if fits[scarcest] < 1:
        field = "ray.num_workers" if scarcest in ("CPU", "GPU") else "ray.worker_resources"
        raise ConfigError(field, f"one trial needs {per_trial}, but the cluster has "
                                             f"{cluster.get(scarcest, 0):g} {scarcest}: use fewer or smaller workers")
    return fits[scarcest]


def refuse_existing_sweep(run: RunSettings, resume: bool) -> None:
    """A new sweep refuses a folder that holds one already. The scripts ask right after reading their config,
    before any data is read or Ray starts, so the refusal is immediate."""
    if not resume and run.experiment_dir.exists():
        raise ConfigError("run.name", f"{run.experiment_dir} holds a sweep already: pass --resume to continue it, "
                                      "or choose another run.name")


def fit_or_restore(run: RunSettings, trainable: Callable, *, resume: bool, param_space: dict[str, Any],
                   tune_config: Any, max_failures: int = 1):
    """`Tuner.fit` for a new sweep, or `Tuner.restore(...).fit()` to finish an interrupted one.

    A new sweep refuses a folder that holds one already, so an old experiment is continued only on purpose.
    Restoring keeps every finished trial and reruns the unfinished and errored ones.
    """
    import ray.tune

    path = run.experiment_dir
    if resume:
        if not ray.tune.Tuner.can_restore(str(path)):
            raise ConfigError("--resume", f"no sweep to resume at {path}")
        return ray.tune.Tuner.restore(str(path), trainable, resume_errored=True).fit()
    refuse_existing_sweep(run, resume)
    run_config = ray.tune.RunConfig(name=run.name, storage_path=str(path.parent),
                                    failure_config=ray.tune.FailureConfig(max_failures=max_failures))
    return ray.tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config).fit()


def resume_command(script: str, config: Path, overrides: list[str] | None) -> str:
    """The command that finishes an interrupted sweep: the same file and overrides, with --resume."""
    flags = [arg for item in overrides or [] for arg in ("--override", item)]
    return shlex.join(["python", f"tune/{script}", "--config", str(config), *flags, "--resume"])


def stop_if_interrupted(grid: Any, expected: int, resume: str) -> None:
    """After Ctrl+C Tune saves its state and returns as if done: say how to continue instead of reporting a part.

    Finished means finished in the saved state (Tune marks the trials it stopped at the interrupt as terminated
    in memory, but saves them as pending), and all `expected` trials must have been created.
    """
    import ray.tune
    import typer

    saved = ray.tune.ExperimentAnalysis(grid.experiment_path).trials
    unfinished = expected - sum(t.status in ("TERMINATED", "ERROR") for t in saved)
    if unfinished:
        typer.echo(f"interrupted with {unfinished} trial(s) unfinished; continue with: {resume}", err=True)
        raise typer.Exit(130)


class NoTrialFinished(RuntimeError):
    """Every trial failed before it could count: `sweep.json` lists their errors."""


def write_results(grid: Any, kind: str, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The results table (CSV and JSON: config and last metrics per trial) and `sweep.json`; returns the rows.

    Errored trials are listed in `sweep.json` with their error. Each file is replaced whole, never half written.
    """
    folder = Path(grid.experiment_path)
    table = grid.get_dataframe()  # no columns at all when no trial reported anything
    if "trial_id" in table.columns:
        checkpoints = {r.metrics["trial_id"]: r.checkpoint.path for r in grid if r.checkpoint is not None}
        table["checkpoint"] = table["trial_id"].map(checkpoints)  # what a trial saved besides its metrics
    write_text_atomically(folder / RESULTS_CSV, table.to_csv(index=False))
    rows = json.loads(table.to_json(orient="records")) if len(table.columns) else []
    write_text_atomically(folder / RESULTS_JSON, json.dumps(rows, indent=1))
    errors = {r.path: repr(r.error) for r in grid if r.error is not None}
    write_text_atomically(folder / SWEEP_JSON, json.dumps({"kind": kind, **settings, "errors": errors}, indent=1,
                                                          default=str))
    return rows


def best_or_exit(export: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`export()`'s summary of the best trial; when no trial finished, one line saying so and exit code 1."""
    try:
        return export()
    except NoTrialFinished as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def save_head_set(head_set: HeadSet, folder: Path, label: str) -> HeadSet:
    """Save with version `<label>-<content hash>`: registering the same heads twice is a no-op in the registry,
    and different heads under the same sweep name never collide."""
    head_set = dataclasses.replace(head_set, version=f"{label}-{head_set.content_hash[:8]}")
    head_set.save(folder)
    return head_set


def write_best(folder: Path, summary: dict[str, Any], config: dict[str, Any], head_set: HeadSet) -> None:
    """`best/config.yaml` (run it again) and `best/summary.json` (what won, and how to serve it)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomically(folder / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    summary = {**summary, "head_set": {"name": head_set.name, "version": head_set.version,
                                       "path": str(folder / "headset")},
               "register": f"rewardprism models register {folder / 'headset'} --activate"}
    write_text_atomically(folder / "summary.json", json.dumps(summary, indent=1, default=_plain))


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else str(value)
