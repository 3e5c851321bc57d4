"""Query pools: candidate pairs registered with a head-set version, stored with their head scores.

A pool is what `POST /v1/users/{id}/queries` chooses from (`rewardprism.select`). Its head-score gaps are one
float32 blob, read whole by a replica and cached; its texts are read only for the pairs a query returns. A query
id names a pool pair as `pool:<pool id>:<position>`; feedback that cites one is checked against the pair.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer

from rewardprism.store import checks
from rewardprism.store.config import DEFAULT_LIMITS, Limits
from rewardprism.store.errors import AlreadyExists, InvalidInput, NotFound
from rewardprism.store.models import HEAD_SET_NAME_MAX, Feedback, HeadSetRow, QueryPool, QueryPoolPair, User
from rewardprism.store.profiles import _prompt

MAX_POOL_PAIRS = 1_000_000
MAX_ID = 2**31 - 1  # pool ids and positions are 32-bit columns: a larger one names no row (and Postgres refuses it)
POOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
POOL_QUERY = re.compile(r"^pool:(\d{1,10}):(\d{1,10})$")


def pool_query_id(pool_id: int, position: int) -> str:
    return f"pool:{pool_id}:{position}"


def checked_pool_name(name: object) -> str:
    """`name` if it can name a pool (checked before any costly work), else InvalidInput saying why."""
    name = checks.text(name, "pool name", HEAD_SET_NAME_MAX, empty_ok=False)
    if not POOL_NAME.match(name):
        raise InvalidInput(f"pool name {name!r} must be letters, digits, '.', '_' or '-', starting with a letter "
                           "or digit")
    return name


def register_query_pool(session: Session, head_set: HeadSetRow, name: str,
                        pairs: Sequence[tuple[str | list[dict[str, str]], str, str]], gaps: np.ndarray, *,
                        limits: Limits = DEFAULT_LIMITS) -> QueryPool:
    """Store `pairs` (prompt, response a, response b) with their head-score gaps s(a) − s(b), (N, num_heads)."""
    name = checked_pool_name(name)
    gaps = np.asarray(gaps)
    if gaps.shape != (len(pairs), head_set.num_heads):
        raise InvalidInput(f"gaps must be (pairs, heads) = {(len(pairs), head_set.num_heads)}, got {gaps.shape}")
    if not 1 <= len(pairs) <= MAX_POOL_PAIRS:
        raise InvalidInput(f"a pool holds between 1 and {MAX_POOL_PAIRS} pairs, got {len(pairs)}")
    gaps = gaps.astype("<f4")
    if not np.isfinite(gaps).all():
        raise InvalidInput("gaps hold NaN or inf (or values beyond float32)")
    rows = [QueryPoolPair(position=i, prompt=_prompt(prompt, limits.max_text_chars),
                          response_a=checks.text(a, f"pairs[{i}] response a", limits.max_text_chars),
                          response_b=checks.text(b, f"pairs[{i}] response b", limits.max_text_chars))
            for i, (prompt, a, b) in enumerate(pairs)]
    pool = QueryPool(head_set_id=head_set.id, name=name, size=len(rows), gaps=gaps.tobytes())
    try:
        with session.begin_nested():
            session.add(pool)
            session.flush()
    except IntegrityError:
        raise AlreadyExists(f"head set {head_set.label} already has a pool named {name!r}") from None
    for row in rows:
        row.pool_id = pool.id
    session.add_all(rows)
    session.flush()
    return pool


def list_query_pools(session: Session, head_set: HeadSetRow) -> list[QueryPool]:
    query = sa.select(QueryPool).options(defer(QueryPool.gaps)).where(QueryPool.head_set_id == head_set.id)
    return list(session.scalars(query.order_by(QueryPool.name)))


def get_query_pool(session: Session, head_set: HeadSetRow, name: str) -> QueryPool:
    """The pool without its gaps (`pool_gaps` reads them: a replica that has them cached skips the blob)."""
    pool = session.scalar(sa.select(QueryPool).options(defer(QueryPool.gaps))
                          .where((QueryPool.head_set_id == head_set.id) & (QueryPool.name == name)))
    if pool is None:
        raise NotFound(f"head set {head_set.label} has no pool named {name!r}")
    return pool


def pool_gaps(session: Session, pool_id: int, num_heads: int) -> np.ndarray:
    """(size, num_heads) float32 gaps s(a) − s(b) of the pool's pairs."""
    size, blob = session.execute(sa.select(QueryPool.size, QueryPool.gaps).where(QueryPool.id == pool_id)).one()
    return np.frombuffer(blob, dtype="<f4").reshape(size, num_heads)


def pool_pairs(session: Session, pool_id: int, positions: Sequence[int]) -> dict[int, QueryPoolPair]:
    """The pool's pairs at `positions`, by position."""
    positions = [int(p) for p in positions if 0 <= int(p) <= MAX_ID]
    if not 0 <= pool_id <= MAX_ID:
        return {}
    rows = session.scalars(sa.select(QueryPoolPair).where((QueryPoolPair.pool_id == pool_id)
                                                          & QueryPoolPair.position.in_(positions)))
    return {row.position: row for row in rows}


def answered_positions(session: Session, user: User | None, pool: QueryPool) -> set[int]:
    """Positions of the pool's pairs this user has already labelled (feedback citing their query ids); an
    imported citation past the pool's end (another database's pool) is none of them."""
    if user is None:
        return set()
    prefix = f"pool:{pool.id}:"
    cited = session.scalars(sa.select(Feedback.query_id).where((Feedback.user_id == user.id)
                                                               & Feedback.query_id.startswith(prefix)))
    return {position for q in cited if (position := int(q[len(prefix):])) < pool.size}
