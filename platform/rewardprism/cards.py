"""Head cards: what each head of a head set means, read off the pairs it was fitted on.

A head's margin on a pair is its score of the chosen response minus its score of the rejected one. A card holds
the pairs with the highest and the lowest margins (short excerpts), the head's explained variance (DRM), and,
where the pairs carry them, the rating attributes its margins correlate with (the attribute's chosen − rejected
difference, Pearson r) and the groups that prefer its direction most and least (mean margin, in standard
deviations of all margins). `summary` says it in one line, for listings (`users show`, explanations).

Cards are saved beside the head set, as `cards.json` in its folder (not covered by its content hash: they
describe the heads, they are not part of them).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rewardprism.data import PreferencePair, render_prompt
from rewardprism.heads import HeadSet

CARDS = "cards.json"
MIN_ABS_R = 0.2  # weaker correlations are not named in a summary


@dataclass
class HeadCard:
    head: str
    summary: str
    explained_variance_ratio: float | None = None
    correlations: list[dict[str, Any]] = field(default_factory=list)  # [{attribute, r}], strongest first
    groups: list[dict[str, Any]] = field(default_factory=list)  # [{group, mean_margin_sd}], highest first
    highest: list[dict[str, Any]] = field(default_factory=list)  # [{prompt, chosen, rejected, margin}]
    lowest: list[dict[str, Any]] = field(default_factory=list)

    def without_excerpts(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("highest", "lowest")}


def _excerpt(text: str, chars: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= chars else text[:chars - 1] + "…"


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _explained(heads: HeadSet) -> dict[str, float]:
    """DRM heads ±pcK → the K-th direction's share of the variance of preference differences."""
    ratios = heads.info.get("explained_variance_ratio") or []
    return {f"{sign}pc{k}": float(r) for k, r in enumerate(ratios) for sign in "+-"}


def head_cards(heads: HeadSet, chosen: np.ndarray, rejected: np.ndarray, pairs: list[PreferencePair], *,
               examples: int = 3, excerpt: int = 80) -> list[HeadCard]:
    """One card per head of `heads`, from pairs (and their chosen / rejected features) it was fitted on."""
    margins = heads.scores(chosen) - heads.scores(rejected)  # (N, H)
    explained = _explained(heads)
    names = sorted({a for p in pairs if p.attributes for side in p.attributes.values() for a in side})
    differences = {a: np.array([p.attributes["chosen"].get(a, np.nan) - p.attributes["rejected"].get(a, np.nan)
                                if p.attributes else np.nan for p in pairs]) for a in names}
    groups = np.array([p.group or "" for p in pairs])
    cards = []
    for h, head in enumerate(heads.head_names):
        m = margins[:, h]
        correlations = []
        for attribute, diff in differences.items():
            known = ~np.isnan(diff)
            r = _pearson(diff[known], m[known])
            if r is not None:
                correlations.append({"attribute": attribute, "r": round(r, 3)})
        correlations.sort(key=lambda c: -abs(c["r"]))
        spread = m.std() or 1.0
        by_group = [{"group": g, "mean_margin_sd": round(float(m[groups == g].mean() / spread), 3)}
                    for g in sorted(set(groups) - {""})] if len(set(groups) - {""}) > 1 else []
        by_group.sort(key=lambda g: -g["mean_margin_sd"])
        order = np.argsort(-m, kind="stable")
        card = HeadCard(head, "", explained.get(head), correlations, by_group,
                        _examples(pairs, m, order[:examples], excerpt), _examples(pairs, m, order[::-1][:examples],
                                                                                   excerpt))
        card.summary = _summary(card)
        cards.append(card)
    return cards


def _examples(pairs: list[PreferencePair], margins: np.ndarray, indices: np.ndarray,
              chars: int) -> list[dict[str, Any]]:
    return [{"prompt": _excerpt(render_prompt(pairs[i].prompt), chars), "chosen": _excerpt(pairs[i].chosen, chars),
             "rejected": _excerpt(pairs[i].rejected, chars), "margin": round(float(margins[i]), 4)} for i in indices]


def _summary(card: HeadCard) -> str:
    parts = []
    if card.explained_variance_ratio is not None:
        parts.append(f"{100 * card.explained_variance_ratio:.1f}% of variance")
    named = [c for c in card.correlations if abs(c["r"]) >= MIN_ABS_R][:2]
    parts += [f"{'more' if c['r'] > 0 else 'less'} {c['attribute']} (r {c['r']:+.2f})" for c in named]
    if card.groups:
        parts.append(f"favoured by {card.groups[0]['group']}")
    if not named and card.highest:
        parts.append(f"prefers e.g. “{_excerpt(card.highest[0]['chosen'], 40)}”")
    return "; ".join(parts)


def save_cards(folder: str | Path, cards: list[HeadCard]) -> Path:
    """`cards.json` in the head set's folder, replaced atomically."""
    path = Path(folder) / CARDS
    tmp = path.with_name(f".{CARDS}.tmp")
    tmp.write_text(json.dumps([asdict(c) for c in cards], indent=1, ensure_ascii=False))
    os.replace(tmp, path)
    return path


def load_cards(folder: str | Path) -> dict[str, HeadCard] | None:
    """The cards saved beside a head set, by head name; None when it has none."""
    path = Path(folder) / CARDS
    if not path.is_file():
        return None
    return {c["head"]: HeadCard(**c) for c in json.loads(path.read_text())}
