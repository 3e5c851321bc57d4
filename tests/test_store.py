"""The store against real databases: SQLite files, and the Postgres server of `postgres_url` (.ci/run).

Each test gets a migrated, empty database. Concurrency, bad input, export/import and interrupted transactions
are checked through the repository exactly as services call it.
"""
from __future__ import annotations

import math
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from rewardprism.heads import HeadSet
from rewardprism.store import (
    Adapter,
    AlreadyExists,
    ApiKey,
    AuditEntry,
    Feedback,
    FeedbackPair,
    HeadSetRow,
    InvalidApiKey,
    InvalidInput,
    Limits,
    MissingScope,
    NotFound,
    ProfileConflict,
    ProfileRow,
    ProfileUpdate,
    StoreSettings,
    UserDisabled,
    activate_head_set,
    answered_positions,
    append_feedback_and_update_profile,
    commit_with_retry,
    create_api_key,
    create_user,
    delete_user,
    export_user,
    get_head_set,
    get_or_create_user,
    get_profile,
    get_query_pool,
    get_user,
    import_user,
    list_feedback,
    list_head_sets,
    list_users,
    make_engine,
    make_sessions,
    migrate,
    pool_pairs,
    record_audit,
    register_head_set,
    register_query_pool,
    revoke_api_key,
    safe_url,
    save_profile,
    set_user_disabled,
    verify_api_key,
)
from rewardprism.store.models import Base, User
from sqlalchemy.orm import Session, sessionmaker

HEADS = ["pc0+", "pc1+", "pc2+", "pc0-", "pc1-", "pc2-"]
TABLES = [t.name for t in Base.metadata.sorted_tables if t.name != "auth_epoch"]  # its one row is schema, not data


@dataclass
class Store:
    url: str
    engine: sa.Engine
    sessions: sessionmaker[Session]

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TABLES}


POSTGRES_ONLY = pytest.mark.parametrize("store", [pytest.param("postgres", marks=pytest.mark.postgres)],
                                        indirect=True)


@pytest.fixture(scope="module")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Migrated once; each test gets a copy."""
    path = tmp_path_factory.mktemp("template") / "store.db"
    migrate.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="module")
def migrated_postgres(postgres_url: str) -> str:
    migrate.upgrade(postgres_url)  # other test modules share this database and may have left it anywhere
    return postgres_url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A migrated, empty database with room in the pool for the concurrency tests."""
    if request.param == "sqlite":
        url = f"sqlite:///{shutil.copy(request.getfixturevalue('sqlite_template'), tmp_path / 'store.db')}"
    else:
        url = request.getfixturevalue("migrated_postgres")
    engine = make_engine(StoreSettings(database_url=url, pool_size=10, max_overflow=50))
    if request.param == "postgres":
        with engine.begin() as conn:
            conn.execute(sa.text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    yield Store(url, engine, make_sessions(engine))
    engine.dispose()


def numeric_heads(version: str = "1", *, name: str = "drm-test", head_names: Sequence[str] = HEADS,
                  kind: str = "drm", scale: float = 1.0,
                  default_weights: Sequence[float] = (0.5, 0.1, 0.1, 0.1, 0.1, 0.1)) -> HeadSet:
    """A small numeric head set (the store reads its metadata only); `scale` changes its content hash."""
    weight = scale * np.eye(len(head_names), 8)  # (H, d)
    return HeadSet(weight, np.zeros(len(head_names)), list(head_names), kind, "minilm",
                   np.asarray(default_weights), name=name, version=version)


def changed_after_building() -> HeadSet:
    """HeadSet is a mutable dataclass: its shapes are checked when built, so the store checks them again."""
    heads = numeric_heads("2")
    heads.default_weights = np.ones(2)
    return heads


def register(session: Session, version: str = "1", *, activate: bool = True, scale: float = 1.0) -> HeadSetRow:
    return register_head_set(session, numeric_heads(version, scale=scale), uri=f"/tmp/heads/{version}",
                             activate=activate)


@pytest.fixture
def seeded(store: Store) -> Store:
    """One active head set and a user 'alice' without a profile."""
    with store.sessions.begin() as s:
        register(s)
        create_user(s, "alice", display_name="Alice")
    return store


def pair(i: int, **overrides: object) -> FeedbackPair:
    return replace(FeedbackPair(f"prompt {i}", f"good answer {i}", f"bad answer {i}"), **overrides)


def counting_adapter(session: Session) -> Callable[[ProfileRow | None, Sequence[Feedback]], ProfileUpdate]:
    """Weights that record how many pairs the adapter saw: a lost update shows up as a short count."""
    def adapt(profile: ProfileRow | None, history: Sequence[Feedback]) -> ProfileUpdate:
        return ProfileUpdate(weights=[float(len(history))] + [0.0] * (len(HEADS) - 1), method="hyre")

    return adapt


# ---------------------------------------------------------------------------------------------- profiles


def test_profile_write_then_read_in_one_query(seeded: Store) -> None:
    with seeded.sessions.begin() as s:
        assert get_profile(s, "alice", get_head_set(s, "drm-test")) is None
        heads = get_head_set(s, "drm-test")
        first = save_profile(s, "alice", [0, 1, 0, 0, 0, 0], expected_version=None, method="manual",
                             head_set=heads)
        assert first.version == 1
    statements: list[str] = []
    sa.event.listen(seeded.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with seeded.sessions() as s:
        heads = get_head_set(s, "drm-test")
        statements.clear()
        profile = get_profile(s, "alice", heads)
        queries = [q for q in statements if q.lstrip().upper().startswith("SELECT")]  # not SQLite's BEGIN
    assert len(queries) == 1
    assert profile is not None and profile.version == 1
    assert profile.weights == [0, 1, 0, 0, 0, 0] and profile.method == "manual" and profile.bias == 0.0
    assert profile.user.external_id == "alice" and profile.head_set.label == "drm-test@1"  # loaded, detached


def test_a_user_keeps_one_profile_per_head_set_version(seeded: Store) -> None:
    """Writing the profile over version 2 leaves the one over version 1 as it was: a rollback serves it again."""
    with seeded.sessions.begin() as s:
        register(s, "2", activate=False)
        append_feedback_and_update_profile(s, "alice", [pair(0)], counting_adapter(s), get_head_set(s, "drm-test"))
    with seeded.sessions.begin() as s:
        first = get_profile(s, "alice", get_head_set(s, "drm-test", "1"))
        before = (first.id, first.version, first.weights, first.n_pairs)
        second = get_head_set(s, "drm-test", "2")
        assert get_profile(s, "alice", second) is None
        save_profile(s, "alice", [0, 0, 1, 0, 0, 0], head_set=second, expected_version=None, method="manual")
    with seeded.sessions.begin() as s:
        first = get_profile(s, "alice", get_head_set(s, "drm-test", "1"))
        assert (first.id, first.version, first.weights, first.n_pairs) == before
        assert get_profile(s, "alice", get_head_set(s, "drm-test", "2")).weights == [0, 0, 1, 0, 0, 0]
        assert len(list_feedback(s, "alice")) == 1
    assert seeded.counts()["profiles"] == 2


def test_stale_version_is_refused_and_changes_nothing(seeded: Store) -> None:
    with seeded.sessions.begin() as s:
        heads = get_head_set(s, "drm-test")
        save_profile(s, "alice", [1, 0, 0, 0, 0, 0], expected_version=None, method="manual", head_set=heads)
    with seeded.sessions.begin() as s:
        assert save_profile(s, "alice", [0, 2, 0, 0, 0, 0], expected_version=1, method="manual",
                     head_set=get_head_set(s, "drm-test")).version == 2
    for stale in (1, None, 7):
        with seeded.sessions.begin() as s, pytest.raises(ProfileConflict, match="another writer"):
            save_profile(s, "alice", [0, 0, 3, 0, 0, 0], expected_version=stale, method="manual",
                     head_set=get_head_set(s, "drm-test"))
    with seeded.sessions() as s:
        profile = get_profile(s, "alice", get_head_set(s, "drm-test"))
        assert profile is not None and (profile.version, profile.weights) == (2, [0, 2, 0, 0, 0, 0])


@POSTGRES_ONLY  # SQLite serializes whole transactions, so two writers never hold the same version there
def test_writers_that_read_the_same_version_cannot_both_win(seeded: Store) -> None:
    """Two sessions hold version 1; the second flush is refused even though its expected version matched."""
    with seeded.sessions.begin() as s:
        set_weights([1] * 6)(s)
    first, second = seeded.sessions(), seeded.sessions()
    for s in (first, second):
        assert get_profile(s, "alice", get_head_set(s, "drm-test")).version == 1
    save_profile(first, "alice", [2] * 6, expected_version=1, method="manual",
                     head_set=get_head_set(first, "drm-test"))
    first.commit()
    with pytest.raises(ProfileConflict):
        save_profile(second, "alice", [3] * 6, expected_version=1, method="manual",
                     head_set=get_head_set(second, "drm-test"))
    second.rollback()
    first.close()
    second.close()
    with seeded.sessions() as s:
        assert get_profile(s, "alice", get_head_set(s, "drm-test")).weights == [2] * 6


def test_concurrent_feedback_loses_no_update(seeded: Store) -> None:
    """50 writers append one pair each for the same user at once, retrying on conflict."""
    writers = 50
    start = threading.Barrier(writers)
    attempts = []  # list.append is atomic: one entry per transaction attempt
    wins = []

    def writer(i: int) -> None:
        def work(s: Session) -> ProfileRow:
            attempts.append(i)
            return append_feedback_and_update_profile(s, "alice", [pair(i)], counting_adapter(s),
                                                      get_head_set(s, "drm-test"))

        start.wait()
        wins.append(commit_with_retry(seeded.sessions, work, attempts=200).version)

    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(writer, range(writers)))  # re-raises any writer's exception

    with seeded.sessions() as s:
        profile = get_profile(s, "alice", get_head_set(s, "drm-test"))
        stored = list_feedback(s, "alice")
    assert profile is not None
    assert sorted(f.chosen for f in stored) == sorted(f"good answer {i}" for i in range(writers))
    assert sorted(wins) == list(range(1, writers + 1))  # every success produced the next version
    assert profile.version == len(wins) == writers
    assert profile.weights[0] == writers and profile.n_pairs == writers  # the last writer saw every pair
    if seeded.backend == "postgresql":  # SQLite serializes writers; on Postgres they really did collide
        assert len(attempts) > writers


@POSTGRES_ONLY
def test_get_or_create_user_under_a_race(seeded: Store) -> None:
    start = threading.Barrier(20)

    def worker(_: int) -> int:
        start.wait()
        with seeded.sessions.begin() as s:
            return get_or_create_user(s, "newcomer").id

    with ThreadPoolExecutor(20) as pool:
        ids = set(pool.map(worker, range(20)))
    assert len(ids) == 1 and seeded.counts()["users"] == 2


@POSTGRES_ONLY
def test_concurrent_activations_serialize_and_leave_one_active(seeded: Store) -> None:
    """Activating versions of one head set at once (admin calls on two replicas) queues on the name: each one
    completes (no deadlock between the deactivate-others and activate updates) and one version is active."""
    with seeded.sessions.begin() as s:
        for version in ("2", "3"):
            register(s, version, activate=False)
    versions = ["1", "2", "3"] * 8
    start = threading.Barrier(len(versions))

    def worker(version: str) -> str:
        start.wait()
        with seeded.sessions.begin() as s:
            return activate_head_set(s, "drm-test", version).version

    with ThreadPoolExecutor(len(versions)) as pool:
        assert sorted(pool.map(worker, versions)) == sorted(versions)
    with seeded.sessions() as s:
        assert len([h for h in list_head_sets(s, "drm-test") if h.active]) == 1


@POSTGRES_ONLY
def test_registrations_of_a_new_name_that_activate_queue_too(seeded: Store) -> None:
    """A name with no committed rows has nothing to lock: registrations that activate it must still queue, not
    meet at the one-active-version index."""
    versions = [str(v) for v in range(6)]
    start = threading.Barrier(len(versions))

    def worker(version: str) -> str:
        start.wait()
        with seeded.sessions.begin() as s:
            heads = numeric_heads(version, name="brand-new", head_names=["h"], default_weights=[1.0])
            row = register_head_set(s, heads, uri=f"/h/{version}", activate=True)
            time.sleep(0.1)  # every transaction stays open while the others register
            return row.version

    with ThreadPoolExecutor(len(versions)) as pool:
        assert sorted(pool.map(worker, versions)) == versions
    with seeded.sessions() as s:
        assert len([h for h in list_head_sets(s, "brand-new") if h.active]) == 1


@POSTGRES_ONLY
def test_an_open_profile_write_does_not_hold_up_an_activation(seeded: Store) -> None:
    """Feedback adapts inside its transaction; a profile it writes references a head-set version, and an
    activation must not wait for that transaction (nor make it wait)."""
    with seeded.sessions.begin() as s:
        register(s, "2", activate=False)
    written, finish = threading.Event(), threading.Event()

    def feedback_in_progress() -> None:
        with seeded.sessions.begin() as s:
            save_profile(s, "alice", [0.5, 0.1, 0.1, 0.1, 0.1, 0.1], method="manual", expected_version=None,
                         head_set=get_head_set(s, "drm-test", "1"))
            written.set()
            finish.wait(10)

    thread = threading.Thread(target=feedback_in_progress)
    thread.start()
    try:
        assert written.wait(10)
        with seeded.sessions.begin() as s:
            s.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
            assert activate_head_set(s, "drm-test", "2").active
    finally:
        finish.set()
        thread.join(10)


def test_a_failing_adapter_writes_nothing(seeded: Store) -> None:
    def broken(profile: ProfileRow | None, history: Sequence[Feedback]) -> ProfileUpdate:
        raise RuntimeError("adapter crashed")

    before = seeded.counts()
    with pytest.raises(RuntimeError, match="adapter crashed"):
        commit_with_retry(seeded.sessions, feedback(pair(0), adapter=lambda s: broken))
    assert seeded.counts() == before


# ---------------------------------------------------------------------------------------------- bad input

Operation = Callable[[Session], object]


def set_weights(weights: Sequence[float], user: str = "alice", **options: object) -> Operation:
    """save_profile of a first profile over the active head set."""
    def write(s: Session) -> object:
        fields = {"expected_version": None, "method": "manual", "head_set": get_head_set(s, "drm-test")}
        return save_profile(s, user, weights, **{**fields, **options})
    return write


def feedback(*pairs: FeedbackPair, user: str = "alice",
             adapter: Callable[[Session], Adapter] = counting_adapter, **limits: int) -> Operation:
    """append_feedback_and_update_profile with the adapter that `adapter` makes in the session."""
    def write(s: Session) -> object:
        return append_feedback_and_update_profile(s, user, pairs, adapter(s), get_head_set(s, "drm-test"),
                                                    limits=Limits(**limits))
    return write


def adapter_returning(weights: Sequence[float]) -> Callable[[Session], Adapter]:
    def make(s: Session) -> Adapter:
        return lambda profile, history: ProfileUpdate(weights, "hyre")
    return make


EXPORT = {"format": "rewardprism.user/1", "external_id": "bob", "display_name": None, "metadata": {},
          "disabled": False, "created_at": "2024-01-01T00:00:00+00:00", "feedback": [],
          "profile": {"head_set": {"name": "gone", "version": "1"}, "weights": [1.0], "bias": 0.0,
                      "method": "bt", "n_pairs": 0}}

BAD_INPUT: dict[str, tuple[Operation, type[Exception], str]] = {
    "wrong vector length": (set_weights([1.0, 2.0]), InvalidInput, "2 values, but there are 6 heads"),
    "NaN weight": (set_weights([math.nan] + [0.0] * 5), InvalidInput, r"weights\[0\] must be finite"),
    "inf weight": (set_weights([0.0] * 5 + [math.inf]), InvalidInput, r"weights\[5\] must be finite"),
    "NaN bias": (set_weights([0.0] * 6, bias=math.nan), InvalidInput, "bias must be finite"),
    "unknown method": (set_weights([0.0] * 6, method="magic"), InvalidInput, "method must be one of"),
    "unknown user": (set_weights([0.0] * 6, user="mallory"), NotFound, "mallory"),
    "adapter returns wrong length": (feedback(pair(0), adapter=adapter_returning([1.0])), InvalidInput,
                                     "1 values"),
    "adapter returns inf": (feedback(pair(0), adapter=adapter_returning([math.inf] * 6)), InvalidInput,
                            "finite"),
    "feedback for unknown user": (feedback(pair(0), user="mallory"), NotFound, "mallory"),
    "oversized response": (feedback(pair(0, chosen="x" * 101), max_text_chars=100), InvalidInput,
                           "chosen has 101 characters"),
    "oversized chat prompt": (feedback(pair(0, prompt=[{"role": "user", "content": "x" * 60}] * 2),
                                       max_text_chars=100), InvalidInput, "120 characters together"),
    "malformed chat prompt": (feedback(pair(0, prompt=[{"text": "hi"}])), InvalidInput, "role"),
    "too many pairs": (feedback(pair(0), pair(1), pair(2), max_pairs_per_call=2), InvalidInput,
                       "between 1 and 2"),
    "no pairs": (feedback(), InvalidInput, "between 1"),
    "unknown head set": (lambda s: get_head_set(s, "vrm-nope"), NotFound, "vrm-nope"),
    "unknown head set version": (lambda s: activate_head_set(s, "drm-test", "9"), NotFound, "drm-test@9"),
    "duplicate external id": (lambda s: create_user(s, "alice"), AlreadyExists, "alice"),
    "empty external id": (lambda s: create_user(s, "  "), InvalidInput, "external id"),
    "oversized external id": (lambda s: create_user(s, "x" * 256), InvalidInput, "256 characters"),
    "oversized metadata": (lambda s: create_user(s, "bob", metadata={"notes": "x" * 20_000}), InvalidInput,
                           "bytes as JSON"),
    "NaN in metadata": (lambda s: create_user(s, "bob", metadata={"x": math.nan}), InvalidInput, "JSON"),
    "bad scope": (lambda s: create_api_key(s, ["score", "root"]), InvalidInput, "root"),
    "no scope": (lambda s: create_api_key(s, []), InvalidInput, "non-empty"),
    "key for unknown user": (lambda s: create_api_key(s, ["score"], user_external_id="mallory"), NotFound,
                             "mallory"),
    "head set default weights length": (lambda s: register_head_set(s, changed_after_building(), uri="/x"),
                                        InvalidInput, "default_weights has 2 values"),
    "head set kind": (lambda s: register_head_set(s, numeric_heads(kind="pca"), uri="/x"), InvalidInput, "kind"),
    "same head set version, other content": (lambda s: register(s, "1", scale=2.0), AlreadyExists,
                                             "other content"),
    "import of unknown head set": (lambda s: import_user(s, EXPORT), NotFound, "gone@1"),
    "import with a head set name not text": (
        lambda s: import_user(s, {**EXPORT, "profile": {**EXPORT["profile"], "head_set": {"name": ["drm-test"],
                                                                                          "version": "1"}}}),
        InvalidInput, "profile.head_set.name must be a string"),
    "import with n_pairs out of range": (
        lambda s: import_user(s, {**EXPORT, "profile": {**EXPORT["profile"], "head_set": {"name": "drm-test",
                                                                                          "version": "1"},
                                                        "weights": [0.0] * 6, "n_pairs": 10**20}}),
        InvalidInput, "n_pairs must be from 0"),
    "import with disabled as text": (lambda s: import_user(s, {**EXPORT, "disabled": "false"}), InvalidInput,
                                     "disabled must be true or false"),
    "import with a lone surrogate": (lambda s: import_user(s, {**EXPORT, "display_name": "\ud800",
                                                                     "profile": None}),
                                     InvalidInput, "valid Unicode"),
    "NUL in a display name": (lambda s: create_user(s, "bob", display_name="a\x00b"), InvalidInput, "NUL"),
    "lone surrogate in metadata": (lambda s: create_user(s, "bob", metadata={"x": "\udfff"}), InvalidInput,
                                   "not plain JSON"),
    "import of something else": (lambda s: import_user(s, {"users": []}), InvalidInput, "not a user export"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_refused_and_nothing_is_written(seeded: Store, case: str) -> None:
    operation, error, message = BAD_INPUT[case]
    before = seeded.counts()
    # The caller even commits after catching the error: validation must come before any write.
    with seeded.sessions.begin() as s, pytest.raises(error, match=message):
        operation(s)
    assert seeded.counts() == before


def test_disabled_user_gets_no_feedback_and_no_profile_changes(seeded: Store) -> None:
    with seeded.sessions.begin() as s:
        set_user_disabled(s, "alice", True)
    before = seeded.counts()
    with seeded.sessions.begin() as s, pytest.raises(UserDisabled):
        append_feedback_and_update_profile(s, "alice", [pair(0)], counting_adapter(s), get_head_set(s, "drm-test"))
    with seeded.sessions.begin() as s, pytest.raises(UserDisabled):
        save_profile(s, "alice", [0.0] * 6, expected_version=None, method="manual",
                     head_set=get_head_set(s, "drm-test"))
    assert seeded.counts() == before


# ---------------------------------------------------------------------------------------------- interruptions


@POSTGRES_ONLY
def test_connection_killed_mid_transaction_leaves_no_partial_rows(seeded: Store) -> None:
    before = seeded.counts()
    session = seeded.sessions()
    create_user(session, "bob")
    append_feedback_and_update_profile(session, "bob", [pair(i) for i in range(3)], counting_adapter(session),
                                       get_head_set(session, "drm-test"))
    record_audit(session, "test", "users.create", "bob")
    pid = session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    assert seeded.counts() == before  # flushed, not committed: invisible to others
    with seeded.engine.connect() as killer:
        assert killer.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one()
    with pytest.raises(sa.exc.OperationalError):
        session.commit()
    session.close()
    assert seeded.counts() == before
    with seeded.sessions.begin() as s:  # the pool recovers: the next transaction just works
        create_user(s, "bob")
    assert seeded.counts()["users"] == before["users"] + 1


def test_sqlite_process_killed_mid_transaction_leaves_no_partial_rows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'crash.db'}"
    migrate.upgrade(url)
    script = textwrap.dedent(f"""
        import time
        from rewardprism.store import StoreSettings, create_user, make_engine, make_sessions
        from rewardprism.store import register_head_set, reset_profile
        s = make_sessions(make_engine(StoreSettings(database_url={url!r})))()
        from rewardprism.heads import HeadSet
        heads = register_head_set(s, HeadSet([[1.0, 0.0]], [0.0], ["h"], "bt", "b", [1.0]), uri="/h")
        create_user(s, "bob")
        reset_profile(s, "bob", heads)
        print("flushed", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "flushed"
    finally:
        proc.kill()  # SIGKILL: no rollback, no cleanup; the journal is left behind
        proc.wait()
    engine = make_engine(StoreSettings(database_url=url))
    store = Store(url, engine, make_sessions(engine))
    assert set(store.counts().values()) == {0}
    with store.sessions.begin() as s:  # and the file is writable again (the dead writer's lock is gone)
        create_user(s, "bob")
    assert store.counts()["users"] == 1
    engine.dispose()


def test_sqlite_reads_run_while_another_process_holds_a_write_transaction(tmp_path: Path) -> None:
    """Read sessions begin deferred on SQLite: a lookup does not wait for another process's open write (as a
    scoring replica's profile checks must not wait for another replica's feedback), while a writer still does."""
    url = f"sqlite:///{tmp_path / 'busy.db'}"
    migrate.upgrade(url)
    engine = make_engine(StoreSettings(database_url=url, pool_timeout_s=0.5))  # the busy timeout, here short
    with make_sessions(engine).begin() as s:
        create_user(s, "alice")
    script = textwrap.dedent(f"""
        import time
        from rewardprism.store import StoreSettings, create_user, make_engine, make_sessions
        s = make_sessions(make_engine(StoreSettings(database_url={url!r})))()
        create_user(s, "bob")  # flushed inside an open write transaction, never committed
        print("writing", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
        with make_sessions(engine, read_only=True)() as s:  # a read that queued would fail after the 0.5 s timeout
            assert [u.external_id for u in s.scalars(sa.select(User))] == ["alice"]  # bob is not committed
        with pytest.raises(sa.exc.OperationalError, match="locked"), make_sessions(engine).begin() as s:
            create_user(s, "carol")
    finally:
        proc.kill()
        proc.wait()
    engine.dispose()


# ---------------------------------------------------------------------------------------------- users


def test_export_then_import_restores_the_user(seeded: Store) -> None:
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    with seeded.sessions.begin() as s:
        get_user(s, "alice").meta = {"team": "a", "tags": ["x"]}
        append_feedback_and_update_profile(s, "alice", [pair(0), pair(1, prompt=chat, source="ui")],
                                           counting_adapter(s), get_head_set(s, "drm-test"))
        append_feedback_and_update_profile(s, "alice", [pair(2)], counting_adapter(s), get_head_set(s, "drm-test"))
    with seeded.sessions.begin() as s:
        exported = export_user(s, "alice")
        delete_user(s, "alice")
    assert exported["profile"]["weights"][0] == 3.0 and exported["profile"]["version"] == 2
    assert exported["feedback"][1]["prompt"] == chat and exported["feedback"][1]["source"] == "ui"
    with seeded.sessions.begin() as s:
        import_user(s, exported)
    with seeded.sessions() as s:
        again = export_user(s, "alice")
    assert again["profile"].pop("version") == 1  # a fresh row: the lock version starts over
    exported["profile"].pop("version")
    assert again == exported


def test_times_keep_their_instant_and_come_back_in_utc(seeded: Store) -> None:
    """SQLite drops a time's offset; the store converts to UTC first, so both backends agree."""
    export = {**EXPORT, "created_at": "2025-06-01T12:00:00+02:00", "profile": None,
              "feedback": [{"prompt": "p", "chosen": "c", "rejected": "r", "source": "api",
                            "created_at": "2025-06-01T12:30:00-05:00"}]}
    with seeded.sessions.begin() as s:
        import_user(s, export)
    with seeded.sessions() as s:
        user, again = get_user(s, "bob"), export_user(s, "bob")
        assert user.created_at == datetime(2025, 6, 1, 10, tzinfo=timezone.utc)
        assert user.created_at.utcoffset() == timedelta(0)
    assert again["created_at"] == "2025-06-01T10:00:00+00:00"
    assert again["feedback"][0]["created_at"] == "2025-06-01T17:30:00+00:00"


@POSTGRES_ONLY
def test_registering_one_head_set_twice_at_once_is_a_no_op(store: Store) -> None:
    """Both transactions pass the "not registered yet" check; the one that loses the insert must find the
    winner's row (same content: no error) rather than fail on the unique constraint."""
    inserted, results = threading.Event(), {}

    def second() -> None:
        inserted.wait()
        with store.sessions.begin() as s:
            results["second"] = register(s, activate=False).id

    thread = threading.Thread(target=second)
    thread.start()
    with store.sessions.begin() as s:
        results["first"] = register(s, activate=False).id
        inserted.set()  # the second now blocks on the unique index until this commits
        thread.join(timeout=1)
    thread.join()
    assert results["first"] == results["second"] and store.counts()["head_sets"] == 1


def test_delete_user_takes_profile_feedback_and_keys_with_them(seeded: Store) -> None:
    with seeded.sessions.begin() as s:
        create_user(s, "bob")
        for user in ("alice", "bob"):
            append_feedback_and_update_profile(s, user, [pair(0), pair(1)], counting_adapter(s),
                                               get_head_set(s, "drm-test"))
            create_api_key(s, ["score"], user_external_id=user)
        record_audit(s, "admin", "users.delete", "alice")
    with seeded.sessions.begin() as s:
        delete_user(s, "alice")
    counts = seeded.counts()
    assert (counts["users"], counts["profiles"], counts["feedback"], counts["api_keys"]) == (1, 1, 2, 1)
    assert (counts["head_sets"], counts["audit_log"]) == (1, 1)
    with seeded.sessions.begin() as s, pytest.raises(NotFound):
        delete_user(s, "alice")


def test_list_users_pages_and_filters(seeded: Store) -> None:
    with seeded.sessions.begin() as s:
        for i in range(6):
            create_user(s, f"user-{i}", display_name=f"Tester {i}")
        set_user_disabled(s, "user-1", True)
        append_feedback_and_update_profile(s, "user-2", [pair(0)], counting_adapter(s), get_head_set(s, "drm-test"))
    with seeded.sessions() as s:
        first, last = list_users(s, limit=4), list_users(s, limit=4, offset=4)
        assert [u.external_id for u in first.items] == ["alice", "user-0", "user-1", "user-2"]
        assert [u.external_id for u in last.items] == ["user-3", "user-4", "user-5"]
        assert first.total == last.total == 7
        assert list_users(s, search="TESTER 3").total == 1
        assert [u.external_id for u in list_users(s, disabled=True).items] == ["user-1"]
        hyre = list_users(s, method="hyre", head_set_name="drm-test").items
        assert [(u.external_id, u.profile and u.profile.n_pairs) for u in hyre] == [("user-2", 1)]
        with pytest.raises(InvalidInput):
            list_users(s, limit=0)


# ---------------------------------------------------------------------------------------------- head sets


def test_one_active_version_per_head_set_name(seeded: Store) -> None:
    with seeded.sessions.begin() as s:
        assert register(s, "1").label == "drm-test@1"  # same content again: a no-op
        register(s, "2", activate=False)
        assert get_head_set(s, "drm-test").version == "1"
        activate_head_set(s, "drm-test", "2")
    with seeded.sessions() as s:
        assert get_head_set(s, "drm-test").version == "2"
        assert s.scalar(sa.select(sa.func.count()).where(HeadSetRow.active)) == 1
    # The database itself refuses a second active version, whatever the code does.
    with pytest.raises(sa.exc.IntegrityError), seeded.sessions.begin() as s:
        s.execute(sa.update(HeadSetRow).values(active=True))


def test_a_query_id_beyond_32_bits_names_no_pool_pair(seeded: Store) -> None:
    """Feedback may cite pool:<id>:<position> with up to 10 digits each: Postgres refused one past 2³¹ (a 500)."""
    with seeded.sessions.begin() as s:
        pool = register_query_pool(s, get_head_set(s, "drm-test"), "p", [("q", "a", "b")], np.ones((1, len(HEADS))))
        pool_id = pool.id
    with seeded.sessions() as s:
        assert list(pool_pairs(s, pool_id, [0])) == [0]
        assert pool_pairs(s, 9_999_999_999, [0]) == {} and pool_pairs(s, pool_id, [9_999_999_999, 0]).keys() == {0}


def test_an_import_refuses_a_query_id_the_service_never_hands_out(seeded: Store) -> None:
    """Feedback citing "pool:1:x" once imported made every query on pool 1 fail parsing it (a 500)."""
    for bad in ("pool:1:x", "pool:1:2:3", "resp:xyz", "whatever", "pool:01:7"):  # 01: not found as pool 1's
        export = {**EXPORT, "profile": None, "feedback": [{"prompt": "p", "chosen": "c", "rejected": "r",
                                                           "source": "api", "query_id": bad,
                                                           "created_at": "2025-06-01T12:30:00+00:00"}]}
        with seeded.sessions() as s, pytest.raises(InvalidInput, match=r"feedback\[0\]: query_id"):
            import_user(s, export)


def test_answered_positions_ignore_an_imported_citation_past_the_pool(seeded: Store) -> None:
    """Feedback imported from another database may cite a position this pool lacks: the service indexed its
    mask of asked pairs with it (IndexError, a 500 on every query of that user on the pool)."""
    with seeded.sessions.begin() as s:
        pool = register_query_pool(s, get_head_set(s, "drm-test"), "p", [("q", "a", "b")], np.ones((1, len(HEADS))))
        cited = [{"prompt": "q", "chosen": "a", "rejected": "b", "source": "api", "query_id": f"pool:{pool.id}:{i}",
                  "created_at": "2025-06-01T12:30:00+00:00"} for i in (0, 7)]
        import_user(s, {**EXPORT, "profile": None, "feedback": cited})
    with seeded.sessions() as s:
        pool = get_query_pool(s, get_head_set(s, "drm-test"), "p")
        assert answered_positions(s, get_user(s, "bob"), pool) == {0}


# ---------------------------------------------------------------------------------------------- API keys


def test_api_keys_store_only_a_salted_hash_and_check_scopes(seeded: Store) -> None:
    with seeded.sessions.begin() as s:
        client, client_token = create_api_key(s, ["score", "feedback"], user_external_id="alice", name="app")
        _, bound_token = create_api_key(s, ["score"], user_external_id="alice")
        _, admin_token = create_api_key(s, ["admin"])
    secret = client_token.split("_", 2)[2]
    with seeded.engine.connect() as conn:
        row = conn.execute(sa.select(ApiKey.__table__).where(ApiKey.prefix == client.prefix)).one()
    assert secret not in repr(tuple(row)) and secret.encode() not in row.key_hash

    with seeded.sessions() as s:
        assert verify_api_key(s, client_token, "feedback").user == get_user(s, "alice")
        assert verify_api_key(s, admin_token, "score").scopes == ["admin"]  # admin implies the other scopes
        with pytest.raises(MissingScope, match="admin"):
            verify_api_key(s, client_token, "admin")
        forged = client_token[:-2] + ("aa" if not client_token.endswith("aa") else "bb")
        for bad in (forged, "rp_nothing_here", "garbage", f"rp_{client.prefix}_"):
            with pytest.raises(InvalidApiKey):
                verify_api_key(s, bad)
    with seeded.sessions.begin() as s:
        revoke_api_key(s, client.prefix)
        record_audit(s, "admin", "keys.revoke", client.prefix)
    with seeded.sessions() as s, pytest.raises(InvalidApiKey):
        verify_api_key(s, client_token)
    with seeded.sessions.begin() as s:
        set_user_disabled(s, "alice", True)
    with seeded.sessions() as s:
        assert s.scalar(sa.select(AuditEntry.action)) == "keys.revoke"
        with pytest.raises(InvalidApiKey):  # a key bound to a disabled user stops working too
            verify_api_key(s, bound_token)
        assert verify_api_key(s, admin_token).scopes == ["admin"]


# ---------------------------------------------------------------------------------------------- settings


def test_pool_timeout_takes_fractions_of_a_second() -> None:
    """RP_DB_POOL_TIMEOUT_S is seconds as a float (2.5 used to be refused: it was parsed as an integer)."""
    env = {"DATABASE_URL": "postgresql://rp@127.0.0.1/rp", "RP_DB_POOL_TIMEOUT_S": "2.5", "RP_DB_MAX_OVERFLOW": "0"}
    settings = StoreSettings.from_env(env=env)
    assert (settings.pool_timeout_s, settings.max_overflow) == (2.5, 0)
    engine = make_engine(settings)  # connects lazily: nothing is reached here
    assert engine.pool.timeout() == 2.5
    engine.dispose()


def test_postgres_connections_carry_the_statement_and_lock_timeouts(postgres_url: str) -> None:
    """A stuck statement or a lock held by a stalled client fails the transaction instead of hanging it."""
    env = {"RP_DB_STATEMENT_TIMEOUT_S": "0.2", "RP_DB_LOCK_TIMEOUT_S": "0.05"}
    engine = make_engine(StoreSettings.from_env(postgres_url, env=env))
    try:
        with engine.connect() as conn:
            timeouts = [conn.exec_driver_sql(f"SHOW {name}").scalar_one() for name in ("statement_timeout",
                                                                                      "lock_timeout")]
            assert timeouts == ["200ms", "50ms"]
            with pytest.raises(sa.exc.OperationalError, match="statement timeout"):
                conn.exec_driver_sql("SELECT pg_sleep(5)")
    finally:
        engine.dispose()
    with pytest.raises(InvalidInput, match="^RP_DB_LOCK_TIMEOUT_S: "):
        StoreSettings.from_env(env={"RP_DB_LOCK_TIMEOUT_S": "-1"})


def test_settings_from_environment_and_no_password_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    env = {"DATABASE_URL": "postgresql://rp:hunter2@db.internal:5432/rp", "RP_DB_POOL_SIZE": "20",
           "RP_MAX_TEXT_CHARS": "500"}
    settings = StoreSettings.from_env(env=env)
    assert settings.database_url.startswith("postgresql+psycopg://rp:hunter2@")  # psycopg 3, not psycopg2
    assert (settings.pool_size, settings.max_overflow, settings.limits.max_text_chars) == (20, 10, 500)
    assert StoreSettings.from_env("sqlite:///x.db", env=env).database_url == "sqlite:///x.db"  # the flag wins
    assert StoreSettings.from_env(env={}).database_url == "sqlite:///rewardprism.db"
    assert safe_url(settings.database_url) == "postgresql+psycopg://rp:***@db.internal:5432/rp"

    with caplog.at_level("DEBUG"):
        make_engine(settings).dispose()
    assert "db.internal" in caplog.text and "hunter2" not in caplog.text

    with pytest.raises(InvalidInput, match="RP_DB_POOL_SIZE") as bad_pool:
        StoreSettings.from_env(env={**env, "RP_DB_POOL_SIZE": "lots"})
    for name, value in (("RP_DB_POOL_TIMEOUT_S", "0"), ("RP_DB_POOL_TIMEOUT_S", "nan"),
                        ("RP_DB_MAX_OVERFLOW", "-1"), ("RP_MAX_PAIRS_PER_CALL", "0"), ("RP_MAX_METADATA_BYTES", "1.5")):
        with pytest.raises(InvalidInput, match=f"^{name}: "):
            StoreSettings.from_env(env={name: value})
    with pytest.raises(InvalidInput) as bad_url:
        StoreSettings.from_env("postgresql://rp:hunter2@db:notaport/rp")
    assert "hunter2" not in str(bad_pool.value) + str(bad_url.value)
