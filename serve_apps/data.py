"""The service's reads, on top of the store's models and repository (writes go through the repository).

Everything here runs in a worker thread with a session the caller opened; nothing commits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from rewardprism.scoring import Profile, UserState
from rewardprism.store import HeadSet, NotFound, User, get_user, verify_api_key
from rewardprism.store import Profile as ProfileRow
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
                   row.version)


def read_user_state(session: Session, external_id: str) -> UserState:
    try:
        user = get_user(session, external_id)
    except NotFound:
        return UserState(False)
    return UserState(True, None if user.profile is None else to_profile(user.profile))


def current_versions(session: Session, external_ids: list[str]) -> dict[str, tuple[bool, int | None]]:
    """(user exists, profile version) of each user, in one query; users not found are (False, None)."""
    rows = session.execute(sa.select(User.external_id, ProfileRow.version).select_from(User)
                           .outerjoin(User.profile).where(User.external_id.in_(external_ids))).all()
    found = {user: (True, version) for user, version in rows}
    return {user: found.get(user, (False, None)) for user in external_ids}


def active_head_set(session: Session, name: str) -> HeadSet | None:
    return session.scalar(sa.select(HeadSet).where(HeadSet.name == name, HeadSet.active))


def authenticate(session: Session, token: str) -> Caller:
    key = verify_api_key(session, token)
    return Caller(key.prefix, frozenset(key.scopes), None if key.user is None else key.user.external_id)
