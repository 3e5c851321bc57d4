"""`rewardprism` command line: one sub-command per job, each a thin shell over the library."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from rewardprism.cli_common import fail
from rewardprism.cli_drm import adapt, decompose, evaluate
from rewardprism.cli_heads import heads_app
from rewardprism.cli_pools import pools_app
from rewardprism.cli_serve import serve as serve_command
from rewardprism.cli_store import audit_app, db_app, keys_app, models_app, users_app
from rewardprism.cli_train import train as train_command
from rewardprism.data import DataError, DatasetSummary

app = typer.Typer(help="RewardPrism: decomposed, personalized reward models.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
app.add_typer(db_app, name="db")
app.add_typer(users_app, name="users")
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")
app.add_typer(pools_app, name="pools")
app.add_typer(audit_app, name="audit")
app.add_typer(heads_app, name="heads")
app.command("serve")(serve_command)
app.command("train")(train_command)
app.command()(decompose)
app.command()(adapt)
app.command()(evaluate)


@app.callback()
def main() -> None:
    """Sub-commands: embed, decompose, adapt, evaluate, train, serve, heads, db, users, keys, models, pools, audit."""


@app.command()
def embed(
    dataset: str = typer.Option("synthetic", help="'synthetic', a json/jsonl(.gz)/parquet file or folder, "
                                                  "or a Hugging Face dataset name"),
    out: Path = typer.Option(..., help="output folder (resumable: reruns skip finished shards)"),
    backbone: str = typer.Option("minilm", envvar="RP_EMBED_BACKBONE",
                                 help="minilm, smollm2, tiny-bert, tiny-llama, a folder, a .gguf file or a hub name"),
    split: str = typer.Option("train", help="split, for hub datasets"),
    fmt: str = typer.Option("auto", "--format", help="auto, canonical, trl, hh-rlhf, alpaca-eval"),
    group: str | None = typer.Option(None, help="group for pairs that carry none"),
    limit: int | None = typer.Option(None, min=1, help="embed only the first N pairs"),
    skip_bad_rows: bool = typer.Option(False, help="log and leave out malformed rows instead of stopping"),
    max_length: int = typer.Option(512, min=8, help="tokens per text; longer texts are truncated"),
    token_budget: int | None = typer.Option(None, min=1, help="padded tokens per forward batch "
                                                              "(default: 2048 on CPU, 65536 on CUDA)"),
    max_batch: int = typer.Option(64, min=1, help="texts per forward batch, at most"),
    shard_size: int = typer.Option(4096, min=1, help="pairs per shard on disk"),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda if available)"),
    ray: bool = typer.Option(False, "--ray", help="run on the Ray cluster (Ray Data, an actor pool)"),
    num_actors: int = typer.Option(2, min=1, help="actors, with --ray"),
    synthetic_per_user: int = typer.Option(500, min=1, envvar="RP_SYNTHETIC_PER_USER",
                                           help="pairs per simulated user (4 users), for 'synthetic'"),
    seed: int = typer.Option(0, help="seed of the synthetic generator"),
) -> None:
    """Embed every pair's chosen and rejected response with a backbone, streaming shards to disk."""
    from rewardprism.backbone import load_backbone
    from rewardprism.embed import EmbeddingSet, embed_pairs
    from rewardprism.features import FeatureSpec
    from rewardprism.sources import first_checked, open_dataset, size_hint

    try:  # the data is checked (its first pair read, its size counted) before a backbone loads
        pairs = first_checked(open_dataset(dataset, split=split, fmt=fmt, limit=limit, group=group,
                                           synthetic_per_user=synthetic_per_user, seed=seed,
                                           skip_bad_rows=skip_bad_rows), dataset)
        total = size_hint(dataset, limit=limit, synthetic_per_user=synthetic_per_user)
        if ray:
            import ray as ray_lib

            from rewardprism.embed_ray import embed_pairs_ray

            ray_lib.init(ignore_reinit_error=True)
            probe = load_backbone(backbone, max_length=max_length, device="cpu")
            report = embed_pairs_ray(pairs, FeatureSpec.of(probe), out, dim=probe.dim, num_actors=num_actors,
                                     shard_size=shard_size, token_budget=token_budget, max_batch=max_batch,
                                     dataset=dataset, total=total)
        else:
            model = load_backbone(backbone, max_length=max_length, device=device)
            report = embed_pairs(pairs, model, out, shard_size=shard_size, token_budget=token_budget,
                                 max_batch=max_batch, dataset=dataset, total=total)
    except (DataError, FileNotFoundError) as exc:
        fail(str(exc))
    summary = DatasetSummary.of(EmbeddingSet(out).pairs())
    typer.echo(json.dumps({"out": str(out), "pairs": report.n_pairs, "prompts": summary.n_prompts,
                           "groups": summary.groups, "tokens_embedded": report.tokens,
                           "tokens_per_s": round(report.tokens_per_s, 1), "shards_written": report.shards_written,
                           "shards_reused": report.shards_reused}, indent=1))


if __name__ == "__main__":
    app()
