"""What makes a delete, a disable or a revoke immediate everywhere: the auth epoch and user tombstones.

Services cache verified keys. Every write that takes access away (`delete_user`, `set_user_disabled`,
`revoke_api_key`) bumps the one-row auth epoch in its own transaction; a cached key is trusted only while the
epoch it was verified at is still current, so a change committed through any replica (or the CLI) is seen by
the next wave of requests on every replica. A deleted user leaves a tombstone, so feedback for that id is
refused (`UserDeleted`) instead of creating the user again.
"""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from rewardprism.store.models import AuthEpoch, DeletedUser, utcnow


def auth_epoch(session: Session) -> int:
    return session.scalar(sa.select(AuthEpoch.epoch).where(AuthEpoch.id == 1)) or 0


def bump_auth_epoch(session: Session) -> None:
    """Invalidate every replica's cached keys when the caller's transaction commits."""
    session.execute(sa.update(AuthEpoch).where(AuthEpoch.id == 1).values(epoch=AuthEpoch.epoch + 1))


def bury_user(session: Session, external_id: str) -> None:
    """Leave a tombstone for a user being deleted (or refresh one left by an earlier deletion)."""
    tombstone = session.get(DeletedUser, external_id)
    if tombstone is None:
        session.add(DeletedUser(external_id=external_id))
    else:
        tombstone.deleted_at = utcnow()
    session.flush()


def unbury_user(session: Session, external_id: str) -> None:
    """An explicit create or import brings a deleted id back."""
    session.execute(sa.delete(DeletedUser).where(DeletedUser.external_id == external_id))


def was_deleted(session: Session, external_id: str) -> bool:
    return session.get(DeletedUser, external_id) is not None
