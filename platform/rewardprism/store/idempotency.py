"""Idempotent writes: the first answer to a request sent with an `Idempotency-Key`, stored with the write.

The caller checks (`replay`) and records (`remember`) inside the write's own transaction, so a write never
commits without its answer, nor an answer without its write, and every replica sees both. Answers are kept
`ttl_s` seconds; `forget_expired` deletes older ones (an expired one is also ignored, and replaced).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from rewardprism.store.models import IdempotentAnswer, utcnow


@dataclass(frozen=True)
class IdempotentRequest:
    owner: str  # the caller's key prefix
    key: str  # the client's Idempotency-Key
    fingerprint: str  # sha256 of method, path and body
    status: int  # what the write answers with when it succeeds
    ttl_s: float


def replay(session: Session, request: IdempotentRequest) -> IdempotentAnswer | None:
    """The stored answer for this key, if one is still kept (whatever its fingerprint: the caller compares)."""
    answer = session.get(IdempotentAnswer, (request.owner, request.key))
    if answer is not None and answer.created_at < utcnow() - timedelta(seconds=request.ttl_s):
        session.delete(answer)
        session.flush()
        return None
    return answer


def remember(session: Session, request: IdempotentRequest, body: Any) -> None:
    """Store the answer in the caller's transaction (a concurrent twin fails on the primary key: a retry
    of either replays the one that committed)."""
    session.add(IdempotentAnswer(owner=request.owner, key=request.key, fingerprint=request.fingerprint,
                                 status=request.status, body=body))
    session.flush()


def forget_expired(session: Session, ttl_s: float) -> int:
    """Delete answers older than `ttl_s`; how many."""
    done = session.execute(sa.delete(IdempotentAnswer)
                           .where(IdempotentAnswer.created_at < utcnow() - timedelta(seconds=ttl_s)))
    return done.rowcount or 0
