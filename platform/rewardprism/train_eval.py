"""The VRM recipe's final evaluation of an exported reward model, on the driver.

Held-out pairwise accuracy per group, per-group personalized accuracy over the exported head set, and
objective/attribute correlations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rewardprism.adapt import bt as fit_profiles
from rewardprism.data import PreferencePair, groups_of, render_prompt
from rewardprism.embed import EmbeddingExtractor
from rewardprism.vrm import RewardModel


@dataclass
class PairScores:
    """A model's view of N pairs: E[w | x] (N, K) and objective scores of each side (N, K)."""

    weights: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray

    @property
    def margins(self) -> np.ndarray:
        """r_chosen − r_rejected with the prompt's expected weights, (N,)."""
        return (self.weights * (self.chosen - self.rejected)).sum(1)


@torch.no_grad()
def score_pairs(model: RewardModel, pairs: list[PreferencePair]) -> PairScores:
    """Features by the length-sorted batched extractor, then the heads at the posterior means."""
    extractor = EmbeddingExtractor(model.backbone)
    chosen, rejected, _ = extractor.embed_pairs(pairs)  # (N, d) each
    device, dtype = model.backbone.device, model.heads["score"].weight.dtype  # features come back as float32

    def heads(features: np.ndarray) -> np.ndarray:
        return model.objective_scores(torch.from_numpy(features).to(device, dtype)).float().cpu().numpy()

    if model.is_vrm:
        prompts, _ = extractor.embed_texts([render_prompt(p.prompt, model.backbone.tokenizer) for p in pairs],
                                           model.config.prompt_max_length)
        weights = model.expected_weights(torch.from_numpy(prompts).to(device, dtype)).float().cpu().numpy()
    else:
        weights = np.ones((len(pairs), 1), dtype=np.float32)
    return PairScores(weights, heads(chosen), heads(rejected))


def evaluate_model(model: RewardModel, train: list[PreferencePair], held_out: list[PreferencePair], *,
                   personalize: bool = True) -> dict[str, Any]:
    """Held-out pairwise accuracy, overall and per group; per-group personalized accuracy; objective correlations.

    Personalized: each group's profile over the exported heads, fitted on that group's training pairs by
    `rewardprism.adapt.bt` (MAP, centred on the population profile), scores its held-out pairs — how a user of
    the platform is served. Correlations (when pairs carry attribute ratings): of each objective score s_k
    with each attribute over the held-out responses.
    """
    scores = score_pairs(model, held_out)
    groups = groups_of(held_out)
    correct = scores.margins > 0
    result: dict[str, Any] = {"eval_pairs": len(held_out), "accuracy": float(correct.mean()),
                              "accuracy_by_group": {g: float(correct[groups == g].mean()) for g in sorted(set(groups))}}
    if personalize:
        train_scores, train_groups = score_pairs(model, train), groups_of(train)
        prior = model.default_weights.float().cpu().numpy()
        personalized = {}
        for g in result["accuracy_by_group"]:
            mine = train_groups == g
            if not mine.any():
                continue
            weights, _ = fit_profiles(train_scores.chosen[mine][None], train_scores.rejected[mine][None], prior=prior)
            held = groups == g
            personalized[g] = float((((scores.chosen[held] - scores.rejected[held]) @ weights[0]) > 0).mean())
        result["personalized_accuracy_by_group"] = personalized
    names = sorted(set.intersection(*(set(p.attributes["chosen"]) for p in held_out))) \
        if held_out and all(p.attributes for p in held_out) else []  # the ratings every pair carries
    if names:
        ratings = np.array([[p.attributes[side][n] for n in names] for side in ("chosen", "rejected")
                            for p in held_out])  # (2N, A)
        objectives = np.concatenate([scores.chosen, scores.rejected])  # (2N, K)
        corr = np.corrcoef(objectives.T, ratings.T)[:objectives.shape[1], objectives.shape[1]:]  # (K, A)
        result["objective_attribute_corr"] = {
            h: {a: round(float(c), 4) for a, c in zip(names, row)} for h, row in zip(model.config.head_names, corr)}
    return result
