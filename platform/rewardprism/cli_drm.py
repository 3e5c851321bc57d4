"""`rewardprism decompose | adapt | evaluate`: the DRM path from embeddings to head sets, profiles and tables.

Every command reads an embedding folder written by `rewardprism embed`. Train and test are a split by prompt that
is a function of the prompt alone (`data.split_by_prompt`: `--test-fraction`, `--split-seed`); `decompose`
records it in the head set, and `evaluate` splits any folder by that record, so a head set is never scored on a
prompt of its training half, whichever dataset it was fitted on.
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
    from rewardprism.data import split_record
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
            everything = data.pairs()
            pairs = [everything[i] for i in rows]
        if in_memory and not ray:
            decomposition = PreferenceDecomposition(components).fit(chosen, rejected)
        else:
            decomposition = decompose_folder(embeddings, components, rows=rows, use_ray=ray)
        head_set = fit_head_set(decomposition, chosen, rejected, pairs, population_head=population_head,
                                calibrate=calibrate, features=data.features, name=name, version=version or "1",
                                split={**split_record(test_fraction, split_seed), "part": split},
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
    out: Annotated[Path, typer.Option(help="profile JSON to write (with --select: the pairs to ask, JSON)")],
    embeddings: Annotated[Path | None, typer.Option(help="embedding folder of the user's labelled pairs "
                                                         "(optional with --select: a new user has none)")] = None,
    method: Annotated[str, typer.Option(help="default, hyre or bt")] = "default",
    group: Annotated[str | None, typer.Option(help="use only this group's pairs")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="use only the first N pairs")] = None,
    select: Annotated[int | None, typer.Option(min=1, help="instead of a profile, choose the K pairs of --pool "
                                                           "this user should label next")] = None,
    pool: Annotated[Path | None, typer.Option(help="embedding folder of candidate pairs (labels unused)")] = None,
    select_method: Annotated[str, typer.Option(help="information, uncertainty or random")] = "information",
) -> None:
    """A user's profile (weights over the heads, bias) from their labelled pairs, starting at the population;
    with --select K, the K pairs of --pool whose labels would teach that profile the most."""
    from rewardprism.adapt import METHODS, adapt_profile

    if method not in METHODS:
        fail(f"--method: unknown method {method!r}; use one of {', '.join(METHODS)}")
    if (select is None) != (pool is None):
        fail("--select and --pool go together: --select K chooses K pairs of the --pool folder")
    head_set = _head_set(heads)
    if embeddings is None and select is None:
        fail("--embeddings: required (the user's labelled pairs), unless --select chooses pairs to ask")
    chosen, rejected = (np.zeros((0, head_set.num_heads)),) * 2
    if embeddings is not None:
        chosen, rejected = _labelled_scores(head_set, embeddings, group, limit)
    if select is not None:
        return _select(head_set, chosen, rejected, pool, select, select_method, out)
    try:
        weights, bias = adapt_profile(chosen, rejected, head_set.default_weights, method=method,
                                      center=head_set.hyperprior_center)
    except ValueError as exc:
        fail(f"--embeddings: {exc}")
    profile = {"head_set": head_set.content_hash, "method": method, "pairs": len(chosen),
               "weights": weights.tolist(), "bias": bias}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile))
    top = np.argsort(-np.abs(weights))[:5]
    typer.echo(json.dumps({"out": str(out), "pairs": len(chosen), "method": method,
                           "top_heads": {head_set.head_names[i]: round(float(weights[i]), 4) for i in top}}, indent=1))


def _labelled_scores(head_set, embeddings: Path, group: str | None,
                     limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Head scores (n, H) of the user's chosen and rejected responses: the folder's pairs, of `group`, first `limit`."""
    from rewardprism.data import groups_of

    data = _embeddings(embeddings, "--embeddings")
    _check_features(head_set, data)
    chosen, rejected = data.load()
    keep = np.ones(len(chosen), dtype=bool)
    if group is not None:
        keep = groups_of(_pairs(data, "--embeddings")) == group
        if not keep.any():
            fail(f"--group: no pairs in group {group!r}")
    idx = np.flatnonzero(keep)[:limit]
    return head_set.scores(chosen[idx]), head_set.scores(rejected[idx])


def _select(head_set, chosen: np.ndarray, rejected: np.ndarray, pool: Path, k: int, method: str, out: Path) -> None:
    """Write the k pairs of `pool` to ask next (prompt and both responses, as a user would label them)."""
    from rewardprism.select import SELECT_METHODS, posteriors, select_pairs, unlabelled_pool

    if method not in SELECT_METHODS:
        fail(f"--select-method: unknown method {method!r}; use one of {', '.join(SELECT_METHODS)}")
    data = _embeddings(pool, "--pool")
    _check_features(head_set, data, "--pool")
    texts, gaps = unlabelled_pool(head_set, *data.load(), _pairs(data, "--pool"))
    if k > len(gaps):
        fail(f"--select: the pool has {len(gaps)} pairs, fewer than {k}")
    try:
        (belief,) = posteriors(chosen[None], rejected[None], head_set.default_weights, pool_gaps=[gaps],
                               center=head_set.hyperprior_center)
    except ValueError as exc:
        fail(f"--embeddings: {exc}")
    try:
        picks = select_pairs(gaps, belief, k, method, seed=0)
    except ValueError as exc:  # the pool's features hold NaN or inf
        fail(f"--pool: {exc}")
    asked = [{"pool_index": int(i), "prompt": texts[i][0], "a": texts[i][1], "b": texts[i][2]} for i in picks]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asked, indent=1))
    typer.echo(json.dumps({"out": str(out), "asked": len(asked), "method": method, "labelled": len(chosen),
                           "pool": len(gaps)}))


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
    test_fraction: Annotated[float | None, typer.Option(help="share of prompts in the test split, for a head set "
                                                             "that records no split (default 0.5)")] = None,
    split_seed: Annotated[int | None, typer.Option(help="seed of the split by prompt, for a head set that "
                                                        "records no split (default 0)")] = None,
    out: Annotated[Path | None, typer.Option(help="write the markdown tables here (and the data as .json)")] = None,
    select: Annotated[str | None, typer.Option(help="also ask each simulated user n pairs chosen by this method "
                                                    "(information or uncertainty) next to n random ones")] = None,
    select_batch: Annotated[int, typer.Option(min=2, help="pairs per query in the batched selection rows")] = 5,
) -> None:
    """The DRM paper's protocol: per group, n labelled pairs × seeds, mean (std) accuracy, baselines.

    The folder is split by the head set's recorded split, so on any dataset only prompts outside the head set's
    training half are tested on.
    """
    from rewardprism.adapt import METHODS
    from rewardprism.evaluate import Split, drm_report, to_markdown
    from rewardprism.select import SELECT_METHODS

    n_values = n or [5, 15, 50]
    chosen_methods = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in chosen_methods if m not in METHODS]
    if bad or not chosen_methods:
        fail(f"--methods: unknown {bad or methods!r}; use a comma-separated subset of {', '.join(METHODS)}")
    if min(n_values) < 1:
        fail(f"--n: must be at least 1, got {min(n_values)}")
    if select is not None and select not in SELECT_METHODS[:-1]:
        fail(f"--select: unknown method {select!r}; use one of {', '.join(SELECT_METHODS[:-1])}")
    head_set = _head_set(heads)
    recorded = head_set.info.get("split")
    for option, value, key in (("--test-fraction", test_fraction, "test_fraction"),
                               ("--split-seed", split_seed, "seed")):
        if recorded is not None and value is not None and value != recorded[key]:
            fail(f"{option}: the head set was fitted on the split with {key} {recorded[key]}; evaluating on "
                 f"another split would test on its training prompts (leave {option} out)")
    splits, warnings = [], set()
    for option, path in (("--embeddings", embeddings), ("--adapt-from", adapt_from)):
        if path is not None:
            data = _embeddings(path, option)
            _check_features(head_set, data, option)
            try:
                split_data, warning = Split.held_out_from(head_set, *data.load(), data.pairs(),
                                                          0.5 if test_fraction is None else test_fraction,
                                                          split_seed or 0)
            except ValueError as exc:
                fail(f"{option}: {exc}")
            splits.append(split_data)
            warnings.add(warning)
    for warning in warnings - {None}:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"{len(splits[0].test)} of the {len(splits[0].pairs)} pairs in --embeddings are on prompts outside "
               "the head set's training half: testing on them", err=True)
    try:
        report = drm_report(splits[0], head_set, n_values=n_values, methods=chosen_methods, seeds=range(seeds),
                            adapt_from=splits[1] if adapt_from else None, use_prior=prior, baselines=baselines)
        if select is not None:
            report["selection"] = _selection(splits[0], head_set, n_values, select, seeds, select_batch)
    except ValueError as exc:
        fail(str(exc))
    report["held_out"] = {"record": recorded, "test_pairs": len(splits[0].test), "folder_pairs": len(splits[0].pairs)}
    markdown = to_markdown(report)
    if select is not None:
        from rewardprism.select import selection_markdown
        markdown += "\n" + selection_markdown(report["selection"])
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(markdown)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    typer.echo(markdown)


def _selection(split, head_set, n_values: list[int], method: str, seeds: int, batch: int) -> dict:
    from rewardprism.select import selection_report

    return selection_report(split.scored(head_set), head_set.default_weights.astype(np.float64),
                            center=head_set.hyperprior_center, n_values=n_values, method=method,
                            seeds=range(seeds), batch=batch)


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
