"""Profiles and feedback: a user's weights over one head-set version, and the pairs they were adapted from."""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, contains_eager
from sqlalchemy.orm.attributes import flag_modified
from sqlalchemy.orm.exc import StaleDataError

from rewardprism.store import checks
from rewardprism.store.config import DEFAULT_LIMITS, Limits
from rewardprism.store.errors import InvalidInput, ProfileConflict, UserDisabled
from rewardprism.store.models import (
    POPULATION_METHOD,
    PROFILE_METHODS,
    QUERY_ID_MAX,
    SOURCE_MAX,
    Feedback,
    HeadSetRow,
    ProfileRow,
    User,
)
from rewardprism.store.users import get_user

QUERY_ID = re.compile(r"(pool:(0|[1-9][0-9]{0,9}):(0|[1-9][0-9]{0,9})|resp:[0-9a-f]{40})\Z")  # as schemas.QueryId


@dataclass(frozen=True)
class FeedbackPair:
    """One labelled pair as a client sends it: `chosen` was preferred over `rejected` for `prompt`."""

    prompt: str | list[dict[str, str]]  # text, or chat messages [{"role": ..., "content": ...}]
    chosen: str
    rejected: str
    source: str = "api"
    query_id: str | None = None  # the query it answers, when the client cites one (checked by the service)


@dataclass(frozen=True)
class ProfileUpdate:
    """What an adapter returns: the new weights and how they were obtained."""

    weights: Sequence[float]
    method: str
    bias: float = 0.0


# Given the profile (None before the first) and all of the user's feedback, oldest first (the new pairs last).
Adapter = Callable[[ProfileRow | None, Sequence[Feedback]], ProfileUpdate]


def _prompt(value: object, max_chars: int) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        return checks.text(value, "prompt", max_chars, empty_ok=False)
    if not isinstance(value, list) or not value:
        raise InvalidInput("prompt must be text or a non-empty list of chat messages {role, content}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping) or set(message) != {"role", "content"}:
            raise InvalidInput(f"prompt message {i} must be an object with exactly 'role' and 'content'")
        messages.append({"role": checks.text(message["role"], f"prompt message {i} role", 64, empty_ok=False),
                         "content": checks.text(message["content"], f"prompt message {i} content", max_chars)})
    total = sum(len(m["content"]) for m in messages)
    if total > max_chars:
        raise InvalidInput(f"prompt messages have {total} characters together, over the limit of {max_chars}")
    return messages


def feedback_row(pair: FeedbackPair, limits: Limits) -> Feedback:
    """A checked, not yet attached Feedback row (the caller sets user_id)."""
    return Feedback(
        prompt=_prompt(pair.prompt, limits.max_text_chars),
        chosen=checks.text(pair.chosen, "chosen", limits.max_text_chars),
        rejected=checks.text(pair.rejected, "rejected", limits.max_text_chars),
        source=checks.text(pair.source, "source", SOURCE_MAX, empty_ok=False),
        query_id=None if pair.query_id is None else _query_id(pair.query_id),
    )


def _query_id(value: str) -> str:
    """A query id as the service hands them out (an import may carry anything): answered pools parse it."""
    value = checks.text(value, "query_id", QUERY_ID_MAX, empty_ok=False)
    if not QUERY_ID.match(value):
        raise InvalidInput(f"query_id {value!r} must be pool:<id>:<position> or resp:<40 hex digits>")
    return value


def check_feedback_pair(pair: FeedbackPair, limits: Limits = DEFAULT_LIMITS) -> None:
    """Raise InvalidInput exactly as storing `pair` would: a caller can refuse it before costly work."""
    feedback_row(pair, limits)



def get_profile(session: Session, external_id: str, head_set: HeadSetRow) -> ProfileRow | None:
    """The user's profile over `head_set`, with its user and head set, in one query: the scoring fast path."""
    query = (
        sa.select(ProfileRow)
        .join(ProfileRow.user)
        .join(ProfileRow.head_set)
        .where(User.external_id == external_id, ProfileRow.head_set_id == head_set.id)
        .options(contains_eager(ProfileRow.user), contains_eager(ProfileRow.head_set))
    )
    return session.scalars(query).one_or_none()


def checked_update(
    update: ProfileUpdate, head_set: HeadSetRow, n_pairs: int | None
) -> tuple[list[float], float, str]:
    if n_pairs is not None and not 0 <= n_pairs <= checks.MAX_COUNT:
        raise InvalidInput(f"n_pairs must be from 0 to {checks.MAX_COUNT}, got {n_pairs}")
    method = checks.choice(update.method, "method", PROFILE_METHODS)
    return checks.vector(update.weights, head_set), checks.weight(update.bias, "bias"), method


def write_profile(
    session: Session,
    user: User,
    head_set: HeadSetRow,
    expected_version: int | None,
    update: ProfileUpdate,
    n_pairs: int | None,
    new_feedback: Sequence[Feedback] = (),
) -> ProfileRow:
    """Check everything, then add `new_feedback` and write the user's profile over `head_set`: on any error
    nothing was added. The user's profiles over other head sets are left as they are."""
    external_id = user.external_id  # for the errors: a failed flush expires `user`
    if user.disabled:
        raise UserDisabled(f"user {external_id!r} is disabled")
    profile = user.profile_on(head_set.id)
    if (profile.version if profile else None) != expected_version:
        raise ProfileConflict(external_id, expected_version)
    weights, bias, method = checked_update(update, head_set, n_pairs)
    for row in new_feedback:
        row.user_id = user.id
    session.add_all(new_feedback)
    if profile is None:
        profile = ProfileRow(user=user, head_set=head_set, weights=weights, bias=bias, method=method,
                             n_pairs=n_pairs or 0)
        session.add(profile)
    else:
        profile.weights, profile.bias, profile.method = weights, bias, method
        if n_pairs is not None:
            profile.n_pairs = n_pairs
        flag_modified(profile, "weights")  # always UPDATE, so the version moves even when nothing else did
    try:
        session.flush()  # UPDATE ... WHERE version = <loaded>: zero rows means another writer won
    except (StaleDataError, IntegrityError) as exc:  # IntegrityError: a concurrent first profile
        raise ProfileConflict(external_id, expected_version) from exc
    return profile


def save_profile(
    session: Session,
    external_id: str,
    weights: Sequence[float],
    *,
    head_set: HeadSetRow,
    expected_version: int | None,
    method: str,
    bias: float = 0.0,
    n_pairs: int | None = None,
) -> ProfileRow:
    """Write the user's weights over `head_set` if that profile is still at `expected_version` (None: none yet).

    Raises ProfileConflict when another writer got there first: roll back and retry (see commit_with_retry).
    """
    update = ProfileUpdate(weights=weights, method=method, bias=bias)
    return write_profile(session, get_user(session, external_id), head_set, expected_version, update, n_pairs)


def reset_profile(session: Session, external_id: str, head_set: HeadSetRow) -> ProfileRow:
    """Back to `head_set`'s default weights, as if the user had given no feedback."""
    user = get_user(session, external_id)
    current = user.profile_on(head_set.id)
    update = ProfileUpdate(weights=head_set.default_weights, method=POPULATION_METHOD)
    return write_profile(session, user, head_set, current.version if current else None, update, n_pairs=0)


def append_feedback_and_update_profile(
    session: Session,
    external_id: str,
    pairs: Sequence[FeedbackPair],
    adapt: Adapter,
    head_set: HeadSetRow,
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> ProfileRow:
    """Store the user's new pairs and re-adapt their profile over `head_set` from all their feedback, in one
    transaction.

    `adapt` sees the stored pairs and then the new ones (not yet written); nothing is written unless its
    result is valid. The profile is read before the feedback, so its version covers every pair `adapt` sees:
    a writer that commits in between has bumped the version, and this write fails with ProfileConflict.
    """
    if not 1 <= len(pairs) <= limits.max_pairs_per_call:
        raise InvalidInput(f"send between 1 and {limits.max_pairs_per_call} pairs, got {len(pairs)}")
    rows = [feedback_row(pair, limits) for pair in pairs]
    user = get_user(session, external_id)
    if user.disabled:  # checked again when writing, but before `adapt`: it may be costly
        raise UserDisabled(f"user {external_id!r} is disabled")
    current = user.profile_on(head_set.id)
    expected_version = current.version if current else None
    history = [*feedback_of(session, user), *rows]
    update = adapt(current, history)
    return write_profile(session, user, head_set, expected_version, update, n_pairs=len(history),
                         new_feedback=rows)


def feedback_of(session: Session, user: User) -> list[Feedback]:
    return list(session.scalars(sa.select(Feedback).where(Feedback.user_id == user.id).order_by(Feedback.id)))


def list_feedback(session: Session, external_id: str) -> list[Feedback]:
    """The user's feedback, oldest first."""
    return feedback_of(session, get_user(session, external_id))
