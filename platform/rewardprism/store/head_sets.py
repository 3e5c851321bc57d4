"""The head-set registry: which saved versions exist, and which one of each name is served."""
from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rewardprism.store import checks
from rewardprism.store.errors import AlreadyExists, InvalidInput, NotFound
from rewardprism.store.models import HEAD_SET_NAME_MAX, KINDS, NAME_MAX, URI_MAX, VERSION_MAX, HeadSetRow

if TYPE_CHECKING:  # only read, never built, here: the store needs no tensors
    from rewardprism.heads import HeadSet

ACTIVATION_LOCK = 0x52500001  # advisory-lock namespace ("RP", 1): head-set activations, keyed by name


def register_head_set(session: Session, heads: HeadSet, *, uri: str, activate: bool = False) -> HeadSetRow:
    """Record `heads`, saved at `uri`; registering the same name, version and content again is a no-op.

    Pass the head set as loaded from `uri` (`HeadSet.load` checks the files against their content hash): the
    registry then records what was verified, not what a folder's headset.json claims, so every replica that
    later loads `uri` finds that hash. Only its metadata is read here.
    """
    dim, num_heads = heads.dim, heads.num_heads
    if not (isinstance(dim, int) and isinstance(num_heads, int) and dim > 0 and num_heads > 0):
        raise InvalidInput(f"dim and num_heads must be positive integers, got {dim!r} and {num_heads!r}")
    names = [checks.text(n, f"head_names[{i}]", NAME_MAX, empty_ok=False) for i, n in enumerate(heads.head_names)]
    if len(names) != num_heads:
        raise InvalidInput(f"{len(names)} head names for {num_heads} heads")
    name, version, content_hash = heads.name, heads.version, heads.content_hash
    version = str(version) if isinstance(version, int) else version  # `"version": 2` in a hand-written file
    head_set = HeadSetRow(
        name=checks.text(name, "head set name", HEAD_SET_NAME_MAX, empty_ok=False),
        version=checks.text(version, "head set version", VERSION_MAX, empty_ok=False),
        kind=checks.choice(heads.kind, "kind", KINDS),
        backbone=checks.text(heads.backbone, "backbone", NAME_MAX, empty_ok=False),
        dim=dim,
        num_heads=num_heads,
        head_names=names,
        default_weights=checks.vector(heads.default_weights, num_heads, "default_weights"),
        uri=checks.text(uri, "uri", URI_MAX, empty_ok=False),
        content_hash=checks.text(content_hash, "content_hash", 128, empty_ok=False),
    )
    same_version = (HeadSetRow.name == name) & (HeadSetRow.version == version)
    existing = session.scalar(sa.select(HeadSetRow).where(same_version))
    if existing is None:
        try:
            with session.begin_nested():  # a savepoint: a concurrent registration may win the insert
                session.add(head_set)
        except IntegrityError:
            existing = session.scalar(sa.select(HeadSetRow).where(same_version))
            if existing is None:
                raise
    if existing is not None and existing.content_hash != content_hash:
        raise AlreadyExists(f"head set {existing.label} is registered with other content "
                            f"({existing.content_hash}, these heads are {content_hash}): save them under a new "
                            f"version (`rewardprism decompose --version V`, or leave --version out for one named "
                            f"by their content hash) or another name")
    return activate_head_set(session, name, version) if activate else existing or head_set


def get_head_set(session: Session, name: str, version: str | None = None) -> HeadSetRow:
    """A registered version, or the active one of `name` when `version` is None."""
    query = sa.select(HeadSetRow).where(HeadSetRow.name == name)
    query = query.where(HeadSetRow.active if version is None else HeadSetRow.version == version)
    head_set = session.scalar(query)
    if head_set is None:
        raise NotFound(f"no active head set named {name!r}" if version is None
                       else f"unknown head set {name}@{version}")
    return head_set


def list_head_sets(session: Session, name: str | None = None) -> list[HeadSetRow]:
    query = sa.select(HeadSetRow).order_by(HeadSetRow.name, HeadSetRow.created_at, HeadSetRow.id)
    return list(session.scalars(query if name is None else query.where(HeadSetRow.name == name)))


def activate_head_set(session: Session, name: str, version: str) -> HeadSetRow:
    """Make this version the one served for `name`; the previously active one is deactivated."""
    # Concurrent activations of one name queue here, on a transaction-scoped lock on the name (new names
    # included, which have no committed rows to lock). Without it two of them lock each other's rows in the
    # updates below and Postgres aborts one as a deadlock. Profile writes are not blocked. SQLite serializes
    # writers already (BEGIN IMMEDIATE).
    if session.get_bind().dialect.name == "postgresql":
        session.execute(sa.select(sa.func.pg_advisory_xact_lock(ACTIVATION_LOCK, sa.func.hashtext(name))))
    head_set = get_head_set(session, name, version)
    # Deactivate first: the partial unique index allows one active row per name at any moment.
    others = sa.update(HeadSetRow).where(HeadSetRow.name == name, HeadSetRow.id != head_set.id)
    session.execute(others.values(active=False))
    head_set.active = True
    session.flush()
    return head_set

