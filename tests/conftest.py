"""Shared fixtures: one Ray cluster and one Postgres database per test session (both are slow to start)."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = Path(os.environ.get("RP_SHARED_DATA", SHARED / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by every test that needs one."""
    import ray

    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")  # a busy 2-core CI machine starts Ray slowly
    if not ray.is_initialized():  # "local": a cluster of its own, even beside a `ray start` one or RAY_ADDRESS
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A fresh Postgres database for this session, dropped at the end (trust auth on 127.0.0.1 here)."""
    import sqlalchemy as sa

    admin_url = os.environ.get("RP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    name = f"rp_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:  # fail loudly at the fixture, not deep inside a test
        pytest.fail(f"Postgres not reachable at {admin_url} (.ci/run starts it): {exc.orig}")
    url = sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
