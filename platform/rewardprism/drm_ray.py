"""The decomposition of an embedding folder, streamed locally or spread over a Ray cluster.

Either way each shard file is reduced to its moments (count, mean, centred scatter: d × d floats whatever its
size) and the moments are merged in shard order, so both paths give the same components and no process ever
holds more than one shard's features. On Ray, one task per shard reads it from storage the workers share.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from rewardprism.drm import DifferenceMoments, PreferenceDecomposition
from rewardprism.embed import EmbeddingSet


def shard_moments(path: str, file: str, keep: np.ndarray | None = None) -> DifferenceMoments:
    """Moments of one shard file; `keep` (bool per row) selects rows, e.g. the training split."""
    tensors = load_file(Path(path) / file)
    chosen, rejected = tensors["chosen"], tensors["rejected"]
    if keep is not None:
        chosen, rejected = chosen[keep], rejected[keep]
    return DifferenceMoments.of(chosen, rejected)


def _shard_keeps(data: EmbeddingSet, rows: np.ndarray | None) -> Iterator[tuple[str, np.ndarray | None]]:
    """(file, row mask) per shard, the mask cut from a folder-wide selection of row indices."""
    selected = None
    if rows is not None:
        selected = np.zeros(len(data), dtype=bool)
        selected[np.asarray(rows, dtype=int)] = True
    for shard in data.index["shards"]:
        yield shard["file"], None if selected is None else selected[shard["start"]:shard["stop"]]


def decompose_folder(embeddings: str | Path, n_components: int = 50, *, rows: np.ndarray | None = None,
                     use_ray: bool = False, num_cpus: float = 1) -> PreferenceDecomposition:
    """Decompose the pairs of an embedding folder (all, or the `rows` given), streaming shard by shard.

    With `use_ray`, one Ray task per shard (`ray.init()` first, or a local cluster starts); the driver fetches
    and merges one result at a time, in shard order, so scheduling never changes the result.
    """
    data = EmbeddingSet(embeddings)
    if not data.index["shards"]:
        raise ValueError(f"{embeddings} holds no shards")
    path = str(data.path.resolve())
    total = DifferenceMoments.zeros(data.dim)
    if use_ray:
        import ray

        task = ray.remote(num_cpus=num_cpus)(shard_moments)
        refs = [task.remote(path, file, keep) for file, keep in _shard_keeps(data, rows)]
        for ref in refs:
            total = total + ray.get(ref)
    else:
        for file, keep in _shard_keeps(data, rows):
            total = total + shard_moments(path, file, keep)
    return PreferenceDecomposition(n_components).fit_moments(total)
