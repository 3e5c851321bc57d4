"""Ray Tune sweeps: the real commands (`tune/sweep_*.py`) on tiny models, as drivers of the session's Ray cluster.

The DRM sweep is interrupted with Ctrl+C and finished with `--resume` (Tuner.restore), and its accuracies are
recomputed here from its saved weights and a decomposition fitted independently for each k. The VRM sweep runs
two trials, each a Ray Train run, and exports the best.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import typer
import yaml
from head_sets_for_tests import made_up_features
from rewardprism.backbone import load_backbone
from rewardprism.cli import app
from rewardprism.config import ConfigError, from_dict, load_config
from rewardprism.data import groups_of, split_by_prompt
from rewardprism.drm import PreferenceDecomposition, build_head_set
from rewardprism.embed import EmbeddingSet, embed_pairs
from rewardprism.heads import HeadSet
from rewardprism.recipes.vrm import VrmConfig
from rewardprism.synthetic import SyntheticGenerator
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
TUNE = ROOT / "tune"
sys.path.insert(0, str(TUNE))  # the scripts' functions, for the checks that need no cluster
import sweep_drm
import sweep_vrm

TINY_FEATURES = made_up_features("tiny-bert")  # the spec of the features these tests make up

PNG = b"\x89PNG\r\n\x1a\n"


def sweep_file(template: str, folder: Path, **changes: object) -> Path:
    """A copy of a sweep file in tune/, its runs under `folder`."""
    data = yaml.safe_load((TUNE / template).read_text())
    data["run"]["storage_path"] = str(folder / "runs")
    data.update(changes)
    path = folder / template
    path.write_text(yaml.safe_dump(data))
    return path


def driver_env(ray_cluster) -> dict[str, str]:
    """The sweep joins the session's cluster instead of starting one (token auth is on by default in Ray 2.60)."""
    return {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}


def sweep_command(script: str, config: Path, *extra: str) -> list[str]:
    return [sys.executable, str(TUNE / script), "--config", str(config), *extra]


def sweep(script: str, config: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_command(script, config, *extra), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400, check=False)


def interrupt_when(command: list[str], env: dict[str, str], log: Path, ready: Callable[[], object]) -> None:
    """Start a sweep, press Ctrl+C once `ready()` holds; it must stop unfinished and say how to resume."""
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not ready() and proc.poll() is None:
            assert time.monotonic() < deadline, "not ready within 300 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    assert "--resume" in log.read_text()


def register(tmp_path: Path, headset: Path) -> str:
    """`rewardprism models register DIR --activate` on a fresh SQLite registry; returns what it printed."""
    runner, url = CliRunner(), f"sqlite:///{tmp_path / 'registry.db'}"
    for args in (["db", "--database-url", url, "upgrade"],
                 ["models", "--database-url", url, "register", str(headset), "--activate"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    return result.stdout


def assert_pngs(paths: list[Path]) -> None:
    for path in paths:
        assert path.read_bytes()[:8] == PNG and 5_000 < path.stat().st_size < 200_000, path


# ----------------------------------------------------------------------------------------------- no cluster

def test_every_sweep_file_in_tune_is_valid():
    """Each shipped sweep file passes every check the scripts make before Ray starts, except reading the data."""
    for path in sorted(TUNE.glob("*.yaml")):
        if "recipe" in yaml.safe_load(path.read_text()):
            sweep = load_config(sweep_vrm.VrmSweep, path)
            points = sweep_vrm.explicit_points(sweep.points)
            sweep_vrm.search_space(sweep.space)
            recipe = load_config(VrmConfig, ROOT / sweep.recipe, sweep.overrides)
            sweep_vrm.check_reports(recipe)
            sweep_vrm.check_values(recipe.to_dict(), sweep.space, points)
        else:
            load_config(sweep_drm.DrmSweep, path)


def test_sweep_files_fail_naming_the_field():
    with pytest.raises(ConfigError, match=r"^space.model.lam: must be \{loguniform"):
        sweep_vrm.search_space({"model.lam": {"loguniform": [0.1]}})
    with pytest.raises(ConfigError, match="^space.train.seed: is set by `seeds`"):
        sweep_vrm.search_space({"train.seed": {"choice": [1, 2]}})
    bad_ranges = {  # Tune would take them and fail inside Tuner.fit (or never draw a value)
        "uniform: low < high": {"uniform": [1.0, 0.0]},
        "randint: low < high": {"randint": [4, 4]},
        "randint bounds must be integers": {"randint": [1, 4.5]},
        "uniform bounds must be numbers": {"uniform": ["a", 1]},
        "choice needs at least one value": {"choice": []},
    }
    for message, spec in bad_ranges.items():
        with pytest.raises(ConfigError, match=f"^space.model.lam: {message.split(':')[0]}"):
            sweep_vrm.search_space({"model.lam": spec})
    recipe = load_config(VrmConfig, ROOT / "configs" / "vrm_tiny.yaml").to_dict()
    with pytest.raises(ConfigError, match="^model.betaw: unknown field"):
        sweep_vrm.check_values(recipe, {"model.betaw": {"uniform": [0.0, 1.0]}}, [])
    with pytest.raises(ConfigError, match="^model.latent_dim: must be a positive integer"):
        sweep_vrm.check_values(recipe, {"model.latent_dim": {"choice": [4, 0]}}, [])
    with pytest.raises(ConfigError, match="^train.checkpoint_every: is 3, not a multiple of train.eval_every=2"):
        sweep_vrm.check_reports(load_config(VrmConfig, ROOT / "configs" / "vrm_tiny.yaml",
                                            ["train.checkpoint_every=3", "train.eval_every=2"]))
    with pytest.raises(ConfigError, match=r"^methods: unknown \['lasso'\]"):
        from_dict(sweep_drm.DrmSweep, {"methods": ["hyre", "lasso"]}, "")
    with pytest.raises(ConfigError, match="^select_pairs: 7 is not one of adaptation_pairs"):
        from_dict(sweep_drm.DrmSweep, {"adaptation_pairs": [5, 15], "select_pairs": 7}, "")
    with pytest.raises(ConfigError, match="^run.name: must be a folder name"):
        from_dict(sweep_drm.DrmSweep, {"run": {"name": ".."}}, "")
    with pytest.raises(ConfigError, match="^run.max_concurrent_trials: must be a positive integer"):
        from_dict(sweep_drm.DrmSweep, {"run": {"max_concurrent_trials": 0}}, "")


def test_bad_sweep_file_exits_naming_the_field(tmp_path):
    command = typer.Typer()
    command.command()(sweep_drm.main)
    config = sweep_file("drm_smoke.yaml", tmp_path, embeddings=str(tmp_path / "missing"))
    result = CliRunner().invoke(command, ["--config", str(config)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: embeddings: {tmp_path / 'missing'} is not an embedding folder")
    broken = tmp_path / "broken.yaml"
    broken.write_text("heads: [1\n")
    result = CliRunner().invoke(command, ["--config", str(broken)])
    assert result.exit_code == 2 and result.stderr.startswith(f"error: --config: {broken} is not valid YAML")
    result = CliRunner().invoke(command, ["--config", str(TUNE / "drm_smoke.yaml"), "--override", "run.name=.."])
    assert result.exit_code == 2 and result.stderr.startswith("error: run.name: must be a folder name"), result.output
    vrm = typer.Typer()
    vrm.command()(sweep_vrm.main)
    empty = sweep_file("vrm_smoke.yaml", tmp_path, samples=0, points=None)
    result = CliRunner().invoke(vrm, ["--config", str(empty)])
    assert result.exit_code == 2 and "error: samples: is 0 and there are no points" in result.stderr, result.output


def test_first_components_are_the_decomposition_with_fewer_components():
    """One top-K fit serves every k ≤ K: slicing it equals fitting with k."""
    rng = np.random.default_rng(0)
    chosen = rng.normal(size=(300, 12)) * np.linspace(3, 0.5, 12)  # distinct variances: no degenerate directions
    rejected = rng.normal(size=(300, 12))
    full = PreferenceDecomposition(8).fit(chosen, rejected)
    for k in (1, 3, 8):
        sliced, fresh = sweep_drm.first_components(full, k), PreferenceDecomposition(k).fit(chosen, rejected)
        np.testing.assert_allclose(sliced.components_, fresh.components_, atol=1e-10)
        np.testing.assert_allclose(sliced.explained_variance_ratio_, fresh.explained_variance_ratio_, rtol=1e-10)
    assert full.components_.shape == (8, 12)  # slicing leaves the shared decomposition alone


# ----------------------------------------------------------------------------------------------- sweeps

@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> Path:
    """Tiny-bert features of synthetic pairs: 4 simulated users, who are the groups."""
    folder = tmp_path_factory.mktemp("emb")
    embed_pairs(SyntheticGenerator(0).dataset(40), load_backbone("tiny-bert", device="cpu"), folder, progress=False)
    return folder


def test_drm_sweep_resumes_and_its_accuracies_hold(tmp_path, ray_cluster, embeddings):
    """Ctrl+C as the first trial starts; `--resume` (Tuner.restore) finishes the same sweep. Then every reported
    accuracy is recomputed from the saved profiles and a decomposition fitted here with exactly k components."""
    config = sweep_file("drm_smoke.yaml", tmp_path, embeddings=str(embeddings))
    experiment, env = tmp_path / "runs" / "drm-smoke", driver_env(ray_cluster)
    interrupt_when(sweep_command("sweep_drm.py", config), env, tmp_path / "first.log",
                   lambda: list(experiment.glob("run_trial_*")))  # its actor is still starting: seconds of work left
    started = {p.name.split("_")[2] + "_" + p.name.split("_")[3] for p in experiment.glob("run_trial_*")}
    proc = sweep("sweep_drm.py", config, env, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((experiment / "results.json").read_text())
    assert sorted(r["config/heads"] for r in rows) == [2, 4] and (experiment / "results.csv").exists()
    assert started <= {r["trial_id"] for r in rows}  # the trials of the first run, restored

    data = EmbeddingSet(embeddings)
    chosen, rejected = data.load()
    pairs = data.pairs()
    train, test = split_by_prompt(pairs, 0.5, 0)
    test_groups = groups_of(pairs)[test]
    for row in rows:
        k = row["config/heads"]
        adapted = np.load(Path(row["checkpoint"]) / sweep_drm.ADAPTED)
        assert adapted["weights"].shape == (3, 4, 2 * k) and adapted["picks"].shape == (3, 4, 5)
        heads = build_head_set(PreferenceDecomposition(k).fit(chosen[train], rejected[train]), features=TINY_FEATURES)
        scores_c, scores_r = heads.scores(chosen[test]), heads.scores(rejected[test])  # (T, 2k)
        honest, reference = np.zeros((3, 4)), np.zeros((3, 4))  # (seeds, groups)
        for g, group in enumerate(adapted["groups"]):
            members = np.flatnonzero(test_groups == group)
            for s, w in enumerate(adapted["weights"][:, g]):
                hits = scores_c[members] @ w > scores_r[members] @ w
                reference[s, g] = hits.mean()
                honest[s, g] = hits[~np.isin(members, adapted["picks"][s, g])].mean()
            assert row[f"accuracy_by_group/{group}"] == pytest.approx(honest[:, g].mean())
        assert (row["accuracy"], row["accuracy_reference"]) == pytest.approx((honest.mean(), reference.mean()))
        assert list(experiment.glob(f"*{row['trial_id']}*/events.out.tfevents.*"))  # TensorBoard

    summary = json.loads((experiment / "best" / "summary.json").read_text())
    best = max(rows, key=lambda r: r["accuracy"])
    assert (summary["heads"], summary["method"]) == (best["config/heads"], "hyre")
    heads = HeadSet.load(experiment / "best" / "headset")
    assert heads.num_heads == 2 * summary["heads"] and heads.version.startswith(f"k{summary['heads']}-")
    assert "hyperprior_calibration" in heads.info  # shipped as `decompose` ships a head set: calibrated
    assert f"registered drm-smoke@{heads.version} (drm, {heads.num_heads} heads) - active" in \
        register(tmp_path, experiment / "best" / "headset")
    assert_pngs([experiment / "plots" / f"{name}.png"
                 for name in ("accuracy_vs_heads", "adapted_weights", "weight_similarity")])


def test_trials_hold_their_workers_custom_resources(ray_cluster):
    """With `ray.worker_resources`, the nodes that have them bound how many trials run at once, not the CPUs:
    before, a sweep started as many trials as the CPUs held, and the Train runs of the extra ones waited for
    busy nodes (Ray Train stops waiting for a worker group after RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s)."""
    from sweeps import max_concurrent_trials

    recipe = load_config(VrmConfig, ROOT / "configs" / "vrm_tiny.yaml", ["ray.worker_resources={trainer: 1}"])
    assert sweep_vrm.trial_resources(recipe) == {"CPU": 3, "GPU": 0, "trainer": 2}
    with pytest.raises(ConfigError, match=r"^ray.worker_resources: one trial needs .* the cluster has 0 trainer"):
        max_concurrent_trials(sweep_vrm.trial_resources(recipe), None)  # the session cluster has no "trainer"
    assert max_concurrent_trials(sweep_vrm.trial_resources(load_config(
        VrmConfig, ROOT / "configs" / "vrm_tiny.yaml", ["ray.num_workers=1"])), None) == 2  # 4 CPUs, 2 a trial


def test_vrm_sweep_end_to_end(tmp_path, ray_cluster):
    """Two trials (λ = 0 and a sampled λ), each a Ray Train run; the best one exported, registrable, plotted."""
    config = sweep_file("vrm_smoke.yaml", tmp_path)
    experiment = tmp_path / "runs" / "vrm-smoke"
    proc = sweep("sweep_vrm.py", config, driver_env(ray_cluster))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((experiment / "results.json").read_text())
    assert len(rows) == 2 and {r["config/model.lam"] == 0 for r in rows} == {True, False}
    assert all(0 <= r[sweep_vrm.METRIC] <= 1 and r["step"] >= 2 for r in rows)
    assert list((experiment / "train").glob("*/tensorboard/events.out.tfevents.*"))  # the workers' curves
    assert len(list(experiment.glob("run_trial_*/events.out.tfevents.*"))) == 2  # Tune's, per trial

    summary = json.loads((experiment / "best" / "summary.json").read_text())
    best = load_config(VrmConfig, experiment / "best" / "config.yaml")  # a recipe train_vrm.py runs as it is
    assert (best.model.lam, best.model.latent_dim) == (summary["params"]["model.lam"],
                                                       summary["params"]["model.latent_dim"])
    assert (best.data.supervision == "none") == (best.model.lam == 0)
    heads = HeadSet.load(experiment / "best" / "headset")
    assert heads.kind == "vrm" and heads.num_heads == best.model.num_objectives
    assert f"registered vrm-smoke@{heads.version} (vrm, 6 heads) - active" in \
        register(tmp_path, experiment / "best" / "headset")
    assert_pngs([experiment / "plots" / "accuracy_vs_lambda.png"])


def test_a_sweep_whose_trials_all_fail_writes_their_errors_and_exits_cleanly(tmp_path, ray_cluster, capsys):
    """Every trial failing before its first report leaves Tune a table without columns: the results files and
    the errors in sweep.json are still written, and the script ends with one line, not a KeyError."""
    import ray.tune
    import sweeps

    def broken(config: dict) -> None:  # a local function: shipped to the workers by value
        raise ValueError(f"trial {config['x']} cannot start")

    grid = ray.tune.Tuner(broken, param_space={"x": ray.tune.grid_search([1, 2])},
                          run_config=ray.tune.RunConfig(name="all-fail", storage_path=str(tmp_path))).fit()
    assert sweeps.write_results(grid, "drm", {"config": {}}) == []
    folder = tmp_path / "all-fail"
    errors = json.loads((folder / sweeps.SWEEP_JSON).read_text())["errors"]
    assert len(errors) == 2 and all("cannot start" in e for e in errors.values())
    assert json.loads((folder / sweeps.RESULTS_JSON).read_text()) == []
    sweep = from_dict(sweep_drm.DrmSweep, {"adaptation_pairs": [5], "select_pairs": 5}, "")
    with pytest.raises(typer.Exit) as stopped:
        sweeps.best_or_exit(lambda: sweep_drm.export_best([], None, sweep))
    assert stopped.value.exit_code == 1
    assert "no DRM-head trial at n=5 finished; see the errors in sweep.json" in capsys.readouterr().err


def test_selection_methods_are_a_sweep_dimension_with_their_own_plot(tmp_path, embeddings):
    """Trials that ask chosen or random pairs (no cluster: the trial function itself), and the accuracy-vs-n plot."""
    import report

    sweep = load_config(sweep_drm.DrmSweep, sweep_file("drm_smoke.yaml", tmp_path, embeddings=str(embeddings),
                                                      methods=["default", "select-information", "select-random"],
                                                      adaptation_pairs=[2, 4], heads=[2], seeds=2), [])
    data = sweep_drm.load_data(sweep)
    rows = []
    for method in ("select-information", "select-random"):
        for n in (2, 4):
            metrics, profiles = sweep_drm.adapt_and_score(data, 2, n, method, seeds=2)
            groups = len(profiles["groups"])
            assert profiles["weights"].shape == (2, groups, 4) and profiles["picks"].shape == (2, groups, n)
            assert 0 <= metrics["accuracy"] <= 1 and metrics["accuracy"] == metrics["accuracy_reference"]
            rows.append({"config/heads": 2, "config/pairs": n, "config/method": method, **metrics})
    rows.append({"config/heads": 2, "config/pairs": 2, "config/method": "default", "accuracy": 0.0,
                 "accuracy_std": 0.0, "accuracy_reference": 0.0, "trial_id": "t"})
    meta = {"metric": "accuracy", "config": {"seeds": 2}}
    assert_pngs([report.plot_accuracy_vs_pairs(rows, meta, "smoke", tmp_path / "accuracy_vs_pairs.png")])
    with pytest.raises(ConfigError, match="methods"):
        load_config(sweep_drm.DrmSweep, sweep_file("drm_smoke.yaml", tmp_path, methods=["select-random"]), [])


@pytest.mark.parametrize("script", ["sweep_drm", "sweep_vrm"])
def test_an_existing_sweep_folder_is_refused_before_data_is_read_or_ray_starts(tmp_path, monkeypatch, script):
    module = {"sweep_drm": sweep_drm, "sweep_vrm": sweep_vrm}[script]
    config = sweep_file("drm_smoke.yaml" if script == "sweep_drm" else "vrm_smoke.yaml", tmp_path)
    name = yaml.safe_load(config.read_text())["run"]["name"]
    (tmp_path / "runs" / name).mkdir(parents=True)

    def started(*args, **kwargs):
        raise AssertionError("Ray started (or data was read) before the folder was checked")
    monkeypatch.setattr(module, "connect_ray", started)
    if script == "sweep_drm":
        monkeypatch.setattr(module, "load_data", started)
    cli = typer.Typer()
    cli.command()(module.main)
    result = CliRunner().invoke(cli, ["--config", str(config)])
    assert result.exit_code == 2 and "holds a sweep already: pass --resume" in result.output, result.output


def test_accuracy_vs_heads_title_fits_a_one_panel_figure(tmp_path, monkeypatch):
    import report

    figures = []
    monkeypatch.setattr(report, "save", lambda fig, path, layout=True: figures.append(fig) or path)
    rows = [{"config/pairs": 5, "config/method": "hyre", "config/heads": k, "accuracy": 0.6, "accuracy_std": 0.01}
            for k in (2, 4)]
    meta = {"metric": "accuracy", "config": {"methods": ["hyre"], "seeds": 3}}
    report.plot_accuracy_vs_heads(rows, meta, "a-rather-long-sweep-name-drm-alpaca-gpt4", tmp_path / "a.png")
    fig = figures[0]
    renderer = fig.canvas.get_renderer()
    title, frame = fig._suptitle.get_window_extent(renderer), fig.bbox
    assert frame.x0 <= title.x0 and title.x1 <= frame.x1 and title.y1 <= frame.y1, (title, frame)


def test_a_driver_that_joins_a_cluster_passes_its_address_to_every_worker(ray_cluster):
    """What the recipes and sweeps run first (`rewardprism.recipes.connect_ray`): the workers of a job that joined
    RAY_ADDRESS see it too, so Ray Train's own helpers inside them find that cluster (not "multiple active Ray
    instances" on a host running several)."""
    code = ("import os, ray\nfrom rewardprism.recipes import connect_ray\n"
            "assert connect_ray({'RP_PROBE': 'yes'})\n"
            "@ray.remote(num_cpus=0)\ndef env():\n"
            "    return os.environ.get('RAY_ADDRESS'), os.environ.get('RP_PROBE')\n"
            "print(ray.get(env.remote()))\n")
    env = driver_env(ray_cluster)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str((env["RAY_ADDRESS"], "yes"))
