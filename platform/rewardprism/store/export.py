"""A user, their profile and feedback as plain JSON, and back: moving a user between deployments."""
from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from sqlalchemy.orm import Session

from rewardprism.store import checks
from rewardprism.store.config import DEFAULT_LIMITS, Limits
from rewardprism.store.errors import InvalidInput
from rewardprism.store.head_sets import get_head_set
from rewardprism.store.models import HEAD_SET_NAME_MAX, VERSION_MAX, User
from rewardprism.store.profiles import (
    FeedbackPair,
    ProfileUpdate,
    checked_update,
    feedback_of,
    feedback_row,
    write_profile,
)
from rewardprism.store.users import create_user, get_user

EXPORT_FORMAT = "rewardprism.user/1"
IMPORT_BATCH = 1_000  # feedback pairs checked and written at a time by an import


def export_user(session: Session, external_id: str) -> dict[str, Any]:
    """The user, their profile and feedback as plain JSON (API keys stay: they belong to a deployment)."""
    user = get_user(session, external_id)
    profile = user.profile
    metadata, metadata_error = checks.readable_json(user.meta, "metadata")
    return {
        "format": EXPORT_FORMAT,
        "external_id": user.external_id,
        "display_name": user.display_name,
        "metadata": metadata,
        **({} if metadata_error is None else {"metadata_error": metadata_error}),
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
             "query_id": f.query_id, "created_at": f.created_at.isoformat()}
            for f in feedback_of(session, user)
        ],
    }


def import_user(session: Session, data: Mapping[str, Any], *, limits: Limits = DEFAULT_LIMITS) -> User:
    """Recreate a user from `export_user` output, however long their history, in the caller's transaction.

    The per-call limit on pairs does not apply: an export holds a whole history. Feedback is checked and
    written `IMPORT_BATCH` pairs at a time; any error raises InvalidInput and the caller's rollback leaves
    nothing behind.
    """
    if not isinstance(data, Mapping) or data.get("format") != EXPORT_FORMAT:
        raise InvalidInput(f"not a user export: expected an object with format {EXPORT_FORMAT!r}")
    checks.json_depth(data, "the export", checks.MAX_JSON_DEPTH + 1)  # its metadata sits one level down
    try:
        feedback = data["feedback"]
        if not isinstance(feedback, list):
            raise InvalidInput(f"feedback must be a list, got {type(feedback).__name__}")
        created_at = _timestamp(data["created_at"], "created_at")
        external_id, display_name, metadata = data["external_id"], data["display_name"], data["metadata"]
        saved, disabled = data["profile"], data["disabled"]
        if not isinstance(disabled, bool):
            raise InvalidInput(f"disabled must be true or false, got {disabled!r}")
        update, head_set, n_pairs = None, None, 0
        if saved is not None:
            name = checks.text(saved["head_set"]["name"], "profile.head_set.name", HEAD_SET_NAME_MAX, empty_ok=False)
            version = saved["head_set"]["version"]
            version = checks.text(str(version) if isinstance(version, int) else version, "profile.head_set.version",
                            VERSION_MAX, empty_ok=False)
            head_set = get_head_set(session, name, version)
            update = ProfileUpdate(saved["weights"], saved["method"], saved["bias"])
            n_pairs = saved["n_pairs"]
            if isinstance(n_pairs, bool) or not isinstance(n_pairs, int):
                raise InvalidInput(f"profile.n_pairs must be an integer, got {n_pairs!r}")
            checked_update(update, head_set, n_pairs)
        user = create_user(session, external_id, display_name=display_name, metadata=metadata, limits=limits)
        user.created_at = created_at
        if update is not None:
            write_profile(session, user, head_set, None, update, n_pairs=n_pairs)
        for start in range(0, len(feedback), IMPORT_BATCH):
            _import_feedback(session, user.id, feedback, start, limits)
    except InvalidInput:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInput(f"user export is missing or mangles a field: {exc!r}") from None
    user.disabled = disabled
    session.flush()
    return user


def _import_feedback(session: Session, user_id: int, feedback: list[Any], start: int, limits: Limits) -> None:
    """Check and write `feedback[start:start + IMPORT_BATCH]`, then let the session forget the rows."""
    rows = []
    for i, f in enumerate(feedback[start:start + IMPORT_BATCH], start):
        if not isinstance(f, Mapping):
            raise InvalidInput(f"feedback[{i}] must be an object")
        try:
            row = feedback_row(FeedbackPair(f["prompt"], f["chosen"], f["rejected"], f["source"],
                                            f.get("query_id")), limits)  # exports before 0004 have none
        except InvalidInput as exc:
            raise InvalidInput(f"feedback[{i}]: {exc}") from None
        row.created_at = _timestamp(f["created_at"], f"feedback[{i}].created_at")
        row.user_id = user_id
        rows.append(row)
    session.add_all(rows)
    session.flush()
    for row in rows:
        session.expunge(row)


def _timestamp(value: object, what: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        raise InvalidInput(f"{what} must be an ISO 8601 timestamp, got {value!r}") from None
    return parsed.astimezone(timezone.utc) if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)

