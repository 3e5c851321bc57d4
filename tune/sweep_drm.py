"""A Ray Tune sweep of DRM personalization: heads k × adaptation pairs n × method, each over many seeds.

    python tune/sweep_drm.py --config tune/drm_alpaca.yaml            # AlpacaEval, MiniLM embeddings
    python tune/sweep_drm.py --config tune/drm_alpaca.yaml --override seeds=5 --override run.name=quick
    python tune/sweep_drm.py --config tune/drm_alpaca.yaml --resume   # finish an interrupted sweep (Tuner.restore)
    ray job submit --working-dir . -- python tune/sweep_drm.py --config SWEEP.yaml   # absolute paths in it

One decomposition serves every k. The driver fits the PCA once, with the largest k, on the training split; the
head set with k heads keeps its first k components (the top k eigenvectors of the covariance are the first k of
its top K) and is built and calibrated once, as `rewardprism decompose` ships one
(`rewardprism.calibrate.fit_head_set`), so a trial costs a matrix product and an adaptation.

Methods `select-information` / `select-uncertainty` / `select-random` compare asking each simulated user
chosen pairs with asking random ones (`rewardprism.select`), on the same pools and held-out pairs; the plots then
add accuracy vs n for them.

Each trial (k, n, method) runs the paper's protocol as `rewardprism.protocol.evaluate_adaptation` states it:
per group of the test split and per seed, n of the group's pairs are labelled, a profile is adapted, and the
group's pairs are scored — the honest accuracy leaves the n out, the reference's keeps them. Methods are those
of `rewardprism.adapt` (`hyre`, `bt`, `default`) from the head set's default profile, and the paper's baselines
`random-uniform` / `random-gaussian`: HyRe over as many random unit directions as the head set has heads. Every
trial runs to the end — no early stopping: each (k, n, method) is a point of the accuracy-vs-k figures, and a
trial takes about a second.
"""
from __future__ import annotations

import copy
import dataclasses
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from report import finish
from rewardprism.calibrate import choose_population_l2, fit_head_set
from rewardprism.cli_common import fail, overrides
from rewardprism.config import ConfigError, load_config
from rewardprism.data import DataError, groups_of
from rewardprism.drm import PreferenceDecomposition, fit_population_head
from rewardprism.embed import EmbeddingSet
from rewardprism.evaluate import Split
from rewardprism.heads import HeadSet
from rewardprism.recipes import connect_ray
from sweeps import (
    BEST_DIR,
    NoTrialFinished,
    Resume,
    RunSettings,
    best_or_exit,
    fit_or_restore,
    max_concurrent_trials,
    refuse_existing_sweep,
    resume_command,
    save_head_set,
    stop_if_interrupted,
    write_best,
    write_results,
)

RANDOM = {"random-uniform": "uniform", "random-gaussian": "gaussian"}  # baseline → `random_heads` distribution
# Which pairs a user is asked (`rewardprism.select.evaluate_selection`: per seed, half of each group's pairs are
# the pool to ask from, the rest are scored; the default method adapts): chosen vs random at every n.
SELECTION = {"select-information": "information", "select-uncertainty": "uncertainty", "select-random": "random"}
METHODS = ("hyre", "bt", "default", *RANDOM, *SELECTION)
ADAPTED = "adapted.npz"  # in each trial's checkpoint: the adapted profiles and the pairs they were adapted from
Overrides = overrides("seeds=5")
METRIC = "accuracy"  # honest: the adaptation pairs are not scored


@dataclass
class DrmSweep:
    embeddings: str = ""  # an embedding folder (`rewardprism embed --out ...`): features, pairs and their groups
    heads: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 50])  # k: the head set has ±PC₀…±PC_{k−1}
    adaptation_pairs: list[int] = field(default_factory=lambda: [5, 15, 50])  # n labelled pairs per group
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: int = 20  # adaptation draws per group, batched inside each trial
    test_fraction: float = 0.5  # held-out share of prompts, split by prompt
    split_seed: int = 0
    population_head: bool = False  # head 0: the Bradley-Terry direction on the training pairs
    select_pairs: int | None = None  # the best k and method are chosen at this n; null: the smallest n
    run: RunSettings = field(default_factory=lambda: RunSettings(name="drm-sweep"))

    def __post_init__(self) -> None:
        for name in ("heads", "adaptation_pairs"):
            values = getattr(self, name)
            if not values or min(values) < 1 or len(set(values)) != len(values):
                raise ConfigError(name, f"must be distinct positive integers, got {values}")
        unknown = sorted(set(self.methods) - set(METHODS))
        if not self.methods or unknown:
            raise ConfigError("methods", f"unknown {unknown}; choose from {', '.join(METHODS)}")
        if not set(self.methods) - set(RANDOM) - set(SELECTION):
            raise ConfigError("methods", "needs hyre, bt or default: the best head set is chosen among DRM heads")
        if self.seeds < 1:
            raise ConfigError("seeds", f"must be a positive integer, got {self.seeds}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError("test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        if self.select_pairs is None:
            self.select_pairs = min(self.adaptation_pairs)
        if self.select_pairs not in self.adaptation_pairs:
            raise ConfigError("select_pairs", f"{self.select_pairs} is not one of adaptation_pairs "
                                              f"{self.adaptation_pairs}")


@dataclass
class SweepData:
    """Everything a trial reads; the driver builds it once and Ray puts it in the object store."""

    split: Split  # features and pairs, split by prompt
    head_sets: dict[int, HeadSet]  # k → the top-k head set, calibrated, fitted on the training pairs


def load_data(sweep: DrmSweep) -> SweepData:
    """Split by prompt, check every group can label n pairs, fit the one decomposition (and population head),
    and build each k's head set with its calibrated hyperprior once (it does not depend on n or the method)."""
    try:
        embeddings = EmbeddingSet(sweep.embeddings)
        features = embeddings.features
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError("embeddings", str(exc)) from None
    chosen, rejected = embeddings.load()
    split = Split.of(chosen, rejected, embeddings.pairs(), sweep.test_fraction, sweep.split_seed)
    groups, sizes = np.unique(groups_of(split.pairs)[split.test], return_counts=True)
    for group, size in zip(groups, sizes):
        if size <= max(sweep.adaptation_pairs):
            raise ConfigError("adaptation_pairs", f"group {group!r} has {size} held-out pairs; "
                                                  f"n={max(sweep.adaptation_pairs)} leaves none to score honestly")
    largest = max(sweep.heads)
    if largest > embeddings.dim:
        raise ConfigError("heads", f"k={largest} exceeds the embedding dimension {embeddings.dim}")
    train_chosen, train_rejected, train_pairs = split.training()
    decomposition = PreferenceDecomposition(largest).fit(train_chosen, train_rejected)
    # one population head for every k: fitted on the same pairs whatever k is
    l2 = choose_population_l2(train_chosen, train_rejected, train_pairs)["l2"] if sweep.population_head else None
    population = fit_population_head(train_chosen, train_rejected, l2=l2) if sweep.population_head else False
    head_sets = {k: fit_head_set(first_components(decomposition, k), train_chosen, train_rejected, train_pairs,
                                 population_head=population, l2=l2, features=features, split=split.fitted_on(),
                                 dataset=embeddings.index.get("dataset", sweep.embeddings))
                 for k in sweep.heads}
    return SweepData(split, head_sets)


# ----------------------------------------------------------------------------------------------- trials
# Ray ships these functions to the trial actors by value (this file runs as __main__): they use only
# rewardprism, numpy and Ray, never the sibling modules, which workers cannot import under `ray job submit`.

def first_components(decomposition: PreferenceDecomposition, k: int) -> PreferenceDecomposition:
    """The top-k decomposition inside a top-K one (k ≤ K): the same eigenvectors, the first k of them."""
    top = copy.copy(decomposition)
    top.n_components = k
    top.components_ = decomposition.components_[:k]
    top.explained_variance_ = decomposition.explained_variance_[:k]
    top.explained_variance_ratio_ = decomposition.explained_variance_ratio_[:k]
    return top


def adapt_and_score(data: SweepData, k: int, n: int, method: str, seeds: int) -> tuple[dict[str, Any],
                                                                                        dict[str, np.ndarray]]:
    """The protocol for one (k, n, method): metrics, and the adapted profiles behind them for the figures.

    Profiles: weights (seeds, groups, H) over raw head scores, the test pairs each was adapted from (seeds,
    groups, n), and each head's score std on the test responses (H,), which puts the weights of differently
    scaled heads on one footing in the figures.
    """
    from rewardprism.evaluate import random_heads
    from rewardprism.protocol import evaluate_adaptation
    from rewardprism.select import evaluate_selection

    head_set = data.head_sets[k]
    names = head_set.head_names
    if method in RANDOM:  # as many random directions as the head set has heads; HyRe ignores the prior
        test, adapter = data.split.scored(random_heads(head_set.dim, head_set.num_heads, RANDOM[method])), "hyre"
        names = [f"random{i}" for i in range(head_set.num_heads)]
    else:
        test, adapter = data.split.scored(head_set), method
    prior = head_set.default_weights.astype(np.float64)
    if method in SELECTION:
        result = evaluate_selection(test, n, method=SELECTION[method], prior=prior, seeds=range(seeds),
                                    center=head_set.hyperprior_center)
    else:
        result = evaluate_adaptation(test, n, method=adapter, prior=prior, seeds=range(seeds),
                                     center=head_set.hyperprior_center)
    weights = np.stack([result.profiles[g] for g in result.groups], axis=1)  # (S, G, H)
    honest, reference = result.summary(honest=True), result.summary()
    metrics = {METRIC: honest["overall"][0], f"{METRIC}_std": honest["overall"][1],
               f"{METRIC}_reference": reference["overall"][0],
               f"{METRIC}_by_group": {g: honest[g][0] for g in result.groups}, "num_heads": head_set.num_heads}
    profiles = {"weights": weights, "picks": np.stack([result.picks[g] for g in result.groups], axis=1),
                "head_std": np.concatenate([test.chosen, test.rejected]).std(0),
                "head_names": np.array(names), "groups": np.array(result.groups)}
    return metrics, profiles


def run_trial(params: dict[str, Any], data: SweepData, seeds: int) -> None:
    """One Tune trial: one (k, n, method); its profiles go in its checkpoint for the figures."""
    import ray.tune

    metrics, profiles = adapt_and_score(data, params["heads"], params["pairs"], params["method"], seeds)
    with tempfile.TemporaryDirectory() as folder:
        np.savez(Path(folder) / ADAPTED, **profiles)
        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder))


# ----------------------------------------------------------------------------------------------- driver

def export_best(rows: list[dict[str, Any]], data: SweepData, sweep: DrmSweep) -> dict[str, Any]:
    """The best k and method at n = select_pairs, among the DRM heads (a random head set is not a product) and
the adaptation methods (a selection trial says which pairs to ask, not how to adapt)."""
    candidates = [r for r in rows if r.get(METRIC) is not None and r["config/pairs"] == sweep.select_pairs
                  and r["config/method"] not in RANDOM and r["config/method"] not in SELECTION]
    if not candidates:
        raise NoTrialFinished(f"no DRM-head trial at n={sweep.select_pairs} finished; see the errors in sweep.json")
    row = max(candidates, key=lambda r: r[METRIC])
    k, method = row["config/heads"], row["config/method"]
    folder = sweep.run.experiment_dir / BEST_DIR
    head_set = save_head_set(dataclasses.replace(data.head_sets[k], name=sweep.run.name), folder / "headset",
                             f"k{k}")
    config = {**{f: getattr(sweep, f) for f in ("embeddings", "test_fraction", "split_seed", "population_head")},
              "heads": k, "method": method}
    summary = {"kind": "drm", "heads": k, "method": method, "pairs": sweep.select_pairs, METRIC: row[METRIC],
               f"{METRIC}_std": row[f"{METRIC}_std"], f"{METRIC}_reference": row[f"{METRIC}_reference"],
               "seeds": sweep.seeds, "trial_id": row["trial_id"]}
    write_best(folder, summary, config, head_set)
    return summary


def main(
    config: Annotated[Path, typer.Option(help="sweep file, e.g. tune/drm_alpaca.yaml")],
    override: Overrides = None,
    resume: Resume = False,
) -> None:
    """Sweep DRM head counts, adaptation sizes and methods with Ray Tune; write the table, best head set, plots."""
    import ray
    import ray.tune

    try:
        sweep = load_config(DrmSweep, config, override or [])
        refuse_existing_sweep(sweep.run, resume)
        data = load_data(sweep)
        connect_ray()
        param_space = {"heads": ray.tune.grid_search(sweep.heads),
                       "pairs": ray.tune.grid_search(sweep.adaptation_pairs),
                       "method": ray.tune.grid_search(sweep.methods)}
        # reuse_actors: a trial is a second of numpy, starting a worker process for each would cost more
        tune_config = ray.tune.TuneConfig(metric=METRIC, mode="max", reuse_actors=True,
                                          max_concurrent_trials=max_concurrent_trials(
                                              {"CPU": 1}, sweep.run.max_concurrent_trials))
        trainable = ray.tune.with_parameters(run_trial, data=data, seeds=sweep.seeds)
        grid = fit_or_restore(sweep.run, trainable, resume=resume, param_space=param_space,
                              tune_config=tune_config)
    except (ConfigError, DataError) as exc:
        fail(str(exc))
    stop_if_interrupted(grid, len(sweep.heads) * len(sweep.adaptation_pairs) * len(sweep.methods),
                        resume_command("sweep_drm.py", config, override))
    rows = write_results(grid, "drm", {"config": asdict(sweep), "metric": METRIC, "adapted": ADAPTED})
    summary = best_or_exit(lambda: export_best(rows, data, sweep))
    finish(sweep.run, summary)


if __name__ == "__main__":
    typer.run(main)
