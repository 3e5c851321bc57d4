"""`make demo`: the main job end to end on the embedded default — local Ray, SQLite, MiniLM.

1. simulated users label pairs (the built-in synthetic generator, known ground truth);
2. Ray Data embeds the population's pairs with MiniLM; DRM decomposes them into a head set with a
   population head (the default profile);
3. the head set is registered in a SQLite store, and the Ray Serve scoring service starts on it;
4. each simulated user sends 15 labelled pairs over HTTP (`POST /v1/users/{id}/feedback`) and gets a profile;
5. one prompt with differently styled answers is scored for every user (`POST /v1/score`), and each user's
   held-out pairs are compared (`POST /v1/compare`) with their profile and with the population's.

    python -m rewardprism.demo [--workdir runs/demo] [--backbone minilm] [--port 8000] [--held-out 300]
"""
from __future__ import annotations

import argparse
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from rewardprism.data import PreferencePair
from rewardprism.synthetic import DEFAULT_USERS, SyntheticGenerator

N_POPULATION = 200  # pairs per simulated user for the decomposition
N_FEEDBACK = 15  # labels a user gives
N_HELD_OUT = 300  # pairs per user scored afterwards: sampling noise ±3 points (40 left ±8)
K = 16
SHARPNESS = 10.0  # users label consistently (about 95 % agree with their own utility), so gains show


def free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def build_head_set(workdir: Path, backbone: str, generator: SyntheticGenerator) -> Path:
    """Embed the population's pairs on Ray, decompose, add the population head, save."""
    from rewardprism.backbone import load_backbone
    from rewardprism.drm import PreferenceDecomposition, build_head_set, fit_population_head
    from rewardprism.embed import EmbeddingSet
    from rewardprism.embed_ray import embed_pairs_ray
    from rewardprism.evaluate import calibrate_hyperprior

    pairs = generator.dataset(N_POPULATION)
    dim = load_backbone(backbone, device="cpu").dim
    report = embed_pairs_ray(pairs, backbone, workdir / "embeddings", dim=dim, num_actors=2, shard_size=200,
                             dataset="synthetic", progress=False)
    print(f"[2] embedded {report.n_pairs} pairs ({report.shards_written} shards on Ray, "
          f"{report.shards_reused} reused) with {backbone}")
    embeddings = EmbeddingSet(workdir / "embeddings")
    decomposition = PreferenceDecomposition(n_components=K).fit_shards(embeddings.shards())
    chosen, rejected = embeddings.load()
    heads = build_head_set(decomposition, fit_population_head(chosen, rejected), backbone=backbone,
                           dataset="synthetic", name="demo", version="1")
    calibrate_hyperprior(heads, chosen, rejected, embeddings.pairs())
    path = heads.save(workdir / "heads")
    top = ", ".join(f"{r:.2f}" for r in decomposition.explained_variance_ratio_[:4])
    print(f"    head set: {heads.num_heads} heads ({K} PCs ±, + population), explained variance {top}, ...; "
          f"adaptation's hyperprior centre {heads.hyperprior_center} (cross-fitted)")
    return path


def start_store(workdir: Path, heads_path: Path) -> tuple[str, str]:
    """Migrate a SQLite database, register and activate the head set, create an admin key."""
    from rewardprism.heads import HeadSet
    from rewardprism.store import StoreSettings, create_api_key, make_engine, make_sessions, register_head_set
    from rewardprism.store.migrate import upgrade

    url = f"sqlite:///{(workdir / 'rewardprism.db').resolve()}"
    upgrade(url)
    heads = HeadSet.load(heads_path)
    engine = make_engine(StoreSettings.from_env(url))
    with make_sessions(engine).begin() as session:
        register_head_set(session, heads, uri=str(heads_path.resolve()), activate=True)
        _, token = create_api_key(session, ["admin"], name="demo")
    engine.dispose()
    print(f"[3] store: {url} (head set demo/1 active, admin key created)")
    return url, token


def start_service(url: str, backbone: str, port: int) -> None:
    from serve_apps.local import app_config, run_config

    env = {"DATABASE_URL": url, "RP_BACKBONE": backbone, "RP_HEAD_SET": "demo"}
    run_config(port, app_config("rewardprism", "/", env, num_cpus={"Embedder": 1, "Ingress": 0.2}))
    print(f"    scoring service up at http://127.0.0.1:{port} (OpenAPI: /docs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--held-out", type=int, default=N_HELD_OUT, help="pairs per user scored at the end")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")  # a busy 2-core machine starts Ray slowly
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "rewardprism.db").unlink(missing_ok=True)  # a fresh store each run; embeddings are reused

    import ray
    from ray import serve

    ray.init(address="local", include_dashboard=False, log_to_driver=False)  # its own cluster, always
    generator = SyntheticGenerator(seed=0, sharpness=SHARPNESS)
    print(f"[1] {len(DEFAULT_USERS)} simulated users: " + ", ".join(u.name for u in DEFAULT_USERS))
    heads_path = build_head_set(args.workdir, args.backbone, generator)
    url, token = start_store(args.workdir, heads_path)
    port = free_port(args.port)
    start_service(url, args.backbone, port)
    try:
        run_users(f"http://127.0.0.1:{port}", token, generator, args.held_out)
    finally:
        serve.shutdown()
        ray.shutdown()


def run_users(base: str, token: str, generator: SyntheticGenerator, held_out_pairs: int = N_HELD_OUT) -> None:
    client = httpx.Client(base_url=base, headers={"X-API-Key": token}, timeout=120)
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

    print(f"    held-out accuracy on {held_out_pairs} new pairs per user: personalized vs population profile")
    def chosen_wins(pair: PreferencePair, user_id: str | None) -> bool:
        reply = client.post("/v1/compare", json={"user_id": user_id, "prompt": pair.prompt, "a": pair.chosen,
                                                 "b": pair.rejected})
        reply.raise_for_status()
        return reply.json()["probability_a"] > 0.5

    with ThreadPoolExecutor(16) as pool:  # requests in flight together: the service batches them
        for user in DEFAULT_USERS:
            held_out = generator.pairs(user, held_out_pairs, offset=2)
            personal = sum(pool.map(chosen_wins, held_out, [user.name] * len(held_out)))
            population = sum(pool.map(chosen_wins, held_out, [None] * len(held_out)))
            print(f"    {user.name:9s} personalized {personal / held_out_pairs:.2f}   "
                  f"population {population / held_out_pairs:.2f}")
    print(f"    (one draw of {N_FEEDBACK} labels per user: another draw moves a user's row by a few points either way)")


if __name__ == "__main__":
    main()
