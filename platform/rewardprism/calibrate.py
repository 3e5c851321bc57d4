"""A DRM head set as it ships, built in one place: ±PC heads, population head, calibrated hyperprior centre.

`fit_head_set` is what `rewardprism decompose`, train_drm.py, the demo and the Tune sweep all run after their
decomposition (each decomposes its own way: in memory, shard by shard, on Ray tasks, or by slicing a larger
fit). `calibrate_hyperprior` chooses the default adaptation's hyperprior centre by cross-fitting the same
recipe on half of the prompts; it reads the adaptation protocol (`rewardprism.protocol`), not the evaluation
report, so building a head set does not depend on `rewardprism.evaluate`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from rewardprism.adapt import mix_ladder, strength_ladder
from rewardprism.data import PreferencePair, groups_of, prompt_bucket, split_by_prompt
from rewardprism.drm import FIXED_L2, PreferenceDecomposition, build_head_set, fit_population_head
from rewardprism.features import FeatureSpec
from rewardprism.heads import HeadSet
from rewardprism.protocol import ScoredPairs, fixed_profile, sample_adaptation, score_profiles


def fit_head_set(decomposition: PreferenceDecomposition, chosen: np.ndarray | None = None,
                 rejected: np.ndarray | None = None, pairs: Sequence[PreferencePair] | None = None, *,
                 population_head: bool | np.ndarray = True, calibrate: bool = True, features: FeatureSpec,
                 split: dict[str, Any] | None = None, l2: float | None = None, dataset: str = "", name: str = "drm",
                 version: str = "1") -> HeadSet:
    """The head set of a fitted decomposition of the (N, d) `chosen` / `rejected` features of `pairs`, made as
    `features` says (an embedding folder's `EmbeddingSet.features`).

    `population_head`: True fits the Bradley-Terry population head on the same pairs (head 0 and the default
    profile), its L2 strength `l2` or, when None, chosen by cross-validation grouped by prompt
    (`choose_population_l2`, recorded in `info["population_l2"]`); False leaves it out (the mean profile is the
    default), or a (d,) head fitted already (a sweep shares one across head counts; `l2` then says at what
    strength, for the record and the calibration's refits). `calibrate` sets the
    hyperprior centre (`calibrate_hyperprior`), after the population head, refitting it at the same strength.
    `split`: which pairs of its dataset these are (`evaluate.Split.fitted_on`), kept in `info["split"]` so an
    evaluation on any dataset can leave its training prompts out. Without a population head to fit and without
    calibration, the features and pairs are not needed.
    """
    fits_head = population_head is True
    needs_pairs = calibrate or (fits_head and l2 is None)
    if ((fits_head or calibrate) and (chosen is None or rejected is None)) or (needs_pairs and pairs is None):
        raise ValueError("fitting a population head needs the pairs' features (and the pairs to choose its L2), "
                         "and calibrating also the pairs")
    info: dict[str, Any] = {} if split is None else {"split": split}
    if fits_head:
        info["population_l2"] = choose_population_l2(chosen, rejected, pairs) if l2 is None else {"l2": float(l2)}
        population_head = fit_population_head(chosen, rejected, l2=info["population_l2"]["l2"])
    elif population_head is not False and l2 is not None:  # fitted already, at this strength
        info["population_l2"] = {"l2": float(l2)}
    population_head = None if population_head is False else population_head
    head_set = build_head_set(decomposition, population_head, features=features, dataset=dataset, name=name,
                              version=version)
    head_set = dataclasses.replace(head_set, info={**head_set.info, **info})
    return calibrate_hyperprior(head_set, chosen, rejected, pairs) if calibrate else head_set


# L2 strengths `choose_population_l2` tries: half-decades around the fixed default (sklearn's C=1), which is one.
L2_GRID = FIXED_L2 * np.logspace(-1.5, 3, 10)


def choose_population_l2(chosen: np.ndarray, rejected: np.ndarray, pairs: Sequence[PreferencePair], *,
                         grid: np.ndarray = L2_GRID, folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """The population head's L2 strength with the best k-fold held-out accuracy, folds grouped by prompt.

    A prompt's fold is its seeded prompt hash (`data.prompt_bucket`), so no fold shares a prompt with the pairs
    it is scored against, and the folds do not depend on row order. Accuracy is pooled over the folds; ties go to
    the stronger L2. The grid holds the fixed default (`drm.FIXED_L2`), so the choice never scores below it on
    these folds. Returns the choice, the grid's accuracies and the fixed strength's, as the head set records them.
    """
    fold = np.array([min(int(prompt_bucket(p.prompt, f"population-l2-{seed}") * folds), folds - 1) for p in pairs])
    if len(np.unique(fold)) < 2:
        raise ValueError(f"choosing the population head's L2 needs pairs on several prompts, got {len(pairs)} pairs")
    correct = np.zeros(len(grid))
    for k in np.unique(fold):
        fit, held = fold != k, fold == k
        diff = np.asarray(chosen[held], np.float64) - rejected[held]
        for i, l2 in enumerate(grid):
            correct[i] += (diff @ fit_population_head(chosen[fit], rejected[fit], l2=float(l2)) > 0).sum()
    accuracy = correct / len(pairs)
    best = np.flatnonzero(accuracy >= accuracy.max() - 1e-12)[-1]
    fixed = int(np.argmin(np.abs(np.log(grid / FIXED_L2))))
    return {"l2": float(grid[best]), "folds": folds, "seed": seed, "criterion": "held-out accuracy",
            "accuracy": {f"{v:g}": float(a) for v, a in zip(grid, accuracy)}, "fixed_l2": FIXED_L2,
            "fixed_accuracy": float(accuracy[fixed])}


# Candidate hyperprior centres for `calibrate_hyperprior`, inside `adapt.STRENGTHS` (1e-1 … 1e6) so a decade of
# hyperprior either side stays on the ladder.
CENTERS = np.logspace(0, 5, 11)


def calibrate_hyperprior(head_set: HeadSet, chosen: np.ndarray, rejected: np.ndarray,
                         pairs: Sequence[PreferencePair], *, n_values: Sequence[int] = (5, 15),
                         seeds: Sequence[int] = range(10), centers: np.ndarray = CENTERS, splits: int = 4) -> HeadSet:
    """A copy of a DRM head set with the default adaptation's hyperprior centre chosen on the pairs it was fitted
    on (the head set given is left as it is).

    Cross-fitted: the same recipe (k components, population head or not) is refitted on half of the prompts;
    pseudo-users draw n pairs per group from the other half, are adapted with each candidate centre, and are
    scored on the rest of their group's pairs. Accuracy is averaged over `n_values` and `splits` random halvings
    (one halving is noisy on a few hundred pairs: its best centre swung from 1 to 30,000 on the synthetic users),
    and the best centre wins, ties going to the stronger prior. Why not the evidence (`prior_strength_evidence`):
    it measures fit to the few labels, and on HH-RLHF peaks where accuracy is below the population head's. Why
    cross-fit: a population head agrees with the labels it was fitted on more than with a new user's, which would
    say "never move". Sets `info["hyperprior_center"]` (None when no group has 2n pairs to draw from) and the
    accuracies.
    """
    if head_set.kind != "drm" or not {"n_components", "population_head"} <= head_set.info.keys():
        raise ValueError(f"hyperprior calibration refits a DRM head set made by `build_head_set`; this one is "
                         f"{head_set.kind!r} with info {sorted(head_set.info)}")
    accuracy, population, used, groups_all = np.zeros(len(centers)), [], set(), groups_of(pairs)
    for split_seed in range(splits):
        halves = split_by_prompt(pairs, 0.5, f"hyperprior-{split_seed}")  # not the evaluation split's seed
        fit, held_out = (np.asarray(half, dtype=int) for half in halves)
        if len(fit) <= 1 or len(held_out) == 0:
            raise ValueError(f"hyperprior calibration needs pairs on several prompts, got {len(pairs)} pairs")
        decomposition = PreferenceDecomposition(head_set.info["n_components"]).fit(chosen[fit], rejected[fit])
        refit = fit_head_set(decomposition, chosen[fit], rejected[fit],
                             population_head=bool(head_set.info["population_head"]), calibrate=False,
                             l2=head_set.info.get("population_l2", {}).get("l2", FIXED_L2),
                             features=head_set.feature_spec())
        users = ScoredPairs.of(refit, chosen[held_out], rejected[held_out], groups_all[held_out])
        population.append(fixed_profile(users, refit.default_weights, "").summary()["overall"][0])
        for n in n_values:
            groups = [g for g in users.group_names if len(users.indices(g)) >= 2 * n]
            if not groups:
                continue
            used.add(n)
            picks = sample_adaptation(users, n, seeds, groups)
            ladders = {g: strength_ladder(users.chosen[idx], users.rejected[idx], prior=refit.default_weights)
                       for g, idx in picks.items()}
            accuracy += [score_profiles(users, picks, {g: mix_ladder(ladder, c) for g, ladder in ladders.items()},
                                        "", honest=True).summary(honest=True)["overall"][0] for c in centers]
    calibration: dict[str, Any] = {"n_values": sorted(used), "splits": splits, "pairs": len(pairs),
                                   "population_accuracy": float(np.mean(population))}
    center = None
    if used:
        accuracy /= len(used) * splits
        best = np.flatnonzero(accuracy >= accuracy.max() - 1e-12)[-1]  # the strongest of the best
        center = float(centers[best])
        calibration["accuracy"] = {f"{c:g}": float(a) for c, a in zip(centers, accuracy)}
    return dataclasses.replace(head_set, info={**head_set.info, "hyperprior_center": center,
                                            "hyperprior_calibration": calibration})
