"""Users: created by external id, listed, disabled, deleted (their rows go with them)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, contains_eager, selectinload

from rewardprism.store import checks
from rewardprism.store.config import DEFAULT_LIMITS, Limits
from rewardprism.store.errors import AlreadyExists, InvalidInput, NotFound, UserDeleted
from rewardprism.store.models import EXTERNAL_ID_MAX, NAME_MAX, PROFILE_METHODS, HeadSetRow, ProfileRow, User
from rewardprism.store.revocation import bump_auth_epoch, bury_user, unbury_user, was_deleted

T = TypeVar("T")
MAX_PAGE = 1_000


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    total: int  # matching rows, all pages together
    offset: int
    limit: int



def _find_user(session: Session, external_id: str) -> User | None:
    """The user with their profiles and their head sets, in one query (None if unknown)."""
    query = (
        sa.select(User)
        .outerjoin(User.profiles)
        .outerjoin(ProfileRow.head_set)
        .where(User.external_id == external_id)
        .options(contains_eager(User.profiles).contains_eager(ProfileRow.head_set))
    )
    return session.scalars(query).unique().one_or_none()


def get_user(session: Session, external_id: str) -> User:
    user = _find_user(session, external_id)
    if user is None:
        raise NotFound(f"unknown user {external_id!r}")
    return user


def create_user(
    session: Session,
    external_id: str,
    *,
    display_name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> User:
    """A new user; an id that was deleted may be created again (it is an admin's explicit decision)."""
    user = User(
        external_id=checks.text(external_id, "external id", EXTERNAL_ID_MAX, empty_ok=False),
        display_name=None if display_name is None else checks.text(display_name, "display name", NAME_MAX),
        meta=checks.json_doc(metadata or {}, "metadata", limits.max_metadata_bytes),
    )
    if _find_user(session, external_id) is not None:
        raise AlreadyExists(f"a user with external id {external_id!r} already exists")
    unbury_user(session, user.external_id)
    session.add(user)
    try:
        session.flush()
    except IntegrityError as exc:  # created by a concurrent transaction since the check above
        raise AlreadyExists(f"a user with external id {external_id!r} already exists") from exc
    return user


def get_or_create_user(
    session: Session,
    external_id: str,
    *,
    display_name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> User:
    """The user, created on first sight; safe when two requests for a new user race (savepoint).

    A deleted user is not created again this way (UserDeleted): only an explicit `create_user` brings them back.
    """
    user = _find_user(session, external_id)
    if user is not None:
        return user
    if was_deleted(session, external_id):
        raise UserDeleted(f"user {external_id!r} was deleted; an admin must create them again before feedback")
    try:
        with session.begin_nested():
            return create_user(session, external_id, display_name=display_name, metadata=metadata,
                               limits=limits)
    except AlreadyExists:
        return get_user(session, external_id)


def set_user_disabled(session: Session, external_id: str, disabled: bool) -> User:
    user = get_user(session, external_id)
    user.disabled = disabled
    bump_auth_epoch(session)  # their cached keys stop working on every replica
    session.flush()
    return user


def list_users(
    session: Session,
    *,
    offset: int = 0,
    limit: int = 50,
    search: str | None = None,
    disabled: bool | None = None,
    method: str | None = None,
    head_set_name: str | None = None,
) -> Page[User]:
    """Users in creation order, each with its profiles loaded; `search` matches external id or display name,
    `method` and `head_set_name` users with any profile that matches."""
    if offset < 0 or not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(f"need offset >= 0 and 1 <= limit <= {MAX_PAGE}; got {offset} and {limit}")
    query = sa.select(User)
    if search:
        query = query.where(sa.or_(User.external_id.icontains(search, autoescape=True),
                                  User.display_name.icontains(search, autoescape=True)))
    if disabled is not None:
        query = query.where(User.disabled == disabled)
    if method is not None:
        query = query.where(User.profiles.any(ProfileRow.method == checks.choice(method, "method", PROFILE_METHODS)))
    if head_set_name is not None:
        query = query.where(User.profiles.any(ProfileRow.head_set.has(HeadSetRow.name == head_set_name)))
    total = session.scalar(sa.select(sa.func.count()).select_from(query.subquery())) or 0
    page = query.options(selectinload(User.profiles).joinedload(ProfileRow.head_set))
    items = session.scalars(page.order_by(User.id).offset(offset).limit(limit)).all()
    return Page(items=list(items), total=total, offset=offset, limit=limit)


def delete_user(session: Session, external_id: str) -> None:
    """Delete the user; the database deletes their profile, feedback and API keys (ON DELETE CASCADE).

    A tombstone stays (feedback cannot bring them back) and the auth epoch moves (their keys stop at once).
    """
    session.delete(get_user(session, external_id))
    bury_user(session, external_id)
    bump_auth_epoch(session)
    session.flush()

