"""Store settings: one validated object read from the environment (or a `--database-url` flag).

Read the way the service reads its own (`serve_apps.settings`): a frozen pydantic model, each field with one
environment variable (`ENV`), and an error that names the variable at fault. The URL may carry a password, so it
is only ever shown through `safe_url`; errors about it never echo it.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rewardprism.store.errors import InvalidInput

DEFAULT_URL = "sqlite:///rewardprism.db"  # the embedded default: a file in the working directory, no server


class Limits(BaseModel):
    """Size limits on what clients may store; checked before anything is written."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_text_chars: int = Field(32_000, ge=1)  # each of prompt (all messages together), chosen, rejected
    max_pairs_per_call: int = Field(1_000, ge=1)
    max_metadata_bytes: int = Field(16_384, ge=1)  # user metadata and audit details, as JSON


DEFAULT_LIMITS = Limits()


class StoreSettings(BaseModel):
    # hide_input_in_errors: a refused URL may hold a password
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    database_url: str = Field(DEFAULT_URL, repr=False)
    pool_size: int = Field(5, ge=1)
    max_overflow: int = Field(10, ge=0)
    pool_timeout_s: float = Field(30.0, gt=0, allow_inf_nan=False)  # also SQLite's busy timeout
    # Postgres cancels a statement running longer, or waiting for a lock longer, than this (0: never), so a
    # stuck query or a lock held by a stalled client fails the transaction instead of hanging its caller.
    statement_timeout_s: float = Field(30.0, ge=0, allow_inf_nan=False)
    lock_timeout_s: float = Field(10.0, ge=0, allow_inf_nan=False)
    limits: Limits = DEFAULT_LIMITS

    @field_validator("database_url")
    @classmethod
    def _normalize(cls, url: str) -> str:
        return normalize_url(url)

    @classmethod
    def from_env(cls, database_url: str | None = None, env: Mapping[str, str] = os.environ) -> StoreSettings:
        """`database_url` (a CLI flag) wins over DATABASE_URL; pool and limits from RP_DB_* / RP_MAX_*.

        Unset and empty variables keep the defaults; InvalidInput names the variable of each value refused.
        """
        values: dict[str, object] = {field: env[name] for field, name in ENV.items() if env.get(name)}
        values["limits"] = {field: env[name] for field, name in LIMITS_ENV.items() if env.get(name)}
        if database_url is not None:
            values["database_url"] = database_url
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise InvalidInput(_explain(exc, flag=database_url is not None)) from None


ENV = {"database_url": "DATABASE_URL", "pool_size": "RP_DB_POOL_SIZE", "max_overflow": "RP_DB_MAX_OVERFLOW",
       "pool_timeout_s": "RP_DB_POOL_TIMEOUT_S", "statement_timeout_s": "RP_DB_STATEMENT_TIMEOUT_S",
       "lock_timeout_s": "RP_DB_LOCK_TIMEOUT_S"}
LIMITS_ENV = {field: f"RP_{field.upper()}" for field in Limits.model_fields}  # max_text_chars: RP_MAX_TEXT_CHARS


def _explain(exc: ValidationError, flag: bool) -> str:
    """Pydantic's errors, each named by its environment variable (never echoing a value); `flag`: the URL came
    from the caller, not from DATABASE_URL."""
    names = {**ENV, **{f"limits.{field}": name for field, name in LIMITS_ENV.items()}}
    if flag:
        names["database_url"] = "the database URL"
    return "; ".join(f"{names.get('.'.join(map(str, e['loc'])), 'settings')}: {e['msg']}" for e in exc.errors())


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


def missing_sqlite_file(url: str) -> Path | None:
    """The SQLite file `url` names when it does not exist (connecting would create an empty one), else None."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    path = Path(parsed.database)
    return None if path.exists() else path
