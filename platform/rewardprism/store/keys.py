"""API keys: only a salted scrypt hash of each secret is stored."""
from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.orm import Session, contains_eager

from rewardprism.store import checks
from rewardprism.store.errors import InvalidApiKey, InvalidInput, MissingScope, NotFound
from rewardprism.store.models import NAME_MAX, SCOPES, ApiKey, utcnow
from rewardprism.store.users import get_user

# scrypt cost: ~16 MiB and tens of ms per check; services cache verified keys rather than lower this.
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}


def _scopes(scopes: Iterable[str]) -> list[str]:
    chosen = sorted(set(scopes))
    unknown = [s for s in chosen if s not in SCOPES]
    if unknown or not chosen:
        raise InvalidInput(f"scopes must be a non-empty subset of {', '.join(SCOPES)}; got {chosen}")
    return chosen



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
    key = ApiKey(scopes=_scopes(scopes), name=None if name is None else checks.text(name, "key name", NAME_MAX))
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
    if scope is not None and not key.allows(checks.choice(scope, "scope", SCOPES)):
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

