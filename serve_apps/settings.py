"""The service's settings: one validated object, read from the environment once per replica.

Every field has an environment variable: DATABASE_URL, or RP_ and the field's name in capitals
(`max_responses` → RP_MAX_RESPONSES). The `LIVE` fields can also be changed while the service
runs, through the deployments' `user_config` in `config.yaml` (`reconfigure()`), without restarting replicas;
a value in `user_config` wins over the environment. DATABASE_URL and REWARDPRISM_ADMIN_KEY are secrets: held as
`SecretStr`, they never appear in a repr or a log line, and placeholders are refused.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from rewardprism.store import StoreSettings
from rewardprism.store.config import DEFAULT_URL, normalize_url

PLACEHOLDER_PASSWORDS = {"changethis", "changeme", "change-me", "password", "secret"}


class ServeSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    database_url: SecretStr = SecretStr(DEFAULT_URL)
    # A bootstrap admin key (REWARDPRISM_ADMIN_KEY, from a Kubernetes Secret): admin calls work before any key
    # exists in the store, e.g. to create the first ones. Unset: only the store's keys.
    admin_key: SecretStr | None = None
    head_set: str = Field("default", min_length=1, description="name whose active version is served")
    backbone: str | None = Field(None, description="where to load the head set's backbone weights from instead "
                                 "(a local copy); refused when it makes other features than the head set's spec")
    device: str = "cpu"
    # Texts longer than the head set's feature spec allows (its `max_length`, the cut its features got) are cut
    # as its features were and flagged `truncated`, or are refused with 422 under `reject`.
    over_length: Literal["truncate", "reject"] = "truncate"
    token_budget: int | None = Field(None, ge=64, description="padded tokens per forward pass (default: the "
                                                               "device's, `rewardprism.embed.default_token_budget`)")
    max_batch: int = Field(64, ge=1, description="texts per forward pass")
    batch_max_texts: int = Field(64, ge=1, le=4096, description="texts gathered by one @serve.batch: it runs as "
                                                                  "soon as this many wait (a larger request alone)")
    batch_wait_s: float | None = Field(None, ge=0, le=1, description="how long a batch waits for more requests; "
                                       "unset: a tenth of what the last batch took")
    max_request_bytes: int = Field(1_048_576, ge=1024, description="larger bodies get 413")
    max_responses: int = Field(64, ge=1, le=1024, description="responses per score or query request; more get 422")
    unknown_user: Literal["default", "404"] = "default"
    adaptation: Literal["default", "hyre", "bt"] = "default"
    profile_cache_size: int = Field(100_000, ge=1)
    version_check_timeout_s: float = Field(0.5, gt=0, description="past this, a cached profile is used unchecked "
                                                                  "(a user with none cached waits)")
    head_set_poll_s: float = Field(1.0, gt=0, description="how often the active head set is re-read")
    auth_cache_s: float = Field(30.0, ge=0, description="a verified API key is trusted this long")
    idempotency_ttl_s: float = Field(86_400.0, ge=60, description="how long the answer to a write sent with an "
                                     "Idempotency-Key is kept for its retries (then deleted)")
    pair_cache_size: int = Field(50_000, ge=1, description="feedback pairs whose head scores are kept")
    db_timeout_s: int = Field(5, ge=1, description="connect timeout; an unreachable database fails this fast")
    db_call_timeout_s: float = Field(10.0, gt=0, description="deadline of each database call, waiting for a "
                                                            "connection included: past it the call answers 503 "
                                                            "and its transaction rolls back")

    @field_validator("database_url")
    @classmethod
    def _no_placeholder(cls, url: SecretStr) -> SecretStr:
        normalized = normalize_url(url.get_secret_value())
        if sa.make_url(normalized).password in PLACEHOLDER_PASSWORDS:
            raise ValueError("DATABASE_URL holds a placeholder password: set a real one")
        return SecretStr(normalized)

    @field_validator("admin_key")
    @classmethod
    def _strong_admin_key(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and (len(key.get_secret_value()) < 32 or key.get_secret_value() in PLACEHOLDER_PASSWORDS):
            raise ValueError("must be at least 32 characters and not a placeholder (e.g. `openssl rand -hex 32`)")
        return key

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ServeSettings:
        values = {field: env[name] for field, name in ENV.items() if env.get(name)}
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ValueError(_explain(exc, ENV)) from None

    def live(self, user_config: Mapping[str, Any] | None) -> ServeSettings:
        """These settings with `user_config` applied; only `LIVE` fields may appear in it."""
        user_config = dict(user_config or {})
        fixed = sorted(set(user_config) - LIVE)
        if fixed:
            raise ValueError(f"user_config may set only {', '.join(sorted(LIVE))}; not {', '.join(fixed)}")
        try:
            return self.model_validate({**self.model_dump(), "database_url": self.database_url,
                                        "admin_key": self.admin_key, **user_config})
        except ValidationError as exc:
            raise ValueError(_explain(exc, {f: f"user_config.{f}" for f in LIVE})) from None

    def store(self) -> StoreSettings:
        """The store's settings (pool, limits) for this URL, with a connect timeout on Postgres."""
        url = sa.make_url(self.database_url.get_secret_value())
        if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
            url = url.update_query_dict({"connect_timeout": str(self.db_timeout_s)})
        return StoreSettings.from_env(url.render_as_string(hide_password=False))


def env_name(field: str) -> str:
    """The environment variable of a setting: DATABASE_URL, REWARDPRISM_ADMIN_KEY, else RP_ and the field's
    name in capitals."""
    return {"database_url": "DATABASE_URL", "admin_key": "REWARDPRISM_ADMIN_KEY"}.get(field, f"RP_{field.upper()}")


ENV = {field: env_name(field) for field in ServeSettings.model_fields}
LIVE = frozenset({"over_length", "batch_max_texts", "batch_wait_s", "max_request_bytes", "max_responses",
                  "unknown_user", "adaptation", "version_check_timeout_s", "auth_cache_s"})


def _explain(exc: ValidationError, names: Mapping[str, str]) -> str:
    """Pydantic's errors, each named by the variable the user set (never echoing DATABASE_URL's value)."""
    return "; ".join(f"{names.get(str(e['loc'][0]), e['loc'][0]) if e['loc'] else 'settings'}: {e['msg']}"
                     for e in exc.errors())
