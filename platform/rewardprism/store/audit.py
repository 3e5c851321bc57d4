"""The audit log: admin actions, recorded in the transaction that does them."""
from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
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


def list_audit(session: Session, *, target: str | None = None, since: datetime | None = None,
               limit: int = 100) -> list[AuditEntry]:
    """Entries newest first: those about `target` (a user's external id, a key prefix, `name@version`) only, and
    from `since` on (UTC unless it names a zone), when given."""
    query = sa.select(AuditEntry).order_by(AuditEntry.created_at.desc(), AuditEntry.id.desc()).limit(limit)
    if target is not None:
        query = query.where(AuditEntry.target == target)
    if since is not None:
        try:
            since = since.astimezone(timezone.utc) if since.tzinfo else since.replace(tzinfo=timezone.utc)
        except OverflowError:  # a zone offset past year 1 or 9999: before or after every entry
            since = datetime.min.replace(tzinfo=timezone.utc) if since.year < 5000 else \
                datetime.max.replace(tzinfo=timezone.utc)
        query = query.where(AuditEntry.created_at >= since)
    return list(session.scalars(query))
