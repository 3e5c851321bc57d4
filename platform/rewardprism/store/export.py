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
            for f in feedback_of(session, user)
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
        rows = [feedback_row(FeedbackPair(f["prompt"], f["chosen"], f["rejected"], f["source"]), limits)
                for f in feedback]
        for i, (row, f) in enumerate(zip(rows, feedback)):
            row.created_at = _timestamp(f["created_at"], f"feedback[{i}].created_at")
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
    except InvalidInput:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInput(f"user export is missing or mangles a field: {exc!r}") from None

    user = create_user(session, external_id, display_name=display_name, metadata=metadata, limits=limits)
    user.created_at = created_at
    if update is None or head_set is None:
        for row in rows:
            row.user_id = user.id
        session.add_all(rows)
    else:
        write_profile(session, user, head_set, None, update, n_pairs=n_pairs, new_feedback=rows)
    user.disabled = disabled
    session.flush()
    return user



def _timestamp(value: object, what: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        raise InvalidInput(f"{what} must be an ISO 8601 timestamp, got {value!r}") from None
    return parsed.astimezone(timezone.utc) if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)

