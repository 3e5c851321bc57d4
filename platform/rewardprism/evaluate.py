"""The DRM paper's evaluation report, over head scores (Luo et al. 2025, arXiv:2502.13131, §5).

Each group of the test split (AlpacaEval's `dataset`, or one group for HH-RLHF harmless) stands for a user and
is adapted and scored by the protocol of `rewardprism.protocol`: per seed, n of its pairs are sampled as
labelled feedback, a profile is adapted from them, and the profile's accuracy (chosen scored above rejected)
is measured on the group's test pairs. Seeds give mean (std) per group;
"overall" averages the groups per seed, then takes mean (std) over seeds. The reference leaves the adaptation
pairs in the test set; the honest variant removes them, and both are reported.

Baselines, as the paper's tables: the population profile (no feedback), single heads (per-head accuracy, the
best head per group as an oracle), HyRe over random head sets (uniform and Gaussian directions), one profile
over the head set fitted on every training pair (how much of the pooled preference the heads hold), and a fully
supervised Bradley-Terry head on every training pair (its L2 chosen by cross-validation, as the population
head's; the same head at the fixed L2 beside it). Gap shares read the honest accuracies; the reference
protocol's are printed beside them where they differ. Cross-annotator personalization adapts on one annotator's
pairs and scores another's. RewardBench-style section scores apply to data whose groups are
RewardBench subsets.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rewardprism.adapt import DEFAULT_STRENGTH, STRENGTHS, Method, adapt_users, prior_strength_evidence
from rewardprism.calibrate import choose_population_l2
from rewardprism.data import SPLIT_RULE, PreferencePair, groups_of, split_by_prompt, split_record
from rewardprism.drm import FIXED_L2, fit_population_head
from rewardprism.heads import HeadSet
from rewardprism.protocol import (
    SEEDS,
    ScoredPairs,
    evaluate_adaptation,
    fixed_profile,
    pair_accuracy,
    sample_adaptation,
)
from rewardprism.synthetic import ATTRIBUTES, DEFAULT_USERS, is_synthetic, rating_matrix


def head_accuracy(test: ScoredPairs) -> np.ndarray:
    """(G, H) accuracy of each head per group (sorted group names): the paper's Table 1 reads each row's best."""
    return np.array([(test.chosen[m] > test.rejected[m]).mean(0) for m in map(test.indices, test.group_names)])


def random_heads(dim: int, num_heads: int, distribution: str, seed: int = 0) -> np.ndarray:
    """(H, d) unit-norm random directions, entries U(−1, 1) or N(0, 1): the paper's random head sets."""
    rng = np.random.default_rng(seed)
    if distribution == "uniform":
        heads = rng.uniform(-1.0, 1.0, (num_heads, dim))
    elif distribution == "gaussian":
        heads = rng.standard_normal((num_heads, dim))
    else:
        raise ValueError(f"distribution must be 'uniform' or 'gaussian', got {distribution!r}")
    return heads / np.linalg.norm(heads, axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------- RewardBench

REWARDBENCH_SECTIONS = {
    "Chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    "Chat Hard": ("mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"),
    "Safety": ("refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"),
    "Reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}
# RewardBench weighs a section's subsets by these counts; math-prm (447 pairs) counts as much as all of code.
REWARDBENCH_COUNTS = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28,
    "mt-bench-med": 40, "mt-bench-hard": 37, "llmbar-natural": 100, "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46, "refusals-dangerous": 100,
    "refusals-offensive": 100, "xstest-should-refuse": 154, "xstest-should-respond": 250, "donotanswer": 136,
    "math-prm": 984, "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164,
    "hep-rust": 164,
}


def rewardbench_scores(correct: np.ndarray, subsets: np.ndarray) -> dict[str, float]:
    """Section scores (count-weighted subset accuracies) and their mean, for the sections present."""
    subsets = np.asarray(subsets)
    out = {}
    for section, names in REWARDBENCH_SECTIONS.items():
        present = [s for s in names if (subsets == s).any()]
        if present:
            weights = np.array([REWARDBENCH_COUNTS[s] for s in present], dtype=np.float64)
            accuracy = np.array([correct[subsets == s].mean() for s in present])
            out[section] = float(weights @ accuracy / weights.sum())
    if out:
        out["score"] = float(np.mean(list(out.values())))
    return out


def is_rewardbench(groups: np.ndarray) -> bool:
    return set(np.unique(groups).tolist()) <= set(REWARDBENCH_COUNTS)


# ----------------------------------------------------------------------------------------------- the report

@dataclass
class Split:
    """Features and pairs of one embedding set, split by prompt (`data.split_by_prompt`, recorded in `rule`)."""

    chosen: np.ndarray  # (N, d)
    rejected: np.ndarray  # (N, d)
    pairs: list[PreferencePair]
    train: np.ndarray  # indices
    test: np.ndarray
    rule: dict[str, Any] = field(default_factory=split_record)

    @classmethod
    def of(cls, chosen: np.ndarray, rejected: np.ndarray, pairs: list[PreferencePair],
           test_fraction: float = 0.5, seed: int = 0) -> Split:
        if len(pairs) != len(chosen):
            raise ValueError(f"{len(pairs)} pairs but {len(chosen)} embeddings")
        train, test = split_by_prompt(pairs, test_fraction, seed)
        return cls(chosen, rejected, pairs, np.array(train, dtype=int), np.array(test, dtype=int),
                   split_record(test_fraction, seed))

    @classmethod
    def held_out_from(cls, heads: HeadSet, chosen: np.ndarray, rejected: np.ndarray, pairs: list[PreferencePair],
                      test_fraction: float = 0.5, seed: int = 0) -> tuple[Split, str | None]:
        """This folder split by the head set's recorded rule, testing only on prompts outside its training half,
        whatever dataset it was fitted on (the rule is a function of the prompt alone), and a warning or None.

        A head set without a record (fitted before splits were recorded) is split by `test_fraction` and `seed`,
        with a warning: its training prompts may be among the test pairs.
        """
        recorded = heads.info.get("split")
        if recorded is None:
            return cls.of(chosen, rejected, pairs, test_fraction, seed), (
                f"head set {heads.name}@{heads.version} records no split (fitted before splits were recorded): "
                f"split by test fraction {test_fraction} and seed {seed}; its training prompts may be among the "
                "test pairs")
        if recorded.get("rule") != SPLIT_RULE:
            raise ValueError(f"head set {heads.name}@{heads.version} was split by rule {recorded.get('rule')!r}; "
                             f"this version splits by {SPLIT_RULE!r}")
        data = cls.of(chosen, rejected, pairs, recorded["test_fraction"], recorded["seed"])
        part = recorded.get("part", "train")
        if part == "test":  # fitted on the test side: the other side is what it has not seen
            return dataclasses.replace(data, train=data.test, test=data.train), None
        if part == "all":
            return data, (f"head set {heads.name}@{heads.version} was fitted on every prompt of its dataset: "
                          "the test pairs' prompts may be among them")
        return data, None

    def fitted_on(self, part: str = "train") -> dict[str, Any]:
        """The record a head set fitted on this split's `part` keeps in `info["split"]`."""
        return {**self.rule, "part": part}

    def training(self) -> tuple[np.ndarray, np.ndarray, list[PreferencePair]]:
        """The training split's chosen and rejected features and its pairs: what a head set is fitted on."""
        return self.chosen[self.train], self.rejected[self.train], [self.pairs[i] for i in self.train]

    def scored(self, heads: np.ndarray | HeadSet) -> ScoredPairs:
        """The test split's head scores and groups."""
        return ScoredPairs.of(heads, self.chosen[self.test], self.rejected[self.test],
                              groups_of(self.pairs)[self.test])


def drm_report(data: Split, heads: HeadSet, *, n_values: Sequence[int] = (5, 15, 50),
               methods: Sequence[Method] = ("hyre", "default"), seeds: Sequence[int] = SEEDS,
               adapt_from: Split | None = None, use_prior: bool = True, baselines: bool = True) -> dict[str, Any]:
    """Every row of the paper's tables for one embedding set and head set, as plain data (see `to_markdown`).

    `adapt_from`: another annotator's pairs on the same prompts; adds rows adapted on them and scored here.
    `use_prior=False` adapts from a zero prior instead of the head set's default profile: few-shot alone.
    """
    if heads.dim != data.chosen.shape[1]:
        raise ValueError(f"head set is for {heads.dim}-d features, embeddings are {data.chosen.shape[1]}-d")
    test = data.scored(heads)
    groups = test.group_names
    prior = heads.default_weights.astype(np.float64) if use_prior else np.zeros(heads.num_heads)
    rows = [fixed_profile(test, heads.default_weights, "population profile (no feedback)")]
    first_pc = heads.head_names.index("+pc0") if "+pc0" in heads.head_names else 0
    rows.append(fixed_profile(test, np.eye(heads.num_heads)[first_pc], f"single head {heads.head_names[first_pc]}"))
    per_head = head_accuracy(test)  # (G, H)
    best = per_head.argmax(1)
    rows.append(fixed_profile(test, np.eye(heads.num_heads)[best], "best head per group (oracle)", per_group=True))
    for n in n_values:
        rows += [evaluate_adaptation(test, n, method=m, prior=prior, seeds=seeds, label=f"{_METHOD_NAMES[m]} n={n}",
                                     center=heads.hyperprior_center) for m in methods]
    if adapt_from is not None:
        source = adapt_from.scored(heads)
        for n in n_values:
            rows += [evaluate_adaptation(test, n, method=m, prior=prior, seeds=seeds, source=source,
                                         label=f"{_METHOD_NAMES[m]} n={n}, adapted on the other annotator",
                                         center=heads.hyperprior_center) for m in methods]
    train_chosen, train_rejected, train_pairs = data.training()
    # the ceiling of the gap shares: a supervised head as good as the population head's own recipe (CV'd L2)
    supervised_l2 = choose_population_l2(train_chosen, train_rejected, train_pairs)
    supervised = fit_population_head(train_chosen, train_rejected, l2=supervised_l2["l2"])
    if baselines:
        n = 15 if 15 in n_values else n_values[0]
        for distribution in ("uniform", "gaussian"):
            random = data.scored(random_heads(heads.dim, heads.num_heads, distribution))
            rows.append(evaluate_adaptation(random, n, method="hyre", seeds=seeds,
                                            label=f"HyRe n={n}, random {distribution} heads"))
        # One profile over these heads fitted on every training pair (the supervised head's estimator, restricted
        # to the heads): how much of the pooled preference the head set holds. Per-group profiles can beat it.
        rows.append(fixed_profile(test, fit_population_head(heads.scores(train_chosen), heads.scores(train_rejected)),
                                  f"best profile over these heads, all {len(data.train)} training pairs"))
        rows.append(fixed_profile(data.scored(supervised[None]), np.ones(1),
                                  f"supervised BT head, all {len(data.train)} training pairs "
                                  f"(L2 {supervised_l2['l2']:g}, cross-validated)"))
        fixed = fit_population_head(train_chosen, train_rejected, l2=FIXED_L2)  # the reference's, sklearn C=1
        rows.append(fixed_profile(data.scored(fixed[None]), np.ones(1),
                                  f"BT head at the fixed L2 {FIXED_L2:g}, all {len(data.train)} training pairs"))
    report: dict[str, Any] = {
        "head_set": {k: heads.metadata()[k] for k in ("name", "version", "backbone", "dataset", "num_heads",
                                                         "content_hash")},
        "pairs": {"train": len(data.train), "test": len(data.test)}, "split": data.rule, "groups": groups,
        "seeds": len(seeds),
        "prior": "head set default profile" if use_prior else "zero",
        "supervised_l2": supervised_l2["l2"],
        "rows": [{"label": r.label, "reference": r.summary(), "honest": r.summary(honest=True)} for r in rows],
        "best_heads": {g: {"head": heads.head_names[int(h)], "accuracy": float(per_head[i, h])}
                       for i, (g, h) in enumerate(zip(groups, best))},
    }
    if baselines and use_prior:  # the population profile row is then the prior adaptation starts from
        report["gap_recovered"] = {variant: _gap_recovered(report["rows"], variant)
                                   for variant in ("honest", "reference")}
    picks = sample_adaptation(test, n_values[0], seeds)
    idx = np.concatenate(list(picks.values()))  # (G·S, n): every adapted user of the smallest n
    evidence = prior_strength_evidence(test.chosen[idx], test.rejected[idx], prior=prior, strengths=STRENGTHS)
    report["evidence"] = {"n": n_values[0], "strengths": STRENGTHS.tolist(), "log_evidence": evidence.tolist(),
                          "peak": float(STRENGTHS[evidence.argmax()])}
    report["hyperprior"] = {"center": heads.hyperprior_center or DEFAULT_STRENGTH,
                            "calibrated": heads.hyperprior_center is not None,
                            "calibration": heads.info.get("hyperprior_calibration")}
    if is_synthetic(data.pairs):  # real data may carry attribute ratings too: only the generator's have a truth
        report["synthetic"] = synthetic_report(data, heads, n=15 if 15 in n_values else n_values[0], seeds=seeds,
                                               methods=methods)
    if is_rewardbench(test.groups):
        full = data.scored(supervised[None])
        report["rewardbench"] = {
            "population profile": rewardbench_scores(
                pair_accuracy(test.chosen, test.rejected, heads.default_weights)[:, 0], test.groups),
            "supervised BT head": rewardbench_scores(
                pair_accuracy(full.chosen, full.rejected, np.ones(1))[:, 0], test.groups)}
    return report


# The smallest population → supervised gap (accuracy) whose shares `drm_report` prints.
MIN_GAP = 0.005


def _gap_recovered(rows: list[dict[str, Any]], variant: str = "honest") -> dict[str, float]:
    """(adapted − population) / (supervised − population), overall, for each adapted same-annotator row and for
    the one profile over the heads fitted on every training pair (how much of the gap a pooled profile holds).

    `variant` "honest" reads accuracies with the adaptation pairs removed from the test set; "reference" leaves
    them in, which credits a profile with the pairs it was fitted on (1.43 of the gap where the honest share was
    0.84, on one cross-judge run).
    """
    overall = {row["label"]: row[variant]["overall"][0] for row in rows if row[variant]}
    population = overall["population profile (no feedback)"]
    supervised = next(v for k, v in overall.items() if k.startswith("supervised"))
    if supervised - population < MIN_GAP:  # shares of a gap this small are noise (HH-RLHF: ±45 of a 0.1-point gap)
        return {}
    return {k: (v - population) / (supervised - population) for k, v in overall.items()
            if (" n=" in k and "random" not in k and "other" not in k) or k.startswith("best profile")}


def planted_angles(chosen: np.ndarray, rejected: np.ndarray, rating_gaps: np.ndarray, user_weights: np.ndarray,
                   heads: np.ndarray) -> np.ndarray:
    """Cosines of the principal angles between the planted preference directions and the span of the heads.

    A simulated user's utility is w · ratings. Least squares of the feature gaps (N, d) on the rating gaps
    (N, A) gives how each attribute moves the features, M (d, A); the feature direction v with v · (φc − φr) =
    w · (rc − rr) is then M (MᵀM)⁻¹ w. (Regressing this way round is well conditioned: A ≪ d.) Cosines near 1:
    the heads span every user's preference; a random k-dimensional subspace of ℝᵈ gives about √(k/d).
    """
    forward, *_ = np.linalg.lstsq(rating_gaps, np.asarray(chosen, np.float64) - rejected, rcond=None)  # (A, d)
    forward = forward.T  # (d, A)
    planted = forward @ np.linalg.solve(forward.T @ forward, np.asarray(user_weights, np.float64).T)  # (d, U)
    planted, _ = np.linalg.qr(planted)
    span, _ = np.linalg.qr(np.asarray(heads, np.float64).T)  # (d, rank)
    return np.linalg.svd(planted.T @ span, compute_uv=False)  # (U,) cosines, largest first


def synthetic_report(data: Split, heads: HeadSet, *, n: int = 15, seeds: Sequence[int] = SEEDS,
                     methods: Sequence[Method] = ("hyre", "default")) -> dict[str, Any]:
    """The known-truth checks on `rewardprism.synthetic` data: planted directions and each user's ceiling.

    Per simulated user (a group): the ceiling is the best weighting of these heads, MAP-BT with a negligible
    prior fitted on all of the user's labels; adaptation from n of the user's test pairs is scored on the rest of
    the test pairs (the adaptation pairs removed) against the sampled labels and against the user's true utility
    (pairs of equal utility left out).
    """
    from rewardprism.adapt import bt
    users = {u.name: u for u in DEFAULT_USERS}
    if not is_synthetic(data.pairs):
        raise ValueError("synthetic checks need pairs from rewardprism.synthetic (attributes and a known user)")
    train = [data.pairs[i] for i in data.train]
    gaps = rating_matrix(train, "chosen") - rating_matrix(train, "rejected")
    pcs = [i for i, name in enumerate(heads.head_names) if name.startswith("+pc")]
    cosines = planted_angles(data.chosen[data.train], data.rejected[data.train], gaps,
                             np.array([users[u].weights for u in sorted(users)]), heads.weight[pcs])
    test = data.scored(heads)
    everything = ScoredPairs.of(heads, data.chosen, data.rejected, groups_of(data.pairs))
    rows = {}
    for name in test.group_names:
        user = users[name]
        members = test.indices(name)
        pairs = [data.pairs[i] for i in data.test[members]]
        utility_gap = user.utility(rating_matrix(pairs, "chosen")) - user.utility(rating_matrix(pairs, "rejected"))
        decided = utility_gap != 0
        mine = everything.indices(name)
        ceiling, _ = bt(everything.chosen[mine][None], everything.rejected[mine][None], strength=1e-3)
        profiles = {"ceiling (all labels)": ceiling}
        picks = sample_adaptation(test, n, seeds, [name])[name]
        for method in methods:
            profiles[f"{_METHOD_NAMES[method]} n={n}"] = adapt_users(
                test.chosen[picks], test.rejected[picks], heads.default_weights, method=method,
                center=heads.hyperprior_center)[0]
        rows[name] = {}
        unseen = np.stack([~np.isin(members, seed_picks) for seed_picks in picks], axis=1)  # (N_u, S)
        for label, weights in profiles.items():
            hits = pair_accuracy(test.chosen[members], test.rejected[members], weights)  # (N_u, P)
            kept = np.ones_like(hits) if label.startswith("ceiling") else unseen  # honest: picks not scored
            truth = hits == (utility_gap > 0)[:, None]
            rows[name][label] = {"labels": float(hits[kept].mean()),
                                 "truth": float(truth[kept & decided[:, None]].mean())}
    return {"principal_angle_cosines": cosines.tolist(), "random_subspace_cosine": float(np.sqrt(len(pcs) / heads.dim)),
            "attributes": list(ATTRIBUTES), "users": rows, "n": n}


_METHOD_NAMES = {"hyre": "HyRe", "default": "default (hierarchical BT)", "bt": "MAP-BT"}


def to_markdown(report: dict[str, Any]) -> str:
    """The report's tables: mean (std) over seeds per group, overall and pooled; both test-set variants."""
    # one group: its column, "overall" and "all pairs" are the same numbers; print it once
    columns = report["groups"] + ["overall", "all pairs"] if len(report["groups"]) > 1 else ["all pairs"]
    head = report["head_set"]
    lines = [(f"Head set `{head['name']}` v{head['version']} ({head['num_heads']} heads, backbone "
             f"`{head['backbone']}`, hash `{head['content_hash']}`); {report['pairs']['train']} training / "
             f"{report['pairs']['test']} test pairs; {report['seeds']} seeds; adaptation prior: "
             f"{report['prior']}; split by prompt: {_split_text(report)}."), ""]
    for variant, title in (("honest", "adaptation pairs removed from the test set"),
                           ("reference", "reference protocol (adaptation pairs left in the test set, as the paper)")):
        lines += [f"Accuracy, {title}:", "", "| | " + " | ".join(columns) + " |",
                  "|---|" + "---|" * len(columns)]
        lines += [f"| {row['label']} | " + " | ".join(_cell(row[variant].get(c)) for c in columns) + " |"
                  for row in report["rows"] if row[variant]]
        lines.append("")
    lines += ["Best single head per group (Table 1):", "", "| group | head | accuracy |", "|---|---|---|"]
    lines += [f"| {g} | {b['head']} | {b['accuracy']:.3f} |" for g, b in report["best_heads"].items()]
    evidence, hyper = report["evidence"], report["hyperprior"]
    lines += ["", (f"Prior strength (relative to the mean squared score gap) with the most evidence, summed over "
              f"all {evidence['n']}-pair adaptation sets: {evidence['peak']:g}. The default's hyperprior is "
              f"centred at {hyper['center']:g} ({'' if hyper['calibrated'] else 'not '}calibrated on the training "
              f"pairs).")]
    gap = report.get("gap_recovered") or {}
    if gap.get("honest"):
        lines += ["", "Share of the gap from the population profile to the supervised head recovered (overall, "
                  "adaptation pairs removed): " + ", ".join(f"{k} {v:.2f}" for k, v in gap["honest"].items())]
        differ = {k: v for k, v in gap.get("reference", {}).items() if abs(v - gap["honest"].get(k, v)) > 5e-3}
        if differ:
            lines += ["", "The same, reference protocol (adaptation pairs left in the test set; not a measure of "
                      "generalization): " + ", ".join(f"{k} {v:.2f}" for k, v in differ.items())]
    if "synthetic" in report:
        syn = report["synthetic"]
        lines += ["", "Synthetic users (known truth): cosines of the principal angles between the planted preference "
                  "directions and the span of the +PC heads: " + ", ".join(f"{c:.3f}" for c in
                                                                          syn["principal_angle_cosines"])
                  + f" (a random subspace of that size: {syn['random_subspace_cosine']:.3f}).", "",
                  "| user | profile | accuracy vs labels | vs true utility | share of the ceiling (truth) |",
                  "|---|---|---|---|---|"]
        for user, profiles in syn["users"].items():
            ceiling = profiles["ceiling (all labels)"]["truth"]
            lines += [f"| {user} | {label} | {v['labels']:.3f} | {v['truth']:.3f} | {v['truth'] / ceiling:.2f} |"
                      for label, v in profiles.items()]
    if "rewardbench" in report:
        lines += ["", "RewardBench sections:", ""]
        lines += [f"- {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
                  for name, scores in report["rewardbench"].items()]
    return "\n".join(lines) + "\n"


def _split_text(report: dict[str, Any]) -> str:
    split = report.get("split") or {}
    held = report.get("held_out")
    text = f"rule `{split.get('rule')}`, seed {split.get('seed')}, test fraction {split.get('test_fraction')}"
    if held:
        text += (f"; {held['test_pairs']} of the folder's {held['folder_pairs']} pairs are on prompts outside the "
                 "head set's training half" if held["record"] else
                 "; the head set records no split, so its training prompts may be among the test pairs")
    return text


def _cell(value: tuple[float, float] | None) -> str:
    if value is None:
        return ""
    mean, std = value
    return f"{mean:.3f} ({std:.3f})" if std > 0 else f"{mean:.3f}"
