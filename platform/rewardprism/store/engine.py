"""Engines and session factories, with the per-backend settings the store relies on, and the one helper that commits."""
from __future__ import annotations

import logging
import random
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from rewardprism.store.config import StoreSettings, safe_url
from rewardprism.store.errors import ProfileConflict

log = logging.getLogger(__name__)
READ_ONLY = "rewardprism_read_only"  # an execution option: sessions that only read
T = TypeVar("T")


def make_engine(settings: StoreSettings) -> sa.Engine:
    """A pooled engine; on Postgres with statement and lock timeouts on every connection, on SQLite with
    foreign keys (for ON DELETE CASCADE) and write-locking transactions."""
    url = sa.make_url(settings.database_url)
    log.info("store database: %s", safe_url(url))
    if url.get_backend_name() != "sqlite":
        return sa.create_engine(
            url,
            pool_size=settings.pool_size,
            max_overflow=settings.max_overflow,
            pool_timeout=settings.pool_timeout_s,
            pool_pre_ping=True,  # a restarted server leaves dead pooled connections behind
            connect_args={"options": f"-c statement_timeout={round(settings.statement_timeout_s * 1000)} "
                                     f"-c lock_timeout={round(settings.lock_timeout_s * 1000)}"},
        )
    engine = sa.create_engine(url, connect_args={"timeout": settings.pool_timeout_s})
    sa.event.listen(engine, "connect", _sqlite_connect)
    sa.event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    # Let SQLAlchemy emit BEGIN itself (pysqlite's own deferred BEGIN breaks SAVEPOINT); see _sqlite_begin.
    dbapi_connection.isolation_level = None
    dbapi_connection.execute("PRAGMA foreign_keys = ON")


def _sqlite_begin(connection: sa.Connection) -> None:
    # IMMEDIATE takes the write lock up front: SQLite serializes writers, and a deferred transaction that
    # upgrades to writing fails at once with "database is locked" instead of waiting for the busy timeout.
    # Read sessions never write, so they begin deferred: they neither queue behind a writer nor each other.
    read_only = connection.get_execution_options().get(READ_ONLY, False)
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def make_sessions(engine: sa.Engine, *, read_only: bool = False) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit, so a service can return what it just wrote.

    `read_only` sessions are for reading (a service's lookups): on SQLite they do not take the write lock, so a
    read runs while another process holds a write transaction open. Writing through one is not supported.
    """
    return sessionmaker(engine.execution_options(**{READ_ONLY: True}) if read_only else engine,
                        expire_on_commit=False)


def commit_with_retry(
    sessions: sessionmaker[Session], work: Callable[[Session], T], *, attempts: int = 10
) -> T:
    """Run `work` in a transaction of its own and commit it; on ProfileConflict roll back and run it again.

    Only conflicts are retried: after a lost connection the commit may or may not have happened.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            with sessions.begin() as session:
                return work(session)
        except ProfileConflict:
            if attempt >= attempts:
                raise
            time.sleep(random.uniform(0, 0.002 * attempt))  # jitter: the losers should not collide again
