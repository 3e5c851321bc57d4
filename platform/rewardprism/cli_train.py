"""`rewardprism train`: the reward-model training recipe (`rewardprism.train`) from the command line.

`python train_vrm.py` runs this same command, so `ray job submit --working-dir . -- python train_vrm.py ...`
and `rewardprism train ...` take the same options.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer


def train(
    config: Annotated[Path, typer.Option(help="recipe config YAML, e.g. configs/vrm_tiny.yaml")],
    override: Annotated[list[str] | None, typer.Option(
        "--override", metavar="KEY=VALUE", help="set a config field, e.g. model.lam=0.5 (repeatable; values are YAML)")
    ] = None,
) -> None:
    """Train a VRM or BT reward model on Ray Train with DeepSpeed; export the model folder and its head set."""
    from rewardprism.cli import fail
    from rewardprism.data import DataError
    from rewardprism.train import load_config, run
    from rewardprism.vrm import ConfigError

    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("rewardprism").setLevel(logging.INFO)  # the recipe's progress lines
    try:
        recipe = load_config(config, override or [])
        metrics = run(recipe)  # checks config and data before any cluster starts
    except (ConfigError, DataError) as exc:
        fail(str(exc))
    summary = {k: metrics["eval"][k] for k in ("eval_pairs", "accuracy", "accuracy_by_group")}
    typer.echo(json.dumps({"model": str(recipe.export_dir), **summary}, indent=1))
