"""Head sets and expected scores for the service's tests, computed here from the library (never copied)."""
from __future__ import annotations

import numpy as np
from rewardprism.data import render
from rewardprism.heads import HeadSet


def random_head_set(dim: int, heads: int, version: str, seed: int) -> HeadSet:
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(heads, dim)) / np.sqrt(dim)
    return HeadSet(weight, np.zeros(heads), [f"head{i}" for i in range(heads)], "drm", "tiny-bert",
                   np.eye(heads)[0], name="default", version=version)


def expected_head_scores(backbone, heads: HeadSet, prompt, responses: list[str]) -> np.ndarray:
    """(n, H) head scores computed here, straight from the library."""
    return heads.scores(backbone.encode([render(prompt, r, backbone.tokenizer) for r in responses]).numpy())
