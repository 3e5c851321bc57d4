"""Tables of the store: users, their profiles and feedback, the head-set registry, API keys, the audit log.

Portable across Postgres (production) and SQLite (the embedded default): JSON documents are JSONB on Postgres,
weight vectors a native `double precision[]` there and JSON lists on SQLite. Alembic owns the schema
(`migrations/`); `metadata.create_all` is not used, and `alembic check` keeps the two in step.

`HeadSetRow` and `ProfileRow` carry a suffix because the numeric classes they record are `rewardprism.heads.HeadSet`
and `rewardprism.scoring.Profile`; the other tables have no namesake and keep plain names.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Field limits shared by the columns and the validation in repository.py.
EXTERNAL_ID_MAX = 255
NAME_MAX = 255
HEAD_SET_NAME_MAX = 128
VERSION_MAX = 64
SOURCE_MAX = 64
URI_MAX = 1024
QUERY_ID_MAX = 64

# How a profile's weights were obtained: stored values of `profiles.method`, not rewardprism.adapt's method names
# (adapt's `default`, the hierarchical Bradley-Terry, is stored as "shrink"). The stored "default" means the head
# set's population weights (`default_weights`), as after a reset: POPULATION_METHOD names it in code.
POPULATION_METHOD = "default"
PROFILE_METHODS = ("hyre", "bt", "manual", POPULATION_METHOD, "shrink")
KINDS = ("drm", "vrm", "bt")  # what produced a head set
SCOPES = ("score", "feedback", "admin")  # what an API key may do; admin implies the others

JSONDoc = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
FloatVector = sa.JSON().with_variant(postgresql.ARRAY(sa.Double()), "postgresql")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UtcDateTime(sa.TypeDecorator[datetime]):
    """A point in time, stored in UTC and read back with its zone on every backend.

    Postgres keeps the zone of a `timestamptz`; SQLite keeps the wall-clock text and drops the offset, so an
    aware time converted to UTC first is the only way both read back the same instant. Naive input is UTC.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        return _as_utc(value)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        return _as_utc(value)


def _as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    # Named constraints, so migrations can drop and alter them the same way on every backend.
    metadata = sa.MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UtcDateTime(),
        dict[str, Any]: JSONDoc,
    }


class User(Base):
    """Someone whose preferences we model, named by the calling application's own id."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str] = mapped_column(sa.String(EXTERNAL_ID_MAX), unique=True)
    display_name: Mapped[str | None] = mapped_column(sa.String(NAME_MAX))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)  # `metadata` is taken on the class
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    disabled: Mapped[bool] = mapped_column(default=False)

    # One profile per head-set version the user was adapted onto. Deleting a user deletes their profiles,
    # feedback and keys in the database (ON DELETE CASCADE).
    profiles: Mapped[list[ProfileRow]] = relationship(
        back_populates="user", cascade="all, delete-orphan", passive_deletes=True
    )

    def profile_on(self, head_set_id: int) -> ProfileRow | None:
        """The user's profile over that head-set version (None: never adapted onto it)."""
        return next((p for p in self.profiles if p.head_set_id == head_set_id), None)

    @property
    def profile(self) -> ProfileRow | None:
        """The profile listings show: the one over an active head set, else the most recently updated."""
        if not self.profiles:
            return None
        return max(self.profiles, key=lambda p: (p.head_set.active, p.updated_at, p.id))


class HeadSetRow(Base):
    """The registry entry of one saved version of a rewardprism.heads.HeadSet (the files live at `uri`).

    At most one version per name is active: the one services load.
    """

    __tablename__ = "head_sets"
    __table_args__ = (
        sa.UniqueConstraint("name", "version"),
        sa.Index(
            "uq_head_sets_active_name", "name", unique=True,
            postgresql_where=sa.text("active"), sqlite_where=sa.text("active"),
        ),
        sa.CheckConstraint(_one_of("kind", KINDS), name="kind"),
        sa.CheckConstraint("dim > 0 AND num_heads > 0", name="sizes"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(HEAD_SET_NAME_MAX))
    version: Mapped[str] = mapped_column(sa.String(VERSION_MAX))
    kind: Mapped[str] = mapped_column(sa.String(8))
    backbone: Mapped[str] = mapped_column(sa.String(NAME_MAX))
    dim: Mapped[int]
    num_heads: Mapped[int]
    head_names: Mapped[list[str]] = mapped_column(JSONDoc)
    default_weights: Mapped[list[float]] = mapped_column(FloatVector)
    uri: Mapped[str] = mapped_column(sa.String(URI_MAX))  # where HeadSet.save wrote it: a path or a URL
    content_hash: Mapped[str] = mapped_column(sa.String(128))
    active: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


class ProfileRow(Base):
    """A user's weights over one head-set version (one row per user and version). Scores are
    `weights · head_scores + bias`. `n_pairs` counts the feedback pairs adapted from: feedback is append-only,
    so a profile with as many pairs as the user has feedback is up to date.

    `version` is the optimistic lock: every ORM update runs `... WHERE version = <loaded>` and bumps it, so
    two writers that read the same version cannot both win (the loser gets ProfileConflict and retries).
    """

    __tablename__ = "profiles"
    __table_args__ = (
        sa.CheckConstraint(_one_of("method", PROFILE_METHODS), name="method"),
        sa.CheckConstraint("n_pairs >= 0", name="n_pairs"),
        sa.UniqueConstraint("user_id", "head_set_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"), index=True)
    head_set_id: Mapped[int] = mapped_column(sa.ForeignKey("head_sets.id", ondelete="RESTRICT"), index=True)
    weights: Mapped[list[float]] = mapped_column(FloatVector)
    bias: Mapped[float] = mapped_column(sa.Double, default=0.0)
    method: Mapped[str] = mapped_column(sa.String(16))
    n_pairs: Mapped[int] = mapped_column(default=0)  # feedback pairs the weights were adapted from
    version: Mapped[int] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    user: Mapped[User] = relationship(back_populates="profiles")
    head_set: Mapped[HeadSetRow] = relationship()

    __mapper_args__: ClassVar[dict[str, Any]] = {"version_id_col": version}


class Feedback(Base):
    """One labelled pair. Append-only: a profile can always be re-adapted from the full history."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"), index=True)
    prompt: Mapped[str | list[dict[str, str]]] = mapped_column(JSONDoc)  # text, or [{role, content}, ...]
    chosen: Mapped[str] = mapped_column(sa.Text)
    rejected: Mapped[str] = mapped_column(sa.Text)
    source: Mapped[str] = mapped_column(sa.String(SOURCE_MAX))
    # the question this label answers (`POST /v1/users/{id}/queries`), when the client cites it
    query_id: Mapped[str | None] = mapped_column(sa.String(QUERY_ID_MAX), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class QueryPool(Base):
    """Candidate pairs to ask users about, registered with one head-set version, with their head scores.

    `gaps` holds the pairs' head-score differences s(a) − s(b) as float32 (size, num_heads), little-endian: a
    query then costs no forward pass. The texts are in `QueryPoolPair`, read only for the pairs a query returns.
    """

    __tablename__ = "query_pools"
    __table_args__ = (sa.UniqueConstraint("head_set_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    head_set_id: Mapped[int] = mapped_column(sa.ForeignKey("head_sets.id", ondelete="RESTRICT"), index=True)
    name: Mapped[str] = mapped_column(sa.String(HEAD_SET_NAME_MAX))
    size: Mapped[int] = mapped_column()
    gaps: Mapped[bytes] = mapped_column(sa.LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class QueryPoolPair(Base):
    """One candidate pair of a pool: a prompt and two responses, in an order that carries no label."""

    __tablename__ = "query_pool_pairs"

    pool_id: Mapped[int] = mapped_column(sa.ForeignKey("query_pools.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(primary_key=True)
    prompt: Mapped[str | list[dict[str, str]]] = mapped_column(JSONDoc)
    response_a: Mapped[str] = mapped_column(sa.Text)
    response_b: Mapped[str] = mapped_column(sa.Text)


HASH_SCHEMES = ("sha256", "scrypt")  # how api_keys.key_hash was made: new keys sha256, keys from before 0002 scrypt


class ApiKey(Base):
    """A client or admin credential. Only a salted hash of the secret is stored, never the secret (`keys`)."""

    __tablename__ = "api_keys"
    __table_args__ = (sa.CheckConstraint(_one_of("hash_scheme", HASH_SCHEMES), name="hash_scheme"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    prefix: Mapped[str] = mapped_column(sa.String(16), unique=True)  # the public part, shown in listings
    name: Mapped[str | None] = mapped_column(sa.String(NAME_MAX))
    salt: Mapped[bytes] = mapped_column(sa.LargeBinary(16))
    key_hash: Mapped[bytes] = mapped_column(sa.LargeBinary(64))
    hash_scheme: Mapped[str] = mapped_column(sa.String(16))
    scopes: Mapped[list[str]] = mapped_column(JSONDoc)
    user_id: Mapped[int | None] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]

    user: Mapped[User | None] = relationship()

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


class AuditEntry(Base):
    """Who did what to whom, for admin actions. No foreign keys: entries outlive what they name."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    actor: Mapped[str] = mapped_column(sa.String(NAME_MAX))
    action: Mapped[str] = mapped_column(sa.String(64))
    target: Mapped[str] = mapped_column(sa.String(NAME_MAX))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class AuthEpoch(Base):
    """One row: a counter bumped in the transaction of every delete, disable or revoke (`store.revocation`).

    Replicas cache verified keys; each checks this counter once per wave of requests, so a cached key
    outlives none of those changes, whichever replica made them.
    """

    __tablename__ = "auth_epoch"

    id: Mapped[int] = mapped_column(primary_key=True)
    epoch: Mapped[int] = mapped_column(sa.BigInteger)


class DeletedUser(Base):
    """A tombstone: feedback for this external id is refused instead of creating the user again.

    Only an explicit create or import (an admin's decision) brings the id back, and removes the tombstone.
    """

    __tablename__ = "deleted_users"

    external_id: Mapped[str] = mapped_column(sa.String(EXTERNAL_ID_MAX), primary_key=True)
    deleted_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotentAnswer(Base):
    """The first answer to a write sent with an `Idempotency-Key`, committed with the write itself.

    `owner` is the caller's key prefix (keys do not share idempotency keys); `fingerprint` hashes the method,
    path and body, so the same key with another request is told apart from a retry.
    """

    __tablename__ = "idempotent_answers"

    owner: Mapped[str] = mapped_column(sa.String(NAME_MAX), primary_key=True)
    key: Mapped[str] = mapped_column(sa.String(NAME_MAX), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(sa.String(64))
    status: Mapped[int]
    body: Mapped[Any] = mapped_column(JSONDoc, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
