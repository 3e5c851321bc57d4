"""PNG plots of a finished sweep, read from the results table and checkpoints it wrote (Ray is not needed).

    python tune/report.py ~/rewardprism-runs/tune/vrm-small        # → <experiment>/plots/*.png
    python tune/report.py ~/rewardprism-runs/tune/drm-alpaca --heads 8 --pairs 15 --method hyre

VRM sweeps: held-out accuracy vs λ, mean ± std over seeds per configuration. DRM sweeps (figures as in Luo et al.
2025, arXiv:2502.13131): accuracy vs the number of heads k for each adaptation size n (Figures 4–5); the adapted
weights over the heads for each group (Figure 2) and the correlation between the groups' weight vectors
(Figure 3), for the best trial or the one named by --heads/--pairs/--method.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Annotated, Any

import matplotlib

matplotlib.use("Agg")  # files only, also on machines without a display
import matplotlib.pyplot as plt
import numpy as np
import typer
from rewardprism.cli_common import fail
from sweeps import BEST_DIR, PLOTS_DIR, RESULTS_JSON, SWEEP_JSON, RunSettings

DPI = 110


def read_sweep(experiment: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    meta, rows = experiment / SWEEP_JSON, experiment / RESULTS_JSON
    if not (meta.exists() and rows.exists()):
        raise FileNotFoundError(f"{experiment} has no {SWEEP_JSON} and {RESULTS_JSON}: run tune/sweep_vrm.py or "
                                "tune/sweep_drm.py first (they write them when the sweep ends)")
    return json.loads(meta.read_text()), json.loads(rows.read_text())


def render_report(experiment: Path, *, heads: int | None = None, pairs: int | None = None,
                  method: str | None = None, out: Path | None = None) -> list[Path]:
    """Every plot of the sweep in `experiment`, as PNG files in `out` (default <experiment>/plots)."""
    meta, rows = read_sweep(experiment)
    out = out or experiment / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    title = meta["config"]["run"]["name"]
    if meta["kind"] == "vrm":
        return [plot_accuracy_vs_lambda(rows, meta, title, out / "accuracy_vs_lambda.png")]
    best = json.loads((experiment / BEST_DIR / "summary.json").read_text())
    chosen = {"config/heads": heads or best["heads"], "config/pairs": pairs or best["pairs"],
              "config/method": method or best["method"]}
    match = [r for r in rows if all(r.get(k) == v for k, v in chosen.items())]
    if not match or not match[0].get("checkpoint"):
        raise FileNotFoundError(f"no finished trial with {chosen} in {experiment}")
    adapted = np.load(Path(match[0]["checkpoint"]) / meta["adapted"])
    label = f"{title}: k = {chosen['config/heads']}, n = {chosen['config/pairs']}, {chosen['config/method']}"
    groups, names, weights = component_weights(adapted)
    plots = [plot_accuracy_vs_heads(rows, meta, title, out / "accuracy_vs_heads.png"),
             plot_weights(groups, names, weights, label, out / "adapted_weights.png"),
             plot_correlation(groups, weights, label, out / "weight_similarity.png")]
    if any(str(r.get("config/method")).startswith(SELECT_PREFIX) for r in rows):
        plots.append(plot_accuracy_vs_pairs(rows, meta, title, out / "accuracy_vs_pairs.png"))
    return plots


def finish(run: RunSettings, summary: dict[str, Any]) -> None:
    """The sweep scripts' last step: render the sweep's plots, print where the results and the best configuration
    are."""
    plots = render_report(run.experiment_dir)
    typer.echo(json.dumps({"experiment": str(run.experiment_dir), "best": summary,
                           "plots": [str(p) for p in plots]}, indent=1, default=str))


# ----------------------------------------------------------------------------------------------- VRM

def plot_accuracy_vs_lambda(rows: list[dict[str, Any]], meta: dict[str, Any], title: str, path: Path) -> Path:
    """One point per trial, a line through each configuration's mean over seeds and a ± std band; λ = 0 (no
    supervision, which a log axis cannot show) as a horizontal band. Hollow points: stopped early by ASHA."""
    metric, max_t = meta["metric"], meta["max_t"]
    keys = [f"config/{k}" for k in meta["keys"]]
    configs: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get(metric) is not None:
            configs.setdefault(tuple(row[k] for k in keys), []).append(row)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    lam_key = "config/model.lam"
    for runs in (g for g in configs.values() if g[0][lam_key] == 0):
        mean, std = np.mean([r[metric] for r in runs]), np.std([r[metric] for r in runs])
        ax.axhspan(mean - std, mean + std, color="tab:gray", alpha=0.2)
        ax.axhline(mean, color="tab:gray", ls="--", label=f"λ = 0 (unsupervised), mean ± std of {len(runs)} seed(s)")
    positive = sorted((g for g in configs.values() if g[0][lam_key] > 0), key=lambda g: g[0][lam_key])
    if positive:
        lam = np.array([g[0][lam_key] for g in positive])
        mean = np.array([np.mean([r[metric] for r in g]) for g in positive])
        std = np.array([np.std([r[metric] for r in g]) for g in positive])
        ax.plot(lam, mean, "-", color="tab:blue", label="mean over seeds")
        ax.fill_between(lam, mean - std, mean + std, color="tab:blue", alpha=0.2, label="± std over seeds")
        for done in (True, False):
            runs = [r for g in positive for r in g if (r["step"] >= max_t) == done]
            if runs:
                ax.scatter([r[lam_key] for r in runs], [r[metric] for r in runs], s=22, zorder=3,
                           facecolors="tab:blue" if done else "none", edgecolors="tab:blue",
                           label="trial (one seed)" if done else "trial stopped early by ASHA")
        ax.set_xscale("log")
    ax.set_xlabel("λ, weight of the supervision loss (log scale)")
    ax.set_ylabel("held-out pairwise accuracy")
    ax.set_title(f"{title}: accuracy vs λ (other hyperparameters sampled)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save(fig, path)


# ----------------------------------------------------------------------------------------------- DRM

def plot_accuracy_vs_heads(rows: list[dict[str, Any]], meta: dict[str, Any], title: str, path: Path) -> Path:
    """One panel per adaptation size n, one line per method: mean accuracy over seeds, ± std band."""
    metric = meta["metric"]
    rows = [r for r in rows if r.get(metric) is not None]
    sizes = sorted({r["config/pairs"] for r in rows})
    methods = [m for m in meta["config"]["methods"] if any(r["config/method"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(sizes), figsize=(3.4 * len(sizes) + 0.6, 3.6), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for method in methods:
            line = sorted((r for r in rows if r["config/pairs"] == n and r["config/method"] == method),
                          key=lambda r: r["config/heads"])
            k = np.array([r["config/heads"] for r in line])
            mean, std = np.array([r[metric] for r in line]), np.array([r[f"{metric}_std"] for r in line])
            ax.plot(k, mean, "o-", ms=3, label=method)
            ax.fill_between(k, mean - std, mean + std, alpha=0.15)
        ax.axhline(0.5, color="black", lw=0.8, ls=":", label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["config/heads"] for r in rows}), [str(k) for k in sorted({r["config/heads"]
                                                                                          for r in rows})])
        ax.set_title(f"n = {n} labelled pairs per group", fontsize=9)
        ax.set_xlabel("principal components k (heads ±PC)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out accuracy (honest), mean over groups")
    fig.suptitle(fitted(f"{title}: accuracy vs heads (mean ± std over {meta['config']['seeds']} seeds)", fig, 10),
                 fontsize=10)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=len(methods) + 1, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below the panels
    return save(fig, path, layout=False)


SELECT_PREFIX = "select-"  # sweep_drm's selection methods: which pairs each simulated user is asked


def plot_accuracy_vs_pairs(rows: list[dict[str, Any]], meta: dict[str, Any], title: str, path: Path) -> Path:
    """Accuracy vs the number of pairs asked, one line per selection method (chosen vs random), at each method's
    largest k: how many random labels the chosen ones are worth."""
    metric = meta["metric"]
    rows = [r for r in rows if r.get(metric) is not None and str(r["config/method"]).startswith(SELECT_PREFIX)]
    k = max(r["config/heads"] for r in rows)
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for method in sorted({r["config/method"] for r in rows}):
        line = sorted((r for r in rows if r["config/method"] == method and r["config/heads"] == k),
                      key=lambda r: r["config/pairs"])
        n = np.array([r["config/pairs"] for r in line])
        mean, std = np.array([r[metric] for r in line]), np.array([r[f"{metric}_std"] for r in line])
        ax.plot(n, mean, "o-", ms=3, label=method.removeprefix(SELECT_PREFIX))
        ax.fill_between(n, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("pairs asked per user n")
    ax.set_ylabel("held-out accuracy (honest), mean over groups")
    ax.set_title(f"{title}: chosen vs random pairs (k = {k}, ± std over {meta['config']['seeds']} seeds)",
                 fontsize=9, wrap=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def component_weights(adapted: Any) -> tuple[list[str], list[str], np.ndarray]:
    """(groups, directions, (G, C) weights): each group's adapted weights, mean over seeds, per direction.

    A component's two heads ±PC_i are one direction with opposite signs, so its weight is w(+PC_i) − w(−PC_i);
    the population head keeps its own. Weights are in units of each head's score std (for HyRe these are its
    softmax weights) and each group's row is scaled to unit L1 norm: shares of the group's weight.
    """
    names = list(adapted["head_names"])
    if "+pc0" not in names:
        raise ValueError("the weight figures read DRM heads (±PC); this trial adapted over random heads")
    weight = adapted["weights"].mean(0) * adapted["head_std"]  # (G, H)
    columns, labels = [], []
    if "population" in names:
        columns.append(weight[:, names.index("population")])
        labels.append("pop.")
    for i in range(sum(n.startswith("+pc") for n in names)):
        columns.append(weight[:, names.index(f"+pc{i}")] - weight[:, names.index(f"-pc{i}")])
        labels.append(f"PC{i}")
    matrix = np.stack(columns, axis=1)  # (G, C)
    return list(adapted["groups"]), labels, matrix / np.abs(matrix).sum(1, keepdims=True)


def plot_weights(groups: list[str], names: list[str], weights: np.ndarray, label: str, path: Path) -> Path:
    """Figure 2: a groups × directions map of the adapted weights (signed shares)."""
    fig, ax = plt.subplots(figsize=(min(max(6.0, 2.5 + 0.2 * len(names)), 12), 0.4 * len(groups) + 1.8))
    bound = float(np.abs(weights).max())
    image = ax.imshow(weights, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    step = max(1, len(names) // 16)
    ax.set_xticks(range(0, len(names), step), names[::step], rotation=90, fontsize=7)
    ax.set_yticks(range(len(groups)), groups, fontsize=8)
    ax.set_xlabel("direction (principal component of preference differences)")
    ax.set_ylabel("group")
    fig.colorbar(image, ax=ax, label="share of weight\n(+: toward +PC)", pad=0.01)
    ax.set_title(f"Adapted weights per group, mean over seeds\n{label}", fontsize=9)
    return save(fig, path)


def plot_correlation(groups: list[str], weights: np.ndarray, label: str, path: Path) -> Path:
    """Figure 3: how alike the groups' weight vectors are, as cosine similarity (uncentred correlation).

    Uncentred because a weight vector has no natural mean across heads; Pearson's would also collapse to ±1
    for k = 2 directions.
    """
    unit = weights / np.linalg.norm(weights, axis=1, keepdims=True)
    corr = unit @ unit.T  # (G, G)
    fig, ax = plt.subplots(figsize=(0.7 * len(groups) + 2.6, 0.6 * len(groups) + 1.6))
    image = ax.imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1)
    for i in range(len(groups)):
        for j in range(len(groups)):
            ax.text(j, i, f"{corr[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(corr[i, j]) > 0.6 else "black")
    ax.set_xticks(range(len(groups)), groups, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(groups)), groups, fontsize=8)
    ax.set_xlabel("group")
    ax.set_ylabel("group")
    fig.colorbar(image, ax=ax, label="cosine similarity of adapted weights")
    ax.set_title(f"Similarity of groups' adapted weights\n{label}", fontsize=9)
    return save(fig, path)


def fitted(text: str, fig: Any, fontsize: float) -> str:
    """`text` wrapped to the figure's width (a one-panel figure is narrower than a long title)."""
    per_line = max(20, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))  # ~0.6 em per character
    return textwrap.fill(text, per_line)


def save(fig: Any, path: Path, layout: bool = True) -> Path:
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def main(
    experiment: Annotated[Path, typer.Argument(help="a sweep's folder: <run.storage_path>/<run.name>")],
    heads: Annotated[int | None, typer.Option(help="DRM: the trial's k (default: the best trial's)")] = None,
    pairs: Annotated[int | None, typer.Option(help="DRM: the trial's n (default: the best trial's)")] = None,
    method: Annotated[str | None, typer.Option(help="DRM: the trial's method (default: the best trial's)")] = None,
    out: Annotated[Path | None, typer.Option(help="folder for the PNGs (default: <experiment>/plots)")] = None,
) -> None:
    """Render a finished sweep's plots."""
    try:
        paths = render_report(experiment.expanduser().resolve(), heads=heads, pairs=pairs, method=method, out=out)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    typer.echo("\n".join(str(p) for p in paths))


if __name__ == "__main__":
    typer.run(main)
