"""Embed → decompose → evaluate: a decomposed reward model and the paper's tables, as one recipe.

    python train_drm.py --config configs/drm_minilm_alpaca_gpt4.yaml [--override n_components=20 ...]
    python train_drm.py --override backbone=minilm --override output_dir=runs/drm-synthetic   # synthetic data
    ray job submit --working-dir . -- python train_drm.py --config configs/drm_minilm_alpaca_gpt4.yaml

Every field of `DrmConfig` can be overridden (`--override field=value`, values read as YAML). Without a running
cluster `ray.init()` starts a local one; under `ray job submit` (RAY_ADDRESS) it joins that. The recipe — setup,
run, save, cleanup — is `rewardprism.recipes.drm.DrmRecipe`.
"""
import typer
from rewardprism.cli_common import config_fields
from rewardprism.cli_train import train_drm
from rewardprism.recipes.drm import DrmConfig

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
app.command(epilog=config_fields(DrmConfig))(train_drm)  # --help lists the fields --override takes

if __name__ == "__main__":
    app()
