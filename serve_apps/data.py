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


UserOnHeadSet = tuple[int, str]  # (head-set row id, external id): whose profile, over which head set


def _profiles_on(query: sa.Select, keys: list[UserOnHeadSet]) -> sa.Select:
    """`query` over the keys' users, left-joined to their profiles over the keys' head sets (one, but for the
    moment an activation reaches the replica)."""
    joined = query.select_from(User).outerjoin(
        ProfileRow, sa.and_(ProfileRow.user_id == User.id, ProfileRow.head_set_id.in_({h for h, _ in keys})))
    return joined.where(User.external_id.in_({u for _, u in keys}))


def read_user_states(session: Session, keys: list[UserOnHeadSet]) -> dict[UserOnHeadSet, UserState]:
    """Each user's state over the head set of their key, in one query without ORM objects (for cache misses)."""
    rows = session.execute(_profiles_on(
        sa.select(User.external_id, ProfileRow.head_set_id, ProfileRow.version, ProfileRow.created_at,
                  ProfileRow.weights, ProfileRow.bias, HeadSetRow.content_hash), keys)
        .outerjoin(HeadSetRow, HeadSetRow.id == ProfileRow.head_set_id)).all()
    found: dict[UserOnHeadSet, UserState] = {}
    for user, head_set_id, version, created_at, weights, bias, content_hash in rows:
        found[(None, user)] = UserState(True)  # known, whatever profiles they have
        if version is not None:
            found[(head_set_id, user)] = UserState(True, Profile(
                np.asarray(weights, dtype=np.float64), float(bias), content_hash, version, created_at))
    return {key: found.get(key) or found.get((None, key[1]), UserState(False)) for key in keys}


def current_revisions(session: Session, keys: list[UserOnHeadSet]) -> dict[UserOnHeadSet, Revision]:
    """Each user's `UserState.revision` over the head set of their key, in one query; unknown users are
    (False, None, None)."""
    rows = session.execute(_profiles_on(
        sa.select(User.external_id, ProfileRow.head_set_id, ProfileRow.version, ProfileRow.created_at), keys)).all()
    found: dict[tuple[int | None, str], Revision] = {}
    for user, head_set_id, version, created_at in rows:
        found[(None, user)] = (True, None, None)
        if version is not None:
            found[(head_set_id, user)] = (True, version, created_at)
    return {key: found.get(key) or found.get((None, key[1]), (False, None, None)) for key in keys}


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
