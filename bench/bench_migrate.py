"""Profile migration onto a new head set (issue 15's Measure section), side by side, at reduced sizes.

    python bench/bench_migrate.py [--users 200] [--pairs 20] [--backbone minilm] [--database-url URL]

A fresh database (Postgres at $RP_TEST_POSTGRES_URL's server if reachable, else SQLite) holds `--users` users ×
`--pairs` synthetic feedback pairs; two random head sets over the backbone are registered. Then, in this order:
- raw embed: `EmbeddingExtractor.embed_texts` on the same texts (the work a migration cannot avoid), pairs/s;
- `rewardprism models migrate` of a quarter of the users and of all of them, each in its own process: pairs/s
  and the process's peak RSS (flat in the number of users: batches, not users, are held);
- the DB write phase alone (`_write_batch` of the same batches with precomputed profiles): profiles/s;
- `kill -9` of a migration half way, then a rerun: total time, users lost (no profile) and written twice.
"""
from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "bench"))

from report import write_section  # noqa: E402
from rewardprism import store  # noqa: E402
from rewardprism.backbone import load_backbone  # noqa: E402
from rewardprism.data import render  # noqa: E402
from rewardprism.embed import EmbeddingExtractor  # noqa: E402
from rewardprism.features import FeatureSpec  # noqa: E402
from rewardprism.heads import HeadSet  # noqa: E402
from rewardprism.migrate_profiles import adapt_on_head_set, scores_per_user  # noqa: E402
from rewardprism.store import migrate  # noqa: E402
from rewardprism.store.models import Feedback, HeadSetRow, ProfileRow, User  # noqa: E402
from rewardprism.store.rollout import _batches, _write_batch  # noqa: E402

WORDS = "the a model answer helpful careful short long kind rude precise vague clear detailed friendly".split()


def database(url: str | None) -> tuple[str, str | None]:
    """A fresh database URL, and the Postgres database name to drop at the end (None: SQLite)."""
    base = url or os.environ.get("RP_TEST_POSTGRES_URL")
    if base:
        try:
            admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
            name = f"rp_bench_migrate_{uuid.uuid4().hex[:8]}"
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
            admin.dispose()
            return sa.make_url(base).set(database=name).render_as_string(hide_password=False), name
        except sa.exc.OperationalError:
            pass
    return f"sqlite:///{tempfile.mkdtemp()}/bench.db", None


def seed(url: str, users: int, pairs: int, folders: list[Path]) -> None:
    rng = np.random.default_rng(0)
    migrate.upgrade(url)
    engine = store.make_engine(store.StoreSettings.from_env(url))
    with store.make_sessions(engine).begin() as s:
        for i, folder in enumerate(folders):
            store.register_head_set(s, HeadSet.load(folder), uri=str(folder), activate=i == 0)
        s.execute(sa.insert(User), [{"external_id": f"user{u}", "meta": {}} for u in range(users)])
        ids = s.scalars(sa.select(User.id).order_by(User.id)).all()
        s.execute(sa.insert(Feedback), [
            {"user_id": user_id, "prompt": " ".join(rng.choice(WORDS, 8)), "chosen": " ".join(rng.choice(WORDS, 12)),
             "rejected": " ".join(rng.choice(WORDS, 6)), "source": "bench"}
            for user_id in ids for _ in range(pairs)])
    engine.dispose()


def migrate_process(url: str, limit_users: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": f"{ROOT / 'platform'}:{ROOT}",
           "OMP_NUM_THREADS": "2"}
    args = [sys.executable, "-m", "rewardprism.cli", "models", "migrate", "default", "2", "--no-progress",
            "--batch-users", "32"]
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def counts(url: str) -> tuple[int, int]:
    """(users with a profile over v2, profiles over v2 whose version is not 1: written twice)."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        v2 = conn.scalar(sa.select(HeadSetRow.id).where(HeadSetRow.version == "2"))
        done = conn.scalar(sa.select(sa.func.count()).where(ProfileRow.head_set_id == v2))
        twice = conn.scalar(sa.select(sa.func.count()).where(ProfileRow.head_set_id == v2, ProfileRow.version > 1))
    engine.dispose()
    return done, twice


def clear_v2(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        v2 = conn.scalar(sa.select(HeadSetRow.id).where(HeadSetRow.version == "2"))
        conn.execute(sa.delete(ProfileRow).where(ProfileRow.head_set_id == v2))
    engine.dispose()


def timed_run(url: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of the largest migration process so far (runs go smallest first)."""
    started = time.perf_counter()
    process = migrate_process(url)
    _, err = process.communicate()
    if process.returncode:
        raise SystemExit(err.decode())
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far
    return time.perf_counter() - started, peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--database-url")
    opts = parser.parse_args()
    load_start = os.getloadavg()[0]
    backbone = load_backbone(opts.backbone, device="cpu", max_length=128)
    tmp = Path(tempfile.mkdtemp())
    folders = []
    for version, seed_ in (("1", 0), ("2", 1)):
        rng = np.random.default_rng(seed_)
        heads = HeadSet(rng.normal(size=(16, backbone.dim)) / np.sqrt(backbone.dim), np.zeros(16),
                        [f"h{i}" for i in range(16)], "drm", opts.backbone, np.full(16, 1 / 16), version=version,
                        features=FeatureSpec.of(backbone))
        folders.append(heads.save(tmp / f"v{version}"))
    rows = {}
    quarter = max(opts.users // 4, 1)
    for users in (quarter, opts.users):
        url, dropped = database(opts.database_url)
        try:
            seed(url, users, opts.pairs, folders)
            seconds, peak = timed_run(url)
            rows[users] = (seconds, peak, url, dropped)
        except BaseException:
            if dropped:
                drop(dropped)
            raise
        if users != opts.users and dropped:
            drop(dropped)
    seconds, peak, url, dropped = rows[opts.users]
    n_pairs = opts.users * opts.pairs
    try:
        # raw embed of the same texts
        engine = store.make_engine(store.StoreSettings.from_env(url))
        sessions = store.make_sessions(engine)
        with sessions() as s:
            texts = [render(f.prompt, t, backbone.tokenizer) for f in s.scalars(sa.select(Feedback))
                     for t in (f.chosen, f.rejected)]
        extractor = EmbeddingExtractor(backbone)
        started = time.perf_counter()
        extractor.embed_texts(texts)
        embed_s = time.perf_counter() - started
        # the write phase alone
        clear_v2(url)
        heads = HeadSet.load(folders[1])
        with sessions() as s:
            row_id = s.scalar(sa.select(HeadSetRow.id).where(HeadSetRow.version == "2"))
        all_batches = list(_batches(sessions, row_id, 32))
        weights0, bias0 = adapt_on_head_set(heads, scores_per_user(heads, extractor, list(all_batches[0].values())))
        started = time.perf_counter()
        for user_pairs in all_batches:
            k = len(user_pairs)
            with sessions.begin() as s:
                _write_batch(s, s.get(HeadSetRow, row_id), user_pairs, np.resize(weights0, (k, 16)),
                             np.resize(bias0, k), "shrink")
        write_s = time.perf_counter() - started
        engine.dispose()
        # kill -9 half way, then rerun
        clear_v2(url)
        started = time.perf_counter()
        process = migrate_process(url)
        while counts(url)[0] < opts.users // 2 and process.poll() is None:
            time.sleep(0.2)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        at_kill = counts(url)[0]
        rerun = migrate_process(url)
        rerun.communicate()
        total_kill_s = time.perf_counter() - started
        done, twice = counts(url)
    finally:
        if dropped:
            drop(dropped)
    quarter_peak = rows[quarter][1]
    body = f"""{opts.users} users × {opts.pairs} synthetic pairs ({n_pairs} pairs, {2 * n_pairs} texts), \
{opts.backbone} (max 128 tokens), 16 heads, database `{url.split(':')[0]}`, migrations in their own process \
(2 threads), batches of 32 users. Reduced from the issue's 100,000 users to fit a shared 2-core machine. \
Load average (1 min) {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores.

| measure | value |
|---|---|
| raw embed of the same texts (`EmbeddingExtractor.embed_texts`, this process) | {n_pairs / embed_s:.0f} pairs/s |
| migration, {opts.users} users (`rewardprism models migrate`, process start included) | \
{n_pairs / seconds:.0f} pairs/s = {n_pairs / seconds / (n_pairs / embed_s):.2f} × raw embed (target ≥ 0.8) |
| DB write phase alone ({len(all_batches)} transactions) | {opts.users / write_s:.0f} profiles/s |
| peak RSS of the migration process, {quarter} vs {opts.users} users | {quarter_peak:.0f} vs {peak:.0f} MiB |
| kill -9 at {at_kill} of {opts.users} users, then a rerun | {total_kill_s:.1f} s in all; \
{opts.users - done} users lost, {twice} written twice |
"""
    print(body)
    write_section("migrate", "python bench/bench_migrate.py " + " ".join(sys.argv[1:]), body)


def drop(name: str) -> None:
    admin = sa.create_engine(os.environ["RP_TEST_POSTGRES_URL"], isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


if __name__ == "__main__":
    main()
