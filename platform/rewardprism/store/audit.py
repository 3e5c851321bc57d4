"""The audit log: admin actions, recorded in the transaction that does them."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.orm import Session

from rewardprism.store import checks
from rewardprism.store.config import DEFAULT_LIMITS, Limits
from rewardprism.store.models import NAME_MAX, AuditEntry


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
        actor=checks.text(actor, "actor", NAME_MAX, empty_ok=False),
        action=checks.text(action, "action", 64, empty_ok=False),
        target=checks.text(target, "target", NAME_MAX),
        details=checks.json_doc(details or {}, "audit details", limits.max_metadata_bytes),
    )
    session.add(entry)
    session.flush()
    return entry
