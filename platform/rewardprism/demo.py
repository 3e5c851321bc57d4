"""`make demo`: the main job end to end on the embedded default — local Ray, SQLite, MiniLM.

1. simulated users label pairs (the built-in synthetic generator, known ground truth);
2. Ray Data embeds the population's pairs with MiniLM; DRM decomposes them into a head set with a
   population head (the default profile);
3. the head set is registered in a SQLite store, and the Ray Serve scoring service starts on it;
4. each simulated user sends 15 labelled pairs over HTTP (`POST /v1/users/{id}/feedback`) and gets a profile;
5. one prompt with differently styled answers is scored for every user (`POST /v1/score`), and each user's
   held-out pairs are compared (`POST /v1/compare`) with their profile and with the population's;
6. the users who differ from the majority start again as new users, asked 5 pairs each by the service
   (`POST /v1/users/{id}/queries`, from the population's pairs registered as a pool) instead of sending 15
   random ones; their held-out accuracy is printed beside the 15-random profile's;
7. a second head set (fewer components) is registered, every user is migrated onto it from their feedback
   (`POST /admin/head-sets/demo/2/migrate`, a Ray actor), it is activated, and the held-out comparison is run
   again: the users' personalized rankings survive the new model.

    python -m rewardprism.demo [--config configs/demo.yaml] [--override held_out=40 --override port=8001 ...]

An entry point, not library: it starts a store and the Serve app of serve_apps (`serve_apps.local`).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import httpx
import numpy as np
import typer

from rewardprism.cli_common import fail, overrides
from rewardprism.config import ConfigError, load_config
from rewardprism.data import PreferencePair
from rewardprism.synthetic import DEFAULT_USERS, SyntheticGenerator, rating_matrix

N_POPULATION = 200  # pairs per simulated user for the decomposition
N_FEEDBACK = 15  # labels a user gives
N_ASKED = 5  # labels a user asked by the service gives (step 6)
N_HELD_OUT = 300  # pairs per user scored afterwards: sampling noise ±3 points (40 left ±8)
K = 16
SHARPNESS = 10.0  # users label consistently (about 95 % agree with their own utility), so gains show
Overrides = overrides("held_out=40")


@dataclass
class DemoConfig:
    workdir: str = "runs/demo"  # embeddings (reused by the next run), head set, SQLite store
    backbone: str = "minilm"
    port: int = 8000  # the scoring service's port; a free one if it is taken
    held_out: int = N_HELD_OUT  # pairs per user scored at the end

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError("port", f"must be a TCP port (1 to 65535), got {self.port}")
        if self.held_out < 1:
            raise ConfigError("held_out", f"must be a positive number of pairs, got {self.held_out}")


def quiet_ray() -> None:
    """The demo reads as a story: Ray Data's execution INFO lines and per-operator progress blocks, and the
    driver's Ray INFO logs, are off; the embedding shows its own bar (pairs, tokens/s, ETA)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = ctx.enable_auto_log_stats = False
    for name in ("ray", "ray.data", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)


def free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def fit_demo_head_set(workdir: Path, backbone: str, generator: SyntheticGenerator) -> Path:
    """Embed the population's pairs on Ray, decompose, add the population head, calibrate, save."""
    from rewardprism.backbone import load_backbone
    from rewardprism.embed_ray import embed_pairs_ray
    from rewardprism.features import FeatureSpec

    pairs = generator.dataset(N_POPULATION)
    probe = load_backbone(backbone, device="cpu")
    report = embed_pairs_ray(pairs, FeatureSpec.of(probe), workdir / "embeddings", dim=probe.dim, num_actors=2,
                             shard_size=200, dataset="synthetic", total=len(pairs))
    print(f"[2] embedded {report.n_pairs} pairs ({report.shards_written} shards on Ray, "
          f"{report.shards_reused} reused) with {backbone}")
    return fit_from_embeddings(workdir, backbone, K, "1")


def fit_from_embeddings(workdir: Path, backbone: str, components: int, version: str) -> Path:
    """Decompose the embedded pairs into `components` PCs ±, add the population head, calibrate, save."""
    from rewardprism.calibrate import fit_head_set
    from rewardprism.drm import PreferenceDecomposition
    from rewardprism.embed import EmbeddingSet

    embeddings = EmbeddingSet(workdir / "embeddings")
    decomposition = PreferenceDecomposition(n_components=components).fit_shards(embeddings.shards())
    chosen, rejected = embeddings.load()
    head_set = fit_head_set(decomposition, chosen, rejected, embeddings.pairs(), features=embeddings.features,
                            dataset="synthetic", name="demo", version=version)
    path = head_set.save(workdir / f"heads-{version}")
    top = ", ".join(f"{r:.2f}" for r in decomposition.explained_variance_ratio_[:4])
    print(f"    head set demo/{version}: {head_set.num_heads} heads ({components} PCs ±, + population), explained "
          f"variance {top}, ...; adaptation's hyperprior centre {head_set.hyperprior_center} (cross-fitted)")
    return path


def start_store(workdir: Path, heads_path: Path) -> tuple[str, str, list[PreferencePair]]:
    """Migrate a SQLite database, register and activate the head set with the population's pairs as a pool of
    pairs to ask users about, create an admin key. Returns the URL, the key and the pool's pairs by position."""
    from rewardprism.embed import EmbeddingSet
    from rewardprism.heads import HeadSet
    from rewardprism.select import unlabelled_pool
    from rewardprism.store import (
        StoreSettings,
        create_api_key,
        make_engine,
        make_sessions,
        register_head_set,
        register_query_pool,
    )
    from rewardprism.store.migrate import upgrade

    url = f"sqlite:///{(workdir / 'rewardprism.db').resolve()}"
    upgrade(url)
    heads = HeadSet.load(heads_path)
    embeddings = EmbeddingSet(workdir / "embeddings")
    pairs = embeddings.pairs()
    texts, gaps = unlabelled_pool(heads, *embeddings.load(), pairs)
    engine = make_engine(StoreSettings.from_env(url))
    with make_sessions(engine).begin() as session:
        row = register_head_set(session, heads, uri=str(heads_path.resolve()), activate=True)
        register_query_pool(session, row, "demo", texts, gaps)
        _, token = create_api_key(session, ["admin"], name="demo")
    engine.dispose()
    print(f"[3] store: {url} (head set demo/1 active, its {len(texts)} pairs a pool to ask from, admin key created)")
    return url, token, pairs


def start_service(url: str, backbone: str, port: int) -> None:
    from serve_apps.local import app_config, run_config

    env = {"DATABASE_URL": url, "RP_BACKBONE": backbone, "RP_HEAD_SET": "demo"}
    with contextlib.redirect_stdout(io.StringIO()):  # `serve run`'s own INFO lines; a failure still raises
        run_config(port, app_config("rewardprism", "/", env, num_cpus={"Embedder": 1, "Ingress": 0.2}))
    print(f"    scoring service up at http://127.0.0.1:{port} (OpenAPI: /docs)")


def main(
    config: Annotated[Path | None, typer.Option(help="demo config YAML, e.g. configs/demo.yaml "
                                                     "(default: DemoConfig's defaults)")] = None,
    override: Overrides = None,
) -> None:
    """The main job end to end on the embedded default: local Ray, SQLite, MiniLM (see the module's docstring)."""
    try:
        demo = load_config(DemoConfig, config, override or [])
    except ConfigError as exc:
        fail(str(exc))
    workdir = Path(demo.workdir)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")  # a busy 2-core machine starts Ray slowly
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "rewardprism.db").unlink(missing_ok=True)  # a fresh store each run; embeddings are reused

    import ray
    from ray import serve

    # its own cluster, always; its start-up INFO lines off (quiet_ray: the rest of Ray's chatter)
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    quiet_ray()
    generator = SyntheticGenerator(seed=0, sharpness=SHARPNESS)
    print(f"[1] {len(DEFAULT_USERS)} simulated users: " + ", ".join(u.name for u in DEFAULT_USERS))
    heads_path = fit_demo_head_set(workdir, demo.backbone, generator)
    url, token, pool = start_store(workdir, heads_path)
    port = free_port(demo.port)
    start_service(url, demo.backbone, port)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": token}, timeout=120)
        run_users(client, generator, demo.held_out)
        before = held_out_accuracy(client, generator, demo.held_out)
        ask_instead(client, generator, pool, demo.held_out, before)
        roll_out(client, fit_from_embeddings(workdir, demo.backbone, K // 2, "2"), generator, demo.held_out, before)
    finally:
        serve.shutdown()
        ray.shutdown()


def run_users(client: httpx.Client, generator: SyntheticGenerator, held_out_pairs: int = N_HELD_OUT) -> None:
    print(f"[4] each user sends {N_FEEDBACK} labelled pairs")
    for user in DEFAULT_USERS:
        pairs = generator.pairs(user, N_FEEDBACK, offset=1)
        start = time.perf_counter()
        reply = client.post(f"/v1/users/{user.name}/feedback", json={"pairs": [
            {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]})
        reply.raise_for_status()
        body = reply.json()
        profile = body["profile"]
        print(f"    {user.name:9s} profile v{profile['version']} ({profile['method']}, {profile['n_pairs']} pairs) "
              f"in {time.perf_counter() - start:.2f}s")

    prompt = "Any tips for learning to play guitar?"
    rng = np.random.default_rng(5)
    styles = {"thorough list": [1.0, 1.0, 1.0, 0.0, 0.0, 0.0], "one-liner joke": [0.0, 0.0, 0.0, 0.0, 1.0, 0.0],
              "hedged, formal": [0.5, 1.0, 0.0, 1.0, 0.0, 0.0], "refusal": [0.0, 0.5, 0.0, 0.0, 0.0, 1.0]}
    responses = [generator.response("learning to play guitar", np.array(r), rng) for r in styles.values()]
    print(f"[5] scores for {prompt!r}:")
    print("    " + f"{'user':12s}" + "".join(f"{s:>16s}" for s in styles))
    for user in [None, *DEFAULT_USERS]:
        reply = client.post("/v1/score", json={"user_id": user.name if user else None, "prompt": prompt,
                                               "responses": responses})
        reply.raise_for_status()
        scores = [item["score"] for item in reply.json()["scores"]]
        print("    " + f"{user.name if user else '(population)':12s}" + "".join(f"{s:16.2f}" for s in scores))


def held_out_accuracy(client: httpx.Client, generator: SyntheticGenerator,
                      held_out_pairs: int) -> dict[str, float]:
    """Each user's share of held-out pairs ranked their way by their profile (printed beside the population's)."""
    print(f"    held-out accuracy on {held_out_pairs} new pairs per user: personalized vs population profile")
    accuracy = {}
    for user in DEFAULT_USERS:
        held_out = generator.pairs(user, held_out_pairs, offset=2)
        accuracy[user.name] = ranked_their_way(client, held_out, user.name)
        print(f"    {user.name:9s} personalized {accuracy[user.name]:.2f}   "
              f"population {ranked_their_way(client, held_out, None):.2f}")
    print(f"    (one draw of {N_FEEDBACK} labels per user: another draw moves a user's row by a few points either way)")
    return accuracy


def ranked_their_way(client: httpx.Client, pairs: list[PreferencePair], user_id: str | None) -> float:
    """Share of `pairs` whose chosen response the profile of `user_id` (None: the population's) prefers."""
    def chosen_wins(pair: PreferencePair) -> bool:
        reply = client.post("/v1/compare", json={"user_id": user_id, "prompt": pair.prompt, "a": pair.chosen,
                                                 "b": pair.rejected})
        reply.raise_for_status()
        return reply.json()["probability_a"] > 0.5

    with ThreadPoolExecutor(16) as pool:  # requests in flight together: the service batches them
        return sum(pool.map(chosen_wins, pairs)) / len(pairs)


def ask_instead(client: httpx.Client, generator: SyntheticGenerator, pool: list[PreferencePair],
                held_out_pairs: int, sampled: dict[str, float]) -> None:
    """The users who differ from the majority, again as new users: the service asks them N_ASKED pairs one at a
    time (each the pair whose answer teaches their profile most, given the answers so far), they answer by their
    own taste, and their held-out accuracy is printed beside the one from N_FEEDBACK random labels."""
    print(f"[6] the users who differ from the majority, as new users asked {N_ASKED} pairs by the service "
          f"(POST /v1/users/{{id}}/queries) instead of sending {N_FEEDBACK} random ones")
    for user in DEFAULT_USERS[1:]:
        asked = f"{user.name}-asked"
        for _ in range(N_ASKED):
            reply = client.post(f"/v1/users/{asked}/queries", json={"pool": "demo", "k": 1})
            reply.raise_for_status()
            query = reply.json()["queries"][0]
            pair = pool[int(query["query_id"].rsplit(":", 1)[1])]
            utility = {side: user.utility(rating_matrix([pair], side))[0] for side in ("chosen", "rejected")}
            better, worse = ((pair.chosen, pair.rejected) if utility["chosen"] >= utility["rejected"]
                             else (pair.rejected, pair.chosen))
            client.post(f"/v1/users/{asked}/feedback", json={"pairs": [
                {"prompt": pair.prompt, "chosen": better, "rejected": worse, "query_id": query["query_id"]}]}
            ).raise_for_status()
        held_out = generator.pairs(user, held_out_pairs, offset=2)
        print(f"    {user.name:9s} {N_ASKED} asked pairs {ranked_their_way(client, held_out, asked):.2f}   "
              f"{N_FEEDBACK} random pairs {sampled[user.name]:.2f}")


def roll_out(client: httpx.Client, heads_path: Path, generator: SyntheticGenerator, held_out_pairs: int,
             before: dict[str, float]) -> None:
    """Register demo/2, migrate every user onto it (a Ray actor), activate it, and compare their rankings."""
    print("[7] a new head set: register demo/2, migrate every user's profile onto it, activate it")
    client.post("/admin/head-sets", json={"uri": str(heads_path.resolve())}).raise_for_status()
    client.post("/admin/head-sets/demo/2/migrate").raise_for_status()
    while (status := client.get("/admin/head-sets/demo/2/migrate").json())["state"] in ("starting", "running"):
        time.sleep(0.5)
    if status["state"] != "done":
        raise RuntimeError(f"the migration onto demo/2 failed: {status['error']}")
    print(f"    migrated {status['users_done']} users ({status['pairs']} pairs) from their stored feedback")
    client.post("/admin/head-sets/demo/2/activate").raise_for_status()
    while client.post("/v1/score", json={"prompt": "hi", "responses": ["a"]}).json()["head_set"] != "demo@2":
        time.sleep(0.5)  # every replica polls the registry
    after = held_out_accuracy(client, generator, held_out_pairs)
    print("    personalized rankings on demo@2 vs demo@1, with no new feedback: " + ", ".join(
        f"{user} {after[user]:.2f} vs {before[user]:.2f}" for user in before))


if __name__ == "__main__":
    typer.run(main)
