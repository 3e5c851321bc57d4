"""The training recipes from the command line: `rewardprism train` (VRM / BT, = train_vrm.py) and train_drm.py.

Both take `--config FILE.yaml` and repeated `--override key.sub=value`, so `ray job submit --working-dir . --
python train_vrm.py ...` and `rewardprism train ...` take the same options. A bad field exits 2 naming it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from rewardprism.cli_common import fail, log_progress, overrides
from rewardprism.config import ConfigError, load_config
from rewardprism.data import DataError

VrmOverrides = overrides("model.lam=0.5")
DrmOverrides = overrides("n_components=20")


def train(
    config: Annotated[Path, typer.Option(help="recipe config YAML, e.g. configs/vrm_tiny.yaml")],
    override: VrmOverrides = None,
) -> None:
    """Train a VRM or BT reward model on Ray Train with DeepSpeed; export the model folder and its head set."""
    from rewardprism.recipes.vrm import VrmConfig, run

    log_progress()
    try:
        recipe = load_config(VrmConfig, config, override or [])
        metrics = run(recipe)  # checks config and data before any cluster starts
    except (ConfigError, DataError) as exc:
        fail(str(exc))
    summary = {k: metrics["eval"][k] for k in ("eval_pairs", "accuracy", "accuracy_by_group")}
    typer.echo(json.dumps({"model": str(recipe.export_dir), **summary}, indent=1))


def train_drm(
    config: Annotated[Path | None, typer.Option(help="recipe config YAML, e.g. configs/drm_synthetic.yaml "
                                                     "(default: DrmConfig's defaults)")] = None,
    override: DrmOverrides = None,
) -> None:
    """Embed a dataset, decompose its training split into a DRM head set, evaluate it (the paper's tables)."""
    from rewardprism.recipes.drm import DrmConfig, DrmRecipe

    log_progress()
    try:
        recipe = DrmRecipe(load_config(DrmConfig, config, override or []))
        recipe.setup()
    except ConfigError as exc:
        fail(str(exc))
    try:
        recipe.run()
        recipe.save()
    except DataError as exc:
        fail(f"dataset: {exc}")
    except ValueError as exc:  # a value the data makes impossible: n over a group's size, k over the dimension
        fail(str(exc))
    finally:
        recipe.cleanup()
    typer.echo(f"head set and report in {recipe.out}")
    overall = {row["label"]: round(row["reference"]["overall"][0], 4) for row in recipe.report["rows"]}
    typer.echo(json.dumps(overall, indent=1))
