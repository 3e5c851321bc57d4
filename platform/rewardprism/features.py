"""The feature spec: how a text becomes the features a head set was fitted on.

A head set's heads are linear in φ(text), so they are only right for the φ they were fitted on: the same
backbone, pooling, token limit, side the limit cuts from, and rendering of (prompt, response) into one text. A
spec records all of that where the features are made (an embedding folder's index, a trained model's config)
and travels into the head set, covered by its content hash; every path that scores with a head set builds its
backbone from the spec (`load_backbone`) and refuses features made otherwise (`require_same`), so the scores the
service returns are the scores `evaluate` measured.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # torch and transformers load only when a backbone does: head sets are read without them
    import torch

    from rewardprism.backbone import Backbone, Pooling

TruncationSide = Literal["right", "left"]
Rendering = Literal["chat_template", "joiner"]


class FeatureMismatch(ValueError):
    """Features made one way offered to a head set fitted on features made another way."""


@dataclass(frozen=True)
class FeatureSpec:
    backbone: str  # a `load_backbone` spec: where the weights come from
    max_length: int  # tokens per rendered (prompt, response) text
    truncation_side: TruncationSide  # "right" keeps a long text's beginning, "left" its end (the response)
    pooling: Pooling
    # "chat_template": the conversation through the tokenizer's chat template; "joiner": plain text
    # (`rewardprism.data.render`). Which one a backbone uses follows from its tokenizer: recorded to catch a swap.
    rendering: Rendering

    def __post_init__(self) -> None:
        checks = {"backbone": isinstance(self.backbone, str) and bool(self.backbone),
                  "max_length": isinstance(self.max_length, int) and self.max_length >= 1,
                  "truncation_side": self.truncation_side in ("right", "left"),
                  "pooling": self.pooling in ("last", "mean"),
                  "rendering": self.rendering in ("chat_template", "joiner")}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"feature spec: invalid {name} {getattr(self, name)!r}")

    @classmethod
    def of(cls, backbone: Backbone) -> FeatureSpec:
        """The spec of the features a loaded backbone makes now."""
        tokenizer = backbone.tokenizer
        return cls(backbone.name, backbone.max_length, tokenizer.truncation_side, backbone.pooling,
                   rendering_of(tokenizer))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FeatureSpec:
        if not isinstance(values, dict):
            raise ValueError(f"feature spec must be a mapping, got {type(values).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        if sorted(values) != sorted(names):
            raise ValueError(f"feature spec needs exactly the fields {names}, got {sorted(values)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_backbone(self, *, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                      weights_from: str | None = None) -> Backbone:
        """A backbone that makes exactly these features; `weights_from` loads the same model from elsewhere
        (a local copy of a hub model, say) and is refused when what it loads makes other features."""
        from rewardprism.backbone import load_backbone

        backbone = load_backbone(weights_from or self.backbone, device=device, dtype=dtype, pooling=self.pooling,
                                 max_length=self.max_length)
        backbone.tokenizer.truncation_side = self.truncation_side
        made = dataclasses.replace(FeatureSpec.of(backbone), backbone=self.backbone)
        if made != self:
            raise FeatureMismatch(f"{weights_from or self.backbone} makes features {made.describe()}, "
                                  f"not the {self.describe()} they must be")
        return backbone

    def describe(self) -> str:
        return (f"{self.backbone} ({self.pooling} pooling, {self.max_length} tokens cut on the "
                f"{self.truncation_side}, {self.rendering} rendering)")


def rendering_of(tokenizer: Any) -> Rendering:
    return "chat_template" if getattr(tokenizer, "chat_template", None) else "joiner"


def require_same(expected: FeatureSpec, offered: FeatureSpec, what: str) -> None:
    """Refuse `offered` features (`what` names them) for a head set fitted on `expected` ones."""
    if offered != expected:
        raise FeatureMismatch(f"{what} holds features of {offered.describe()}, but the head set was fitted on "
                              f"{expected.describe()}")


def recorded_model_spec(folder: str) -> FeatureSpec | None:
    """The spec of a reward model folder written before specs were recorded, from its `reward_config.json` and
    tokenizer files (a trained model keeps the end of a long text); None when the folder does not say."""
    path = Path(folder)
    try:
        meta = json.loads((path / "reward_config.json").read_text())
        tokenizer = json.loads((path / "tokenizer_config.json").read_text())
        templated = bool(tokenizer.get("chat_template")) or any(path.glob("chat_template.*"))
        return FeatureSpec(folder, int(meta["config"]["max_length"]), "left", meta["pooling"],
                           "chat_template" if templated else "joiner")
    except (OSError, ValueError, KeyError, TypeError):
        return None
