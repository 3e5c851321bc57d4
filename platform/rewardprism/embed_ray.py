"""The embedding extractor across a Ray cluster: Ray Data `map_batches` over an actor pool.

Each actor loads the backbone and runs the same `EmbeddingExtractor` as the local path on whole shards; the
driver writes shards in order through the same `write_embeddings` loop, so the folder is identical to a local
run's (and either can resume the other's). The stream of shards goes to Ray Data a window at a time
(`shards_per_actor` shards for each actor), so the driver holds one window of pairs and one shard of features,
however many pairs there are: its memory is flat in the number of pairs, as the local path's is.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from rewardprism.data import PreferencePair
from rewardprism.embed import (
    EmbeddingExtractor,
    EmbedProgress,
    EmbedReport,
    ShardWriter,
    chunked,
    write_embeddings,
)
from rewardprism.features import FeatureSpec


class ShardEmbedder:
    """Ray Data actor: one backbone per actor, one shard per row."""

    def __init__(self, features: FeatureSpec, token_budget: int | None, max_batch: int, device: str | None):
        self.extractor = EmbeddingExtractor(features.load_backbone(device=device), token_budget, max_batch)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        chosen, rejected, tokens = [], [], []
        for rows in batch["pairs"]:
            c, r, t = self.extractor.embed_pairs([PreferencePair.from_row(row) for row in json.loads(rows)])
            chosen.append(c)
            rejected.append(r)
            tokens.append(t)
        return {"chosen": _objects(chosen), "rejected": _objects(rejected), "tokens": np.array(tokens)}


def _objects(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def embed_pairs_ray(pairs: Iterable[PreferencePair], features: FeatureSpec, out_dir: str | Path, *, dim: int,
                    num_actors: int = 2, cpus_per_actor: float = 1, gpus_per_actor: float = 0,
                    shard_size: int = 1024, token_budget: int | None = None, max_batch: int = 64,
                    dataset: str = "", shards_per_actor: int = 4, actor_resources: dict[str, float] | None = None,
                    progress: bool = True, total: int | None = None) -> EmbedReport:
    """Embed on the current Ray cluster (`ray.init()` first, or it starts a local one) the features `features`
    describes (`dim` of them per text, as `FeatureSpec.of` a backbone loaded on the driver tells).

    A window of `num_actors × shards_per_actor` shards is one Ray Data run (each actor loads the backbone once
    per window): larger windows load less often, smaller ones hold fewer pairs in the driver. The progress bar
    moves per shard (`total`: pairs expected). `actor_resources` (custom resources each actor also needs) pins
    the actors to the nodes that have them.
    """
    import ray
    from ray.data import ActorPoolStrategy

    if shards_per_actor < 1:
        raise ValueError(f"shards_per_actor must be at least 1, got {shards_per_actor}")

    def embed_chunks(todo: Iterator[list[PreferencePair]]) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # shards come back in the order they are written
        for window in chunked(todo, num_actors * shards_per_actor):
            # a shard travels as JSON text: Arrow would turn a chat prompt's list of messages into arrays
            ds = ray.data.from_items([{"pairs": json.dumps([p.to_row() for p in chunk])} for chunk in window],
                                     override_num_blocks=len(window))
            out = ds.map_batches(
                ShardEmbedder, batch_size=1, compute=ActorPoolStrategy(size=min(num_actors, len(window))),
                num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, resources=actor_resources,
                fn_constructor_kwargs=dict(features=features, token_budget=token_budget, max_batch=max_batch,
                                           device="cuda" if gpus_per_actor else None),
            )
            for row in out.iter_rows():
                yield row["chosen"], row["rejected"], int(row["tokens"])

    writer = ShardWriter(out_dir, features, dim, dataset)
    return write_embeddings(chunked(pairs, shard_size), writer, embed_chunks, EmbedProgress(total, progress))
