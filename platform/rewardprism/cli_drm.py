"""`rewardprism decompose | adapt | evaluate`: the DRM path from embeddings to head sets, profiles and tables.

Every command reads an embedding folder written by `rewardprism embed`. Train and test are the reference's split
by prompt (`--test-fraction`, `--split-seed`), so `decompose --split train` and `evaluate` on the same folder
never share a prompt.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from rewardprism.cli_common import fail

SplitPart = Annotated[str, typer.Option("--split", help="which pairs to fit on: train (the split evaluate "
                                                        "leaves out), test, or all")]
TestFraction = Annotated[float, typer.Option(help="share of prompts in the test split")]
SplitSeed = Annotated[int, typer.Option(help="seed of the split by prompt")]


def decompose(
    embeddings: Annotated[Path, typer.Option(help="embedding folder from `rewardprism embed`")],
    out: Annotated[Path, typer.Option(help="head set folder to write (safetensors + headset.json)")],
    components: Annotated[int, typer.Option(min=1, help="principal directions k (2k heads)")] = 50,
    population_head: Annotated[bool, typer.Option(help="fit the Bradley-Terry population head as head 0 and "
                                                       "default profile")] = True,
    split: SplitPart = "train",
    test_fraction: TestFraction = 0.5,
    split_seed: SplitSeed = 0,
    ray: Annotated[bool, typer.Option("--ray", help="reduce shards in Ray tasks (joins RAY_ADDRESS or starts "
                                                    "a local cluster)")] = False,
    name: Annotated[str, typer.Option(help="head set name")] = "drm",
    version: Annotated[str | None, typer.Option(
        help="head set version (default: the heads' content hash, so two different head sets never collide "
             "in the registry)", show_default=False)] = None,
    calibrate: Annotated[bool, typer.Option(help="choose the default adaptation's hyperprior centre by "
                                                 "cross-fitting on the same pairs (reads them into memory)")] = True,
) -> None:
    """Principal directions of preference differences as a head set (+PCs, −PCs, optional population head),
    with a card per head (`rewardprism heads show OUT`)."""
    from rewardprism.calibrate import fit_head_set
    from rewardprism.cards import head_cards, save_cards
    from rewardprism.drm import PreferenceDecomposition
    from rewardprism.drm_ray import decompose_folder

    data = _embeddings(embeddings, "--embeddings")
    rows = _split_rows(data, split, test_fraction, split_seed)
    if ray:
        import ray as ray_lib

        ray_lib.init(ignore_reinit_error=True)
    chosen = rejected = pairs = None
    try:
        in_memory = population_head or calibrate  # these need the pairs loaded: decompose them there too
        if in_memory:
            rows = np.arange(len(data)) if rows is None else rows
            chosen, rejected = (features[rows] for features in data.load())
        if in_memory and not ray:
            decomposition = PreferenceDecomposition(components).fit(chosen, rejected)
        else:
            decomposition = decompose_folder(embeddings, components, rows=rows, use_ray=ray)
        if calibrate:
            everything = data.pairs()
            pairs = [everything[i] for i in rows]
        head_set = fit_head_set(decomposition, chosen, rejected, pairs, population_head=population_head,
                                calibrate=calibrate, features=data.features, name=name, version=version or "1",
                                dataset=f"{data.index.get('dataset') or embeddings} [{split}]")
    except ValueError as exc:
        fail(f"--embeddings: {exc}")
    if version is None:  # the version is not part of the content hash
        head_set = dataclasses.replace(head_set, version=head_set.content_hash[:8])
    head_set.save(out)
    if chosen is None:  # decomposed from the shards: the cards need the pairs' features once
        rows = np.arange(len(data)) if rows is None else rows
        chosen, rejected = (features[rows] for features in data.load())
    if pairs is None:
        everything = data.pairs()
        pairs = [everything[i] for i in rows]
    save_cards(out, head_cards(head_set, chosen, rejected, pairs))
    typer.echo(json.dumps({"out": str(out), "head_set": f"{head_set.name}@{head_set.version}",
                           "heads": head_set.num_heads, "content_hash": head_set.content_hash,
                           "pairs": int(decomposition.n_samples_seen_), "backbone": head_set.backbone,
                           "explained_variance_ratio_top5":
                               np.round(decomposition.explained_variance_ratio_[:5], 4).tolist(),
                           "hyperprior_center": head_set.hyperprior_center}, indent=1))


def adapt(
    heads: Annotated[Path, typer.Option(help="head set folder")],
    embeddings: Annotated[Path, typer.Option(help="embedding folder of the user's labelled pairs")],
    out: Annotated[Path, typer.Option(help="profile JSON to write")],
    method: Annotated[str, typer.Option(help="default, hyre or bt")] = "default",
    group: Annotated[str | None, typer.Option(help="use only this group's pairs")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="use only the first N pairs")] = None,
) -> None:
    """A user's profile (weights over the heads, bias) from their labelled pairs, starting at the population."""
    from rewardprism.adapt import METHODS, adapt_profile
    from rewardprism.data import groups_of

    if method not in METHODS:
        fail(f"--method: unknown method {method!r}; use one of {', '.join(METHODS)}")
    head_set = _head_set(heads)
    data = _embeddings(embeddings, "--embeddings")
    _check_features(head_set, data)
    chosen, rejected = data.load()
    keep = np.ones(len(chosen), dtype=bool)
    if group is not None:
        keep = groups_of(_pairs(data, "--embeddings")) == group
        if not keep.any():
            fail(f"--group: no pairs in group {group!r}")
    idx = np.flatnonzero(keep)[:limit]
    try:
        weights, bias = adapt_profile(head_set.scores(chosen[idx]), head_set.scores(rejected[idx]),
                                      head_set.default_weights, method=method, center=head_set.hyperprior_center)
    except ValueError as exc:
        fail(f"--embeddings: {exc}")
    profile = {"head_set": head_set.content_hash, "method": method, "pairs": len(idx),
               "weights": weights.tolist(), "bias": bias}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile))
    top = np.argsort(-np.abs(weights))[:5]
    typer.echo(json.dumps({"out": str(out), "pairs": len(idx), "method": method,
                           "top_heads": {head_set.head_names[i]: round(float(weights[i]), 4) for i in top}}, indent=1))


def evaluate(
    embeddings: Annotated[Path, typer.Option(help="embedding folder: its test split is scored")],
    heads: Annotated[Path, typer.Option(help="head set folder (decompose --split train on the same split)")],
    adapt_from: Annotated[Path | None, typer.Option(help="embeddings of another annotator on the same prompts: "
                                                            "also adapt on its test pairs")] = None,
    n: Annotated[list[int] | None, typer.Option(help="adaptation pairs per group (repeatable)")] = None,
    seeds: Annotated[int, typer.Option(min=1, help="adaptation draws per group")] = 20,
    methods: Annotated[str, typer.Option(help="comma-separated: hyre, default, bt")] = "hyre,default",
    prior: Annotated[bool, typer.Option(help="adapt from the head set's default profile (--no-prior: from "
                                             "zero, few-shot alone)")] = True,
    baselines: Annotated[bool, typer.Option(help="random head sets and the supervised head")] = True,
    test_fraction: TestFraction = 0.5,
    split_seed: SplitSeed = 0,
    out: Annotated[Path | None, typer.Option(help="write the markdown tables here (and the data as .json)")] = None,
) -> None:
    """The DRM paper's protocol: per group, n labelled pairs × seeds, mean (std) accuracy, baselines."""
    from rewardprism.adapt import METHODS
    from rewardprism.evaluate import Split, drm_report, to_markdown

    n_values = n or [5, 15, 50]
    chosen_methods = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in chosen_methods if m not in METHODS]
    if bad or not chosen_methods:
        fail(f"--methods: unknown {bad or methods!r}; use a comma-separated subset of {', '.join(METHODS)}")
    if min(n_values) < 1:
        fail(f"--n: must be at least 1, got {min(n_values)}")
    head_set = _head_set(heads)
    splits = []
    for option, path in (("--embeddings", embeddings), ("--adapt-from", adapt_from)):
        if path is not None:
            data = _embeddings(path, option)
            _check_features(head_set, data, option)
            try:
                splits.append(Split.of(*data.load(), data.pairs(), test_fraction, split_seed))
            except ValueError as exc:
                fail(f"{option}: {exc}")
    try:
        report = drm_report(splits[0], head_set, n_values=n_values, methods=chosen_methods, seeds=range(seeds),
                            adapt_from=splits[1] if adapt_from else None, use_prior=prior, baselines=baselines)
    except ValueError as exc:
        fail(str(exc))
    markdown = to_markdown(report)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(markdown)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    typer.echo(markdown)


def _embeddings(path: Path, option: str):
    from rewardprism.embed import EmbeddingSet

    try:
        return EmbeddingSet(path)
    except FileNotFoundError as exc:
        fail(f"{option}: {exc}")


def _pairs(data, option: str) -> list:

    try:
        return data.pairs()
    except ValueError as exc:
        fail(f"{option}: {exc}")


def _head_set(path: Path):
    from rewardprism.heads import HeadSet

    try:
        return HeadSet.load(path)
    except (FileNotFoundError, ValueError) as exc:
        fail(f"--heads: {exc}")


def _check_features(head_set, data, option: str = "--embeddings") -> None:
    """The features in `data` must be made as the head set's were (`rewardprism.features`)."""
    from rewardprism.features import require_same

    try:
        require_same(head_set.feature_spec(), data.features, f"the embedding folder {data.path}")
    except ValueError as exc:
        fail(f"{option}: {exc}")


def _split_rows(data, split: str, test_fraction: float, seed: int) -> np.ndarray | None:
    from rewardprism.data import split_by_prompt

    if split == "all":
        return None
    if split not in ("train", "test"):
        fail(f"--split: must be train, test or all, got {split!r}")
    pairs = _pairs(data, "--embeddings")
    try:
        train, test = split_by_prompt(pairs, test_fraction, seed)
    except ValueError as exc:
        fail(f"--test-fraction: {exc}")
    return np.array(train if split == "train" else test, dtype=int)
