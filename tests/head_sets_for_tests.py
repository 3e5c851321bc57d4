"""Head sets, feature specs and expected scores for the tests, computed here from the library (never copied)."""
from __future__ import annotations

import numpy as np
from rewardprism.data import render
from rewardprism.features import FeatureSpec
from rewardprism.heads import HeadSet

MAX_TOKENS = 48  # the test head sets' feature spec: tiny-bert's texts cut at 48 tokens


def made_up_features(backbone: str, max_length: int = 512) -> FeatureSpec:
    """The feature spec of features a test makes up as arrays (no backbone reads them)."""
    return FeatureSpec(backbone, max_length, "right", "mean", "joiner")


def random_head_set(dim: int, heads: int, version: str, seed: int) -> HeadSet:
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(heads, dim)) / np.sqrt(dim)
    return HeadSet(weight, np.zeros(heads), [f"head{i}" for i in range(heads)], "drm", "tiny-bert",
                   np.eye(heads)[0], name="default", version=version,
                   features=made_up_features("tiny-bert", MAX_TOKENS))


def expected_head_scores(backbone, heads: HeadSet, prompt, responses: list[str]) -> np.ndarray:
    """(n, H) head scores computed here, straight from the library."""
    return heads.scores(backbone.encode([render(prompt, r, backbone.tokenizer) for r in responses]).numpy())
