"""Train a VRM or BT reward model on Ray Train with DeepSpeed; export the model folder and its head set.

    python train_vrm.py --config configs/vrm_tiny.yaml [--override train.epochs=3 ...]
    ray job submit --working-dir . -- python train_vrm.py --config configs/vrm_minilm_cpu.yaml

Without a running cluster `ray.init()` starts a local one; with `ray start --head` (or RAY_ADDRESS) it joins
that. The recipe — setup, train, save_checkpoint, cleanup — is `rewardprism.recipes.vrm.VrmRecipe`, shared with
`rewardprism train`, so Ray workers import it from the installed package whatever the job's working directory.
"""
import typer
from rewardprism.cli_train import train

if __name__ == "__main__":
    typer.run(train)
