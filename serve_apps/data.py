"""The service's reads, on top of the store's models and repository (writes go through the repository).

Everything here runs in a worker thread with a session the caller opened; nothing commits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from rewardprism.scoring import Profile, Revision, UserState
from rewardprism.store import HASH_SCHEME, HeadSetRow, ProfileRow, User, auth_epoch, verify_api_key
from sqlalchemy.orm import Session


@dataclass(frozen=True)
class Caller:
    """An authenticated API key: its public prefix (for audit), scopes, and the user it is bound to, if any."""

    key: str
    scopes: frozenset[str]
    user: str | None

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


def to_profile(row: ProfileRow) -> Profile:
    return Profile(np.asarray(row.weights, dtype=np.float64), float(row.bias), row.head_set.content_hash,
                   row.version, row.created_at)


def read_user_states(session: Session, external_ids: list[str]) -> dict[str, UserState]:
    """Each user's state, in one query without ORM objects (the scoring fast path, for cache misses)."""
    rows = session.execute(
        sa.select(User.external_id, ProfileRow.version, ProfileRow.created_at, ProfileRow.weights, ProfileRow.bias,
                  HeadSetRow.content_hash)
        .select_from(User).outerjoin(User.profile).outerjoin(ProfileRow.head_set)
        .where(User.external_id.in_(external_ids))).all()
    found = {user: UserState(True, None if version is None else Profile(
        np.asarray(weights, dtype=np.float64), float(bias), content_hash, version, created_at))
        for user, version, created_at, weights, bias, content_hash in rows}
    return {user: found.get(user, UserState(False)) for user in external_ids}


def current_revisions(session: Session, external_ids: list[str]) -> dict[str, Revision]:
    """Each user's `UserState.revision`, in one query; users not found are (False, None, None)."""
    rows = session.execute(sa.select(User.external_id, ProfileRow.version, ProfileRow.created_at)
                           .select_from(User).outerjoin(User.profile)
                           .where(User.external_id.in_(external_ids))).all()
    found = {user: (True, version, created_at) for user, version, created_at in rows}
    return {user: found.get(user, (False, None, None)) for user in external_ids}


def active_head_set(session: Session, name: str) -> HeadSetRow | None:
    return session.scalar(sa.select(HeadSetRow).where(HeadSetRow.name == name, HeadSetRow.active))


@dataclass(frozen=True)
class Verified:
    caller: Caller
    epoch: int  # the auth epoch it was verified at, read before the key
    outdated_hash: bool  # stored with an old hash scheme: rehash it (`store.upgrade_api_key_hash`)


def authenticate(session: Session, token: str) -> Verified:
    epoch = auth_epoch(session)  # first: a revoke committed in between moves it past what is cached
    key = verify_api_key(session, token)
    caller = Caller(key.prefix, frozenset(key.scopes), None if key.user is None else key.user.external_id)
    return Verified(caller, epoch, key.hash_scheme != HASH_SCHEME)


def auth_epochs(session: Session, keys: list[str]) -> dict[str, int]:
    """The auth epoch, for every waiter of a `Coalesced` wave (they all ask for the one value)."""
    epoch = auth_epoch(session)
    return dict.fromkeys(keys, epoch)
