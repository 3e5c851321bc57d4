"""The VRM recipe's data: preference pairs → train/eval split by prompt → optional supervision targets.

Targets are attribute ratings, or standardized DRM head scores (no ratings needed). Texts stay text here:
`PairCollator` renders and tokenizes them in each training worker, per batch, so the driver never loads the
reward model's backbone.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from rewardprism.backbone import Backbone, load_backbone
from rewardprism.config import ConfigError
from rewardprism.data import DataError, PreferencePair, render, render_prompt, split_by_prompt
from rewardprism.drm import PreferenceDecomposition, build_head_set
from rewardprism.embed import EmbeddingExtractor
from rewardprism.features import FeatureSpec
from rewardprism.heads import HeadSet
from rewardprism.sources import open_dataset
from rewardprism.vrm import RewardModelConfig


@dataclass
class DataConfig:
    source: str = "synthetic"  # 'synthetic', a json/jsonl(.gz)/parquet file or folder, or a hub dataset name
    format: Literal["auto", "canonical", "trl", "hh-rlhf", "alpaca-eval"] = "auto"
    split: str = "train"  # hub split
    limit: int | None = None  # first N pairs of the source
    group: str | None = None  # group of pairs that carry none
    skip_bad_rows: bool = False  # leave out (and log) rows that fail to parse instead of stopping
    synthetic_per_user: int = 200
    seed: int = 0  # synthetic generator and train/eval split
    test_fraction: float = 0.2
    supervision: Literal["none", "ratings", "drm"] = "none"
    drm_heads: str | None = None  # supervision: drm from a head set folder (`rewardprism decompose`) ...
    drm_backbone: str | None = None  # ... or from a DRM fitted here on the training split with this backbone
    drm_head_names: list[str] = field(default_factory=list)  # heads to use; empty: +pc0 ... +pc{K-1}

    def __post_init__(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError("test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        if self.limit is not None and self.limit < 2:
            raise ConfigError("limit", f"must be at least 2 pairs (one to train, one to evaluate), got {self.limit}")
        if self.synthetic_per_user < 1:
            raise ConfigError("synthetic_per_user", f"must be positive, got {self.synthetic_per_user}")
        if self.supervision == "drm" and bool(self.drm_heads) == bool(self.drm_backbone):
            raise ConfigError("drm_heads", "supervision: drm needs either drm_heads (a DRM head set folder) or "
                                           "drm_backbone (fit a DRM on the training split), not both")


@dataclass
class PreparedData:
    """Validated pairs, split by prompt, with (N, 2, K) targets (chosen, rejected) when supervised."""

    train: list[PreferencePair]
    eval: list[PreferencePair]
    train_targets: np.ndarray | None = None
    eval_targets: np.ndarray | None = None


def check_supervision(data: DataConfig, model: RewardModelConfig) -> None:
    """The supervision and the model agree (the checks that need no data)."""
    if data.supervision != "none" and model.lam == 0:
        raise ConfigError("model.lam", f"is 0 with data.supervision: {data.supervision}; set lam > 0 to "
                                       "supervise, or supervision: none for the unsupervised model")
    if data.supervision == "none" and model.lam > 0:
        raise ConfigError("data.supervision", "is none but model.lam > 0: choose ratings or drm")
    if data.supervision == "ratings" and not model.objective_names:
        raise ConfigError("model.objective_names", "supervision: ratings needs the K rating attributes to supervise, "
                                                   "e.g. [length, formality, lists, hedging, humour, refusal]")


def prepare_data(data: DataConfig, model: RewardModelConfig) -> PreparedData:
    """Everything the driver checks and computes before the cluster starts; errors name the field (in the
    recipe's `data` and `model` sections) or the row."""
    check_supervision(data, model)
    pairs = list(open_dataset(data.source, split=data.split, fmt=data.format, limit=data.limit,
                              group=data.group, synthetic_per_user=data.synthetic_per_user, seed=data.seed,
                              skip_bad_rows=data.skip_bad_rows))
    if len(pairs) < 2:
        raise DataError(f"needs at least 2 pairs, got {len(pairs)}", source=data.source)
    train_idx, eval_idx = split_by_prompt(pairs, data.test_fraction, data.seed)
    if not train_idx or not eval_idx:
        raise ConfigError("data.test_fraction", f"leaves an empty split of {len(pairs)} pairs; "
                                                "use more pairs or another fraction")
    prepared = PreparedData([pairs[i] for i in train_idx], [pairs[i] for i in eval_idx])
    if data.supervision == "ratings":
        targets = rating_targets(pairs, model.objective_names, data.source)
        if model.sup_loss == "ce" and (targets.min() < 0 or targets.max() > 1):
            raise ConfigError("model.sup_loss", "ce reads ratings as probabilities, but they leave [0, 1]; "
                                                "use mse or rescale the ratings")
    elif data.supervision == "drm":
        targets = drm_targets(pairs, train_idx, data, model)
    else:
        return prepared
    prepared.train_targets, prepared.eval_targets = targets[train_idx], targets[eval_idx]
    return prepared


def rating_targets(pairs: list[PreferencePair], names: list[str], source: str) -> np.ndarray:
    """(N, 2, K) attribute ratings of the chosen and rejected responses, read by objective name."""
    out = np.empty((len(pairs), 2, len(names)), dtype=np.float32)
    for i, pair in enumerate(pairs):
        for s, side in enumerate(("chosen", "rejected")):
            ratings = (pair.attributes or {}).get(side)
            if not isinstance(ratings, dict):
                raise DataError("supervision: ratings needs attribute ratings on every pair", source=source, row=i,
                                field=f"attributes.{side}")
            for k, name in enumerate(names):
                value = ratings.get(name)
                if not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise DataError(f"missing or non-finite rating (have {sorted(ratings)})", source=source, row=i,
                                    field=f"attributes.{side}.{name}")
                out[i, s, k] = value
    return out


def drm_targets(pairs: list[PreferencePair], train_idx: list[int], data: DataConfig,
                model: RewardModelConfig) -> np.ndarray:
    """(N, 2, K) standardized scores of K DRM heads: the supervision that needs no ratings.

    The heads come from `data.drm_heads`, or from a DRM (`rewardprism.drm`) fitted on the training pairs only,
    so held-out labels never shape the targets. Responses are embedded once with the head set's backbone (a
    small one, such as MiniLM, serves any VRM backbone: targets are just numbers per response). Each head is
    oriented toward the preference, standardized with the mean and std of the training responses, and for
    `ce` squashed by a sigmoid into a soft label.
    """
    k = model.num_objectives
    names = data.drm_head_names or [f"+pc{i}" for i in range(k)]
    heads = None
    if data.drm_heads:
        try:
            heads = HeadSet.load(data.drm_heads)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError("data.drm_heads", str(exc)) from None
    available = heads.head_names if heads else [f"{sign}pc{i}" for sign in "+-" for i in range(k)]
    missing = [n for n in names if n not in available]
    if len(names) != k or missing:
        raise ConfigError("data.drm_head_names", f"needs {k} (model.num_objectives) heads; missing {missing}, "
                                                 f"available {available}")
    # The text the VRM reads: its max_length, keeping the end (targets the model's features cannot see are noise).
    backbone = load_backbone(heads.backbone if heads else data.drm_backbone, max_length=model.max_length)
    backbone.tokenizer.truncation_side = "left"
    chosen, rejected, _ = EmbeddingExtractor(backbone).embed_pairs(pairs)  # (N, d) each
    if heads is None:
        decomposition = PreferenceDecomposition(k).fit(chosen[train_idx], rejected[train_idx])
        heads = build_head_set(decomposition, features=FeatureSpec.of(backbone))
    columns = [heads.head_names.index(n) for n in names]
    scores = np.stack([heads.scores(chosen)[:, columns], heads.scores(rejected)[:, columns]], axis=1)  # (N, 2, K)
    # A component's sign is arbitrary, and Dirichlet weights are non-negative: orient every target so that the
    # chosen response scores higher on average over the training pairs, so that the reward can use it.
    scores *= np.where((scores[train_idx, 0] - scores[train_idx, 1]).mean(0) < 0, -1.0, 1.0)
    reference = scores[train_idx].reshape(-1, k)
    standardized = (scores - reference.mean(0)) / np.maximum(reference.std(0), 1e-6)
    return (1 / (1 + np.exp(-standardized)) if model.sup_loss == "ce" else standardized).astype(np.float32)


class PairCollator:
    """A batch of Ray Data rows → the padded tensors `RewardModel.forward` takes, on the backbone's device."""

    def __init__(self, backbone: Backbone, with_prompts: bool, prompt_max_length: int | None = None):
        self.extractor, self.with_prompts = EmbeddingExtractor(backbone), with_prompts
        self.prompt_max_length = prompt_max_length  # tokens of the prompt alone, for q(w | x)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        pairs = [PreferencePair.from_row(json.loads(row)) for row in batch["pair"]]
        tok = self.extractor.backbone.tokenizer
        texts = [render(p.prompt, p.chosen, tok) for p in pairs] + [render(p.prompt, p.rejected, tok) for p in pairs]
        input_ids, attention_mask = self.extractor.pad(self.extractor.tokenize(texts))  # (2B, T)
        device = input_ids.device
        out = {"input_ids": input_ids, "attention_mask": attention_mask,
               "weight": torch.tensor([p.weight for p in pairs], device=device)}
        if self.with_prompts:
            prompts = self.extractor.tokenize([render_prompt(p.prompt, tok) for p in pairs], self.prompt_max_length)
            out["prompt_ids"], out["prompt_mask"] = self.extractor.pad(prompts)  # (B, Tp)
        if "targets" in batch:
            targets = torch.as_tensor(np.stack(batch["targets"]), device=device)  # (B, 2, K)
            out["targets"] = torch.cat([targets[:, 0], targets[:, 1]])  # (2B, K) rows as in input_ids
        return out
