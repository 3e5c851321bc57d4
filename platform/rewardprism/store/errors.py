"""Errors the store raises on purpose, so a service can map each to one HTTP status, the CLI to one line."""
from __future__ import annotations


class StoreError(Exception):
    """Base class: anything else escaping the store is a bug or an infrastructure fault."""


class InvalidInput(StoreError, ValueError):
    """Rejected before anything was written (wrong vector length, NaN, oversized text, bad scopes, ...)."""


class NotFound(StoreError, LookupError):
    """An unknown user, head set or API key."""


class AlreadyExists(StoreError):
    """A second user with the same external id, or a head-set version registered with different content."""


class UserDisabled(StoreError):
    """The user was disabled by an admin: no feedback, no profile changes."""


class UserDeleted(StoreError):
    """The user was deleted: writes for them are refused rather than creating them again (HTTP 410)."""


class ProfileConflict(StoreError):
    """Another writer changed the profile first; roll back and retry the whole transaction."""

    def __init__(self, external_id: str, expected: int | None) -> None:
        state = "absent" if expected is None else f"at version {expected}"
        super().__init__(
            f"profile of user {external_id!r} is not {state} as expected: another writer changed it; "
            "reload and retry"
        )
        self.external_id = external_id
        self.expected = expected


class InvalidApiKey(StoreError):
    """Unknown, malformed or revoked key (one message for all, so callers learn nothing from it)."""


class MissingScope(StoreError):
    """A valid key without the scope the operation needs."""
