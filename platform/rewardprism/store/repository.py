"""The operations services and the admin CLI need, over a caller-owned Session.

Helpers never commit: the caller owns the transaction (as in the full-stack FastAPI template), so "store the
feedback and update the profile" commits or rolls back as one. `commit_with_retry` is the one wrapper that
commits. Every write validates its input first and raises a StoreError subclass before touching the database,
so bad input leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import numbers
import random
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, contains_eager, sessionmaker
from sqlalchemy.orm.attributes import flag_modified
from sqlalchemy.orm.exc import StaleDataError

from rewardprism.store.config import Limits
from rewardprism.store.errors import (
    AlreadyExists,
    InvalidApiKey,
    InvalidInput,
    MissingScope,
    NotFound,
    ProfileConflict,
    UserDisabled,
)
from rewardprism.store.models import (
    EXTERNAL_ID_MAX,
    HEAD_SET_NAME_MAX,
    KINDS,
    NAME_MAX,
    POPULATION_METHOD,
    PROFILE_METHODS,
    SCOPES,
    SOURCE_MAX,
    URI_MAX,
    VERSION_MAX,
    ApiKey,
    AuditEntry,
    Feedback,
    HeadSetRow,
    ProfileRow,
    User,
    utcnow,
)

T = TypeVar("T")
DEFAULT_LIMITS = Limits()
EXPORT_FORMAT = "rewardprism.user/1"
MAX_PAGE = 1_000
# scrypt cost: ~16 MiB and tens of ms per check; services cache verified keys rather than lower this.
ACTIVATION_LOCK = 0x52500001  # advisory-lock namespace ("RP", 1): head-set activations, keyed by name
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}


# ---------------------------------------------------------------------------------------------- value types


@dataclass(frozen=True)
class FeedbackPair:
    """One labelled pair as a client sends it: `chosen` was preferred over `rejected` for `prompt`."""

    prompt: str | list[dict[str, str]]  # text, or chat messages [{"role": ..., "content": ...}]
    chosen: str
    rejected: str
    source: str = "api"


@dataclass(frozen=True)
class ProfileUpdate:
    """What an adapter returns: the new weights and how they were obtained."""

    weights: Sequence[float]
    method: str
    bias: float = 0.0
    head_set: HeadSetRow | None = None  # None keeps the profile's; required for a user's first profile


# Given the profile (None before the first) and all of the user's feedback, oldest first (the new pairs last).
Adapter = Callable[[ProfileRow | None, Sequence[Feedback]], ProfileUpdate]


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    total: int  # matching rows, all pages together
    offset: int
    limit: int


# ---------------------------------------------------------------------------------------------- transactions


def commit_with_retry(
    sessions: sessionmaker[Session], work: Callable[[Session], T], *, attempts: int = 10
) -> T:
    """Run `work` in a transaction of its own and commit it; on ProfileConflict roll back and run it again.

    Only conflicts are retried: after a lost connection the commit may or may not have happened.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            with sessions.begin() as session:
                return work(session)
        except ProfileConflict:
            if attempt >= attempts:
                raise
            time.sleep(random.uniform(0, 0.002 * attempt))  # jitter: the losers should not collide again


# ---------------------------------------------------------------------------------------------- validation


MAX_COUNT = 2**31 - 1  # integer columns are 32-bit on Postgres


def _text(value: object, what: str, max_chars: int, *, empty_ok: bool = True) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {type(value).__name__}")
    if not empty_ok and not value.strip():
        raise InvalidInput(f"{what} must not be empty")
    if len(value) > max_chars:
        raise InvalidInput(f"{what} has {len(value)} characters, more than the limit of {max_chars}")
    if "\x00" in value or not value.isascii() and not _encodable(value):
        raise InvalidInput(f"{what} must be valid Unicode text without NUL characters")
    return value


def _encodable(text: str) -> bool:
    """False for text no database can store: lone surrogates (which a JSON escape can carry) do not encode."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _json_doc(value: object, what: str, max_bytes: int) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{what} must be a JSON object, got {type(value).__name__}")
    try:  # UnicodeEncodeError (a lone surrogate) is a ValueError
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        size = len(text.encode())
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{what} is not plain JSON: {exc}") from None
    if "\x00" in text:  # JSONB refuses NUL
        raise InvalidInput(f"{what} must not contain NUL characters")
    if size > max_bytes:
        raise InvalidInput(f"{what} takes {size} bytes as JSON, more than the limit of {max_bytes}")
    return dict(value)


def _finite(value: object, what: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):  # numpy scalars are Real too
        raise InvalidInput(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidInput(f"{what} must be finite, got {value}")
    return float(value)


def _vector(values: Iterable[object], head_set: HeadSetRow | int, what: str = "weights") -> list[float]:
    """Finite floats, one per head of `head_set` (or a count, while the head set is being registered)."""
    try:
        vector = [_finite(v, f"{what}[{i}]") for i, v in enumerate(values)]
    except TypeError:
        raise InvalidInput(f"{what} must be a list of numbers") from None
    expected = head_set if isinstance(head_set, int) else head_set.num_heads
    if len(vector) != expected:
        of = "" if isinstance(head_set, int) else f" of head set {head_set.label}"
        raise InvalidInput(f"{what} has {len(vector)} values, but there are {expected} heads{of}")
    return vector


def _choice(value: object, what: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise InvalidInput(f"{what} must be one of {', '.join(allowed)}; got {value!r}")
    return str(value)


def _prompt(value: object, max_chars: int) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        return _text(value, "prompt", max_chars, empty_ok=False)
    if not isinstance(value, list) or not value:
        raise InvalidInput("prompt must be text or a non-empty list of chat messages {role, content}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping) or set(message) != {"role", "content"}:
            raise InvalidInput(f"prompt message {i} must be an object with exactly 'role' and 'content'")
        messages.append({"role": _text(message["role"], f"prompt message {i} role", 64, empty_ok=False),
                         "content": _text(message["content"], f"prompt message {i} content", max_chars)})
    total = sum(len(m["content"]) for m in messages)
    if total > max_chars:
        raise InvalidInput(f"prompt messages have {total} characters together, over the limit of {max_chars}")
    return messages


def _feedback_row(pair: FeedbackPair, limits: Limits) -> Feedback:
    """A checked, not yet attached Feedback row (the caller sets user_id)."""
    return Feedback(
        prompt=_prompt(pair.prompt, limits.max_text_chars),
        chosen=_text(pair.chosen, "chosen", limits.max_text_chars),
        rejected=_text(pair.rejected, "rejected", limits.max_text_chars),
        source=_text(pair.source, "source", SOURCE_MAX, empty_ok=False),
    )


def check_feedback_pair(pair: FeedbackPair, limits: Limits = DEFAULT_LIMITS) -> None:
    """Raise InvalidInput exactly as storing `pair` would: a caller can refuse it before costly work."""
    _feedback_row(pair, limits)


def _scopes(scopes: Iterable[str]) -> list[str]:
    chosen = sorted(set(scopes))
    unknown = [s for s in chosen if s not in SCOPES]
    if unknown or not chosen:
        raise InvalidInput(f"scopes must be a non-empty subset of {', '.join(SCOPES)}; got {chosen}")
    return chosen


def _timestamp(value: object, what: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        raise InvalidInput(f"{what} must be an ISO 8601 timestamp, got {value!r}") from None
    return parsed.astimezone(timezone.utc) if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


# ---------------------------------------------------------------------------------------------- users


def _find_user(session: Session, external_id: str) -> User | None:
    """The user with their profile and its head set, in one query (None if unknown)."""
    query = (
        sa.select(User)
        .outerjoin(User.profile)
        .outerjoin(ProfileRow.head_set)
        .where(User.external_id == external_id)
        .options(contains_eager(User.profile).contains_eager(ProfileRow.head_set))
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
    user = User(
        external_id=_text(external_id, "external id", EXTERNAL_ID_MAX, empty_ok=False),
        display_name=None if display_name is None else _text(display_name, "display name", NAME_MAX),
        meta=_json_doc(metadata or {}, "metadata", limits.max_metadata_bytes),
    )
    if _find_user(session, external_id) is not None:
        raise AlreadyExists(f"a user with external id {external_id!r} already exists")
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
    """The user, created on first sight; safe when two requests for a new user race (savepoint)."""
    user = _find_user(session, external_id)
    if user is not None:
        return user
    try:
        with session.begin_nested():
            return create_user(session, external_id, display_name=display_name, metadata=metadata,
                               limits=limits)
    except AlreadyExists:
        return get_user(session, external_id)


def set_user_disabled(session: Session, external_id: str, disabled: bool) -> User:
    user = get_user(session, external_id)
    user.disabled = disabled
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
    """Users in creation order, each with its profile loaded; `search` matches external id or display name."""
    if offset < 0 or not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(f"need offset >= 0 and 1 <= limit <= {MAX_PAGE}; got {offset} and {limit}")
    query = sa.select(User).outerjoin(User.profile).outerjoin(ProfileRow.head_set)
    if search:
        query = query.where(sa.or_(User.external_id.icontains(search, autoescape=True),
                                  User.display_name.icontains(search, autoescape=True)))
    if disabled is not None:
        query = query.where(User.disabled == disabled)
    if method is not None:
        query = query.where(ProfileRow.method == _choice(method, "method", PROFILE_METHODS))
    if head_set_name is not None:
        query = query.where(HeadSetRow.name == head_set_name)
    total = session.scalar(sa.select(sa.func.count()).select_from(query.subquery())) or 0
    page = query.options(contains_eager(User.profile).contains_eager(ProfileRow.head_set))
    items = session.scalars(page.order_by(User.id).offset(offset).limit(limit)).unique().all()
    return Page(items=list(items), total=total, offset=offset, limit=limit)


def delete_user(session: Session, external_id: str) -> None:
    """Delete the user; the database deletes their profile, feedback and API keys (ON DELETE CASCADE)."""
    session.delete(get_user(session, external_id))
    session.flush()


# ---------------------------------------------------------------------------------------------- profiles


def get_profile(session: Session, external_id: str) -> ProfileRow | None:
    """The user's profile with its user and head set, in one query: the scoring fast path."""
    query = (
        sa.select(ProfileRow)
        .join(ProfileRow.user)
        .join(ProfileRow.head_set)
        .where(User.external_id == external_id)
        .options(contains_eager(ProfileRow.user), contains_eager(ProfileRow.head_set))
    )
    return session.scalars(query).one_or_none()


def _checked(
    update: ProfileUpdate, head_set: HeadSetRow, n_pairs: int | None
) -> tuple[list[float], float, str]:
    if n_pairs is not None and not 0 <= n_pairs <= MAX_COUNT:
        raise InvalidInput(f"n_pairs must be from 0 to {MAX_COUNT}, got {n_pairs}")
    method = _choice(update.method, "method", PROFILE_METHODS)
    return _vector(update.weights, head_set), _finite(update.bias, "bias"), method


def _write_profile(
    session: Session,
    user: User,
    expected_version: int | None,
    update: ProfileUpdate,
    n_pairs: int | None,
    new_feedback: Sequence[Feedback] = (),
) -> ProfileRow:
    """Check everything, then add `new_feedback` and write the profile: on any error nothing was added."""
    external_id = user.external_id  # for the errors: a failed flush expires `user`
    if user.disabled:
        raise UserDisabled(f"user {external_id!r} is disabled")
    profile = user.profile
    if (profile.version if profile else None) != expected_version:
        raise ProfileConflict(external_id, expected_version)
    head_set = update.head_set or (profile.head_set if profile else None)
    if head_set is None:
        raise InvalidInput(f"user {external_id!r} has no profile yet: name the head set its weights are over")
    weights, bias, method = _checked(update, head_set, n_pairs)
    for row in new_feedback:
        row.user_id = user.id
    session.add_all(new_feedback)
    if profile is None:
        profile = ProfileRow(user=user, head_set=head_set, weights=weights, bias=bias, method=method,
                          n_pairs=n_pairs or 0)
        session.add(profile)
    else:
        profile.head_set, profile.weights, profile.bias, profile.method = head_set, weights, bias, method
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
    expected_version: int | None,
    method: str,
    bias: float = 0.0,
    n_pairs: int | None = None,
    head_set: HeadSetRow | None = None,
) -> ProfileRow:
    """Write the user's weights if their profile is still at `expected_version` (None: they have none yet).

    Raises ProfileConflict when another writer got there first: roll back and retry (see commit_with_retry).
    `head_set` switches the profile to another head set (required for a first profile).
    """
    update = ProfileUpdate(weights=weights, method=method, bias=bias, head_set=head_set)
    return _write_profile(session, get_user(session, external_id), expected_version, update, n_pairs)


def reset_profile(session: Session, external_id: str, head_set: HeadSetRow) -> ProfileRow:
    """Back to `head_set`'s default weights, as if the user had given no feedback."""
    user = get_user(session, external_id)
    update = ProfileUpdate(weights=head_set.default_weights, method=POPULATION_METHOD, head_set=head_set)
    return _write_profile(session, user, user.profile.version if user.profile else None, update, n_pairs=0)


def append_feedback_and_update_profile(
    session: Session,
    external_id: str,
    pairs: Sequence[FeedbackPair],
    adapt: Adapter,
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> ProfileRow:
    """Store the user's new pairs and re-adapt their profile from all their feedback, in one transaction.

    `adapt` sees the stored pairs and then the new ones (not yet written); nothing is written unless its
    result is valid. The profile is read before the feedback, so its version covers every pair `adapt` sees:
    a writer that commits in between has bumped the version, and this write fails with ProfileConflict.
    """
    if not 1 <= len(pairs) <= limits.max_pairs_per_call:
        raise InvalidInput(f"send between 1 and {limits.max_pairs_per_call} pairs, got {len(pairs)}")
    rows = [_feedback_row(pair, limits) for pair in pairs]
    user = get_user(session, external_id)
    if user.disabled:  # checked again when writing, but before `adapt`: it may be costly
        raise UserDisabled(f"user {external_id!r} is disabled")
    expected_version = user.profile.version if user.profile else None
    history = [*_feedback_of(session, user), *rows]
    update = adapt(user.profile, history)
    return _write_profile(session, user, expected_version, update, n_pairs=len(history), new_feedback=rows)


def _feedback_of(session: Session, user: User) -> list[Feedback]:
    return list(session.scalars(sa.select(Feedback).where(Feedback.user_id == user.id).order_by(Feedback.id)))


def list_feedback(session: Session, external_id: str) -> list[Feedback]:
    """The user's feedback, oldest first."""
    return _feedback_of(session, get_user(session, external_id))


# ---------------------------------------------------------------------------------------------- export


def export_user(session: Session, external_id: str) -> dict[str, Any]:
    """The user, their profile and feedback as plain JSON (API keys stay: they belong to a deployment)."""
    user = get_user(session, external_id)
    profile = user.profile
    return {
        "format": EXPORT_FORMAT,
        "external_id": user.external_id,
        "display_name": user.display_name,
        "metadata": user.meta,
        "disabled": user.disabled,
        "created_at": user.created_at.isoformat(),
        "profile": None if profile is None else {
            "head_set": {"name": profile.head_set.name, "version": profile.head_set.version},
            "weights": profile.weights,
            "bias": profile.bias,
            "method": profile.method,
            "n_pairs": profile.n_pairs,
            "version": profile.version,  # informational: an imported profile starts again at version 1
        },
        "feedback": [
            {"prompt": f.prompt, "chosen": f.chosen, "rejected": f.rejected, "source": f.source,
             "created_at": f.created_at.isoformat()}
            for f in _feedback_of(session, user)
        ],
    }


def import_user(session: Session, data: Mapping[str, Any], *, limits: Limits = DEFAULT_LIMITS) -> User:
    """Recreate a user from `export_user` output; every part is checked before the first row is written."""
    if not isinstance(data, Mapping) or data.get("format") != EXPORT_FORMAT:
        raise InvalidInput(f"not a user export: expected an object with format {EXPORT_FORMAT!r}")
    try:
        feedback = list(data["feedback"])
        if len(feedback) > limits.max_pairs_per_call:
            raise InvalidInput(f"the export has {len(feedback)} pairs, over {limits.max_pairs_per_call}")
        rows = [_feedback_row(FeedbackPair(f["prompt"], f["chosen"], f["rejected"], f["source"]), limits)
                for f in feedback]
        for i, (row, f) in enumerate(zip(rows, feedback)):
            row.created_at = _timestamp(f["created_at"], f"feedback[{i}].created_at")
        created_at = _timestamp(data["created_at"], "created_at")
        external_id, display_name, metadata = data["external_id"], data["display_name"], data["metadata"]
        saved, disabled = data["profile"], data["disabled"]
        if not isinstance(disabled, bool):
            raise InvalidInput(f"disabled must be true or false, got {disabled!r}")
        update, n_pairs = None, 0
        if saved is not None:
            name = _text(saved["head_set"]["name"], "profile.head_set.name", HEAD_SET_NAME_MAX, empty_ok=False)
            version = saved["head_set"]["version"]
            version = _text(str(version) if isinstance(version, int) else version, "profile.head_set.version",
                            VERSION_MAX, empty_ok=False)
            head_set = get_head_set(session, name, version)
            update = ProfileUpdate(saved["weights"], saved["method"], saved["bias"], head_set)
            n_pairs = saved["n_pairs"]
            if isinstance(n_pairs, bool) or not isinstance(n_pairs, int):
                raise InvalidInput(f"profile.n_pairs must be an integer, got {n_pairs!r}")
            _checked(update, head_set, n_pairs)
    except InvalidInput:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInput(f"user export is missing or mangles a field: {exc!r}") from None

    user = create_user(session, external_id, display_name=display_name, metadata=metadata, limits=limits)
    user.created_at = created_at
    if update is None:
        for row in rows:
            row.user_id = user.id
        session.add_all(rows)
    else:
        _write_profile(session, user, None, update, n_pairs=n_pairs, new_feedback=rows)
    user.disabled = disabled
    session.flush()
    return user


# ---------------------------------------------------------------------------------------------- head sets


def register_head_set(
    session: Session,
    *,
    name: str,
    version: str,
    kind: str,
    backbone: str,
    dim: int,
    num_heads: int,
    head_names: Sequence[str],
    default_weights: Sequence[float],
    uri: str,
    content_hash: str,
    activate: bool = False,
) -> HeadSetRow:
    """Record a saved head set; registering the same name, version and content again is a no-op."""
    if not (isinstance(dim, int) and isinstance(num_heads, int) and dim > 0 and num_heads > 0):
        raise InvalidInput(f"dim and num_heads must be positive integers, got {dim!r} and {num_heads!r}")
    names = [_text(n, f"head_names[{i}]", NAME_MAX, empty_ok=False) for i, n in enumerate(head_names)]
    if len(names) != num_heads:
        raise InvalidInput(f"{len(names)} head names for {num_heads} heads")
    head_set = HeadSetRow(
        name=_text(name, "head set name", HEAD_SET_NAME_MAX, empty_ok=False),
        version=_text(version, "head set version", VERSION_MAX, empty_ok=False),
        kind=_choice(kind, "kind", KINDS),
        backbone=_text(backbone, "backbone", NAME_MAX, empty_ok=False),
        dim=dim,
        num_heads=num_heads,
        head_names=names,
        default_weights=_vector(default_weights, num_heads, "default_weights"),
        uri=_text(uri, "uri", URI_MAX, empty_ok=False),
        content_hash=_text(content_hash, "content_hash", 128, empty_ok=False),
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
                            f"({existing.content_hash})")
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


# ---------------------------------------------------------------------------------------------- API keys


def _hash_secret(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, **_SCRYPT)


def create_api_key(
    session: Session,
    scopes: Iterable[str],
    *,
    user_external_id: str | None = None,
    name: str | None = None,
) -> tuple[ApiKey, str]:
    """A new key and its token `rp_<prefix>_<secret>`; the token is returned once and never stored."""
    key = ApiKey(scopes=_scopes(scopes), name=None if name is None else _text(name, "key name", NAME_MAX))
    if user_external_id is not None:
        key.user = get_user(session, user_external_id)
    secret = secrets.token_urlsafe(32)
    key.prefix, key.salt = secrets.token_hex(4), secrets.token_bytes(16)
    key.key_hash = _hash_secret(secret, key.salt)
    session.add(key)
    session.flush()
    return key, f"rp_{key.prefix}_{secret}"


def verify_api_key(session: Session, token: str, scope: str | None = None) -> ApiKey:
    """The key behind `token`, if it is valid, not revoked and (when given) allows `scope`."""
    parts = token.split("_", 2) if isinstance(token, str) else []
    key = None
    if len(parts) == 3 and parts[0] == "rp":
        key = session.scalar(sa.select(ApiKey).where(ApiKey.prefix == parts[1]))
    if (
        key is None
        or key.revoked_at is not None
        or not hmac.compare_digest(_hash_secret(parts[2], key.salt), key.key_hash)
        or (key.user is not None and key.user.disabled)
    ):
        raise InvalidApiKey("invalid or revoked API key")
    if scope is not None and not key.allows(_choice(scope, "scope", SCOPES)):
        raise MissingScope(f"this API key lacks the {scope!r} scope (it has {', '.join(key.scopes)})")
    return key


def revoke_api_key(session: Session, prefix: str) -> ApiKey:
    key = session.scalar(sa.select(ApiKey).where(ApiKey.prefix == prefix))
    if key is None:
        raise NotFound(f"no API key with prefix {prefix!r}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


def list_api_keys(session: Session, *, include_revoked: bool = False) -> list[ApiKey]:
    query = sa.select(ApiKey).outerjoin(ApiKey.user).options(contains_eager(ApiKey.user)).order_by(ApiKey.id)
    return list(session.scalars(query if include_revoked else query.where(ApiKey.revoked_at.is_(None))))


# ---------------------------------------------------------------------------------------------- audit log


def record_audit(
    session: Session,
    actor: str,
    action: str,
    target: str,
    details: Mapping[str, Any] | None = None,
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> AuditEntry:
    """Log an admin action in the caller's transaction, so it is recorded exactly when the action commits.

    Never put secrets in `details`.
    """
    entry = AuditEntry(
        actor=_text(actor, "actor", NAME_MAX, empty_ok=False),
        action=_text(action, "action", 64, empty_ok=False),
        target=_text(target, "target", NAME_MAX),
        details=_json_doc(details or {}, "audit details", limits.max_metadata_bytes),
    )
    session.add(entry)
    session.flush()
    return entry
