"""A head set: H linear reward heads over a backbone's features, and the profiles that combine them.

DRM's principal directions and VRM's objective scores are both head sets: scores S = φ Wᵀ + b, (N, H). A
user's profile is a weight vector over those heads plus a bias, so one personalized score is S · w + c.
Serving, storage and adaptation see only this shape, whichever method made the heads.

Saved as a folder: `heads-<content hash>.safetensors` (weight (H, d), bias (H,), default_weights (H,)) and
`headset.json` (name, version, kind, backbone, dim, num_heads, head_names, default_weights, content_hash,
created, dataset, `tensors`: that file's name, `features`: the feature spec (`rewardprism.features`), and
method-specific `info` such as explained variance). Saving
over a head set writes the new tensors beside the old ones and then replaces `headset.json`, the one step that
switches versions, so an interruption leaves the old head set or the new one, never a mix. The content hash
covers the tensors and the fields that change scores (the feature spec among them), so a registry can tell two
versions apart.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from rewardprism.features import FeatureMismatch, FeatureSpec, recorded_model_spec

Kind = Literal["drm", "vrm", "bt"]
META = "headset.json"
TENSORS = "heads.safetensors"  # what folders saved before 2026-12 hold


@dataclass
class HeadSet:
    weight: np.ndarray  # (H, d)
    bias: np.ndarray  # (H,)
    head_names: list[str]
    kind: Kind
    backbone: str
    default_weights: np.ndarray  # (H,) the population profile: what a user with no feedback gets
    name: str = "default"
    version: str = "1"
    dataset: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    features: FeatureSpec | None = None  # None only in head sets saved before specs were recorded

    def __post_init__(self) -> None:
        self.weight = np.asarray(self.weight, dtype=np.float32)
        self.bias = np.asarray(self.bias, dtype=np.float32)
        self.default_weights = np.asarray(self.default_weights, dtype=np.float32)
        h = self.weight.shape[0]
        if self.weight.ndim != 2 or self.bias.shape != (h,) or self.default_weights.shape != (h,) \
                or len(self.head_names) != h:
            raise ValueError(f"inconsistent head set: weight {self.weight.shape}, bias {self.bias.shape}, "
                             f"default_weights {self.default_weights.shape}, {len(self.head_names)} names")
        if not (np.isfinite(self.weight).all() and np.isfinite(self.bias).all()
                and np.isfinite(self.default_weights).all()):
            raise ValueError("head set holds NaN or inf")
        if self.features is not None and self.features.backbone != self.backbone:
            raise ValueError(f"feature spec is over {self.features.backbone!r}, the head set over {self.backbone!r}")

    @property
    def num_heads(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    @property
    def hyperprior_center(self) -> float | None:
        """The default adaptation's calibrated hyperprior centre (`evaluate.calibrate_hyperprior`), if any."""
        center = self.info.get("hyperprior_center")
        return None if center is None else float(center)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(N, d) features → (N, H) head scores."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be (N, {self.dim}) for this head set, got {features.shape}")
        return features @ self.weight.T + self.bias

    @property
    def content_hash(self) -> str:
        h = hashlib.sha256()
        for array in (self.weight, self.bias, self.default_weights):
            h.update(np.ascontiguousarray(array).tobytes())
        h.update(json.dumps([self.kind, self.backbone, self.head_names]).encode())
        if self.features is not None:  # absent from head sets saved before specs: their hashes stay valid
            h.update(json.dumps(self.features.to_dict(), sort_keys=True).encode())
        return h.hexdigest()[:16]

    def feature_spec(self) -> FeatureSpec:
        """How texts must become features for these heads (`rewardprism.features`).

        A head set saved before specs were recorded gets its model folder's recorded values (a VRM or BT export);
        a DRM one cannot be told and is refused, saying how to re-save it.
        """
        spec = self.features
        if spec is None and self.kind in ("vrm", "bt"):
            spec = recorded_model_spec(self.backbone)
        if spec is None:
            raise FeatureMismatch(f"head set {self.name}@{self.version} records no feature spec (saved before specs "
                                  "existed): rebuild it with `rewardprism decompose` from its embedding folder, or "
                                  "export it again from its model folder")
        return spec

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "kind": self.kind, "backbone": self.backbone,
                "dim": self.dim, "num_heads": self.num_heads, "head_names": self.head_names,
                "default_weights": self.default_weights.tolist(), "content_hash": self.content_hash,
                "created": self.created, "dataset": self.dataset, "info": self.info,
                "features": None if self.features is None else self.features.to_dict()}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = f"heads-{self.content_hash}.safetensors"
        tmp = path / f".{tensors}.tmp"
        save_file({"weight": self.weight, "bias": self.bias, "default_weights": self.default_weights}, tmp)
        os.replace(tmp, path / tensors)
        (path / f".{META}.tmp").write_text(json.dumps({**self.metadata(), "tensors": tensors}, indent=1))
        os.replace(path / f".{META}.tmp", path / META)  # the switch from the old version to this one
        for old in path.glob("heads*.safetensors"):
            if old.name != tensors:
                old.unlink()
        return path

    @classmethod
    def load(cls, path: str | Path) -> HeadSet:
        path = Path(path)
        if not (path / META).exists():
            raise FileNotFoundError(f"{path} is not a head set folder (no {META})")
        try:  # a hand-edited or truncated folder is bad input (ValueError), whichever part of it is wrong
            meta = json.loads((path / META).read_text())
            tensors = meta.get("tensors", TENSORS)  # TENSORS: folders saved before the name carried the hash
            if not isinstance(tensors, str) or Path(tensors).name != tensors:
                raise ValueError(f"{path}: 'tensors' must name a file in the folder, got {tensors!r}")
            tensors = load_file(path / tensors)
            features = meta.get("features")
            heads = cls(tensors["weight"], tensors["bias"], meta["head_names"], meta["kind"], meta["backbone"],
                        tensors["default_weights"], meta["name"], meta["version"], meta.get("dataset", ""),
                        meta.get("info", {}), meta["created"],
                        None if features is None else FeatureSpec.from_dict(features))
            saved_hash = meta["content_hash"]
        except (KeyError, TypeError, AttributeError, SafetensorError) as exc:
            raise ValueError(f"{path} is not a valid head set: {exc!r}") from None
        if heads.content_hash != saved_hash:
            raise ValueError(f"{path}: content hash mismatch (files changed after saving)")
        return heads

