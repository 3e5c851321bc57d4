"""Store settings: one validated object read from the environment (or a `--database-url` flag).

The URL may carry a password, so it is only ever shown through `safe_url`; errors about it never echo it.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import sqlalchemy as sa

from rewardprism.store.errors import InvalidInput

DEFAULT_URL = "sqlite:///rewardprism.db"  # the embedded default: a file in the working directory, no server


@dataclass(frozen=True)
class Limits:
    """Size limits on what clients may store; checked before anything is written."""

    max_text_chars: int = 32_000  # each of prompt (all messages together), chosen, rejected
    max_pairs_per_call: int = 1_000
    max_metadata_bytes: int = 16_384  # user metadata and audit details, as JSON


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class StoreSettings:
    database_url: str = DEFAULT_URL
    pool_size: int = 5
    max_overflow: int = 10
    pool_timeout_s: float = 30.0
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        object.__setattr__(self, "database_url", normalize_url(self.database_url))  # frozen: set once, here

    @classmethod
    def from_env(cls, database_url: str | None = None, env: Mapping[str, str] = os.environ) -> StoreSettings:
        """`database_url` (a CLI flag) wins over DATABASE_URL; pool and limits from RP_DB_* / RP_MAX_*."""
        default = cls()

        def number(name: str, fallback: int, minimum: int = 1) -> int:
            raw = env.get(name)
            if raw is None:
                return fallback
            if not raw.strip().isdigit() or int(raw) < minimum:
                raise InvalidInput(f"{name} must be an integer >= {minimum}, got {raw!r}")
            return int(raw)

        return cls(
            database_url=database_url or env.get("DATABASE_URL") or DEFAULT_URL,
            pool_size=number("RP_DB_POOL_SIZE", default.pool_size),
            max_overflow=number("RP_DB_MAX_OVERFLOW", default.max_overflow, minimum=0),
            pool_timeout_s=number("RP_DB_POOL_TIMEOUT_S", int(default.pool_timeout_s)),
            limits=Limits(
                max_text_chars=number("RP_MAX_TEXT_CHARS", default.limits.max_text_chars),
                max_pairs_per_call=number("RP_MAX_PAIRS_PER_CALL", default.limits.max_pairs_per_call),
                max_metadata_bytes=number("RP_MAX_METADATA_BYTES", default.limits.max_metadata_bytes),
            ),
        )


def normalize_url(url: str) -> str:
    """Parse the URL; bare `postgresql://` and `postgres://` get psycopg 3 (psycopg2 is not installed)."""
    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError):  # ValueError: e.g. a port that is not a number
        # Not echoed: the string may hold a password.
        raise InvalidInput("the database URL is not a valid SQLAlchemy URL") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def safe_url(url: str | sa.URL) -> str:
    """The URL with its password masked: the only form that may reach logs or terminals."""
    return sa.make_url(url).render_as_string(hide_password=True)
