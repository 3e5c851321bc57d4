"""API keys: only a salted hash of each secret is stored.

New keys are hashed with one SHA-256 over salt and secret (`hash_scheme` "sha256"). A slow password hash
(scrypt) protects secrets people choose, which are guessable; a key's secret is 256 random bits
(`secrets.token_urlsafe(32)`), which no hash speed makes guessable, so a slow hash buys nothing and costs
everyone: every wrong secret sent with a public prefix cost the server tens of milliseconds of CPU (a denial of
service) and answered measurably slower than an unknown prefix (an oracle for which prefixes exist). Now a
wrong secret and an unknown prefix both cost one SHA-256 and one indexed lookup. Keys made before revision 0002
keep their scrypt hash ("scrypt") and verify as before; `upgrade_api_key_hash` rehashes one after a successful
use, so only keys never used since then still pay scrypt, and those within a budget per prefix
(`LegacyHashBudget`): guessing at one never costs a process more than a few scrypt hashes a second.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

import sqlalchemy as sa
from sqlalchemy.orm import Session, contains_eager

from rewardprism.store import checks
from rewardprism.store.errors import InvalidApiKey, InvalidInput, MissingScope, NotFound
from rewardprism.store.models import NAME_MAX, SCOPES, ApiKey, User, utcnow
from rewardprism.store.revocation import bump_auth_epoch
from rewardprism.store.users import get_user

HASH_SCHEME = "sha256"  # of new keys
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}  # keys from before revision 0002 only
# What an unknown prefix is checked against (salt, hash, scheme): it hashes and compares as a wrong secret does.
_UNKNOWN = (bytes(16), bytes(32), HASH_SCHEME)


class LegacyHashBudget:
    """A token bucket per prefix for scrypt verifications, in this process.

    Every attempt at a legacy key takes a token (`burst` at most, `per_s` more each second); without one the
    key is refused as a wrong secret is, before any hashing. Its owner's first success rehashes it (the service
    calls `upgrade_api_key_hash`), so only a key under attack that was never used since 0002 can be refused for
    a moment; it costs a process at most `per_s` scrypt hashes a second per prefix whatever is sent.
    """

    def __init__(self, burst: float = 5.0, per_s: float = 1.0, prefixes: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        self.burst, self.per_s, self.prefixes, self.clock = burst, per_s, prefixes, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # prefix → (tokens, when)
        self._lock = threading.Lock()

    def take(self, prefix: str) -> bool:
        with self._lock:
            now = self.clock()
            tokens, then = self._buckets.pop(prefix, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.per_s)
            self._buckets[prefix] = (tokens - 1, now) if tokens >= 1 else (tokens, now)
            while len(self._buckets) > self.prefixes:
                self._buckets.popitem(last=False)
            return tokens >= 1


LEGACY_HASHES = LegacyHashBudget()


def _scopes(scopes: Iterable[str]) -> list[str]:
    chosen = sorted(set(scopes))
    unknown = [s for s in chosen if s not in SCOPES]
    if unknown or not chosen:
        raise InvalidInput(f"scopes must be a non-empty subset of {', '.join(SCOPES)}; got {chosen}")
    return chosen


def _hash_secret(secret: str, salt: bytes, scheme: str) -> bytes:
    if scheme == "scrypt":
        return hashlib.scrypt(secret.encode(), salt=salt, **_SCRYPT)
    return hashlib.sha256(salt + secret.encode()).digest()


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
    key.prefix, key.salt, key.hash_scheme = secrets.token_hex(4), secrets.token_bytes(16), HASH_SCHEME
    key.key_hash = _hash_secret(secret, key.salt, HASH_SCHEME)
    session.add(key)
    session.flush()
    return key, f"rp_{key.prefix}_{secret}"


def _parse(token: object) -> tuple[str, str] | None:
    parts = token.split("_", 2) if isinstance(token, str) else []
    return (parts[1], parts[2]) if len(parts) == 3 and parts[0] == "rp" else None


def verify_api_key(session: Session, token: str, scope: str | None = None) -> ApiKey:
    """The key behind `token`, if it is valid, not revoked and (when given) allows `scope`.

    An unknown prefix costs what a wrong secret costs (one hash, one constant-time compare), so the answer's
    timing does not tell whether a prefix exists.
    """
    parsed = _parse(token)
    prefix, secret = parsed or ("", "")
    found = session.execute(sa.select(ApiKey.id, ApiKey.salt, ApiKey.key_hash, ApiKey.hash_scheme)
                            .where(ApiKey.prefix == prefix)).first() if parsed else None
    salt, stored, scheme = _UNKNOWN if found is None else (found.salt, found.key_hash, found.hash_scheme)
    if scheme != HASH_SCHEME and not LEGACY_HASHES.take(prefix):
        raise InvalidApiKey("invalid or revoked API key")
    if not hmac.compare_digest(_hash_secret(secret, salt, scheme), stored) or found is None:
        raise InvalidApiKey("invalid or revoked API key")
    key = session.get_one(ApiKey, found.id)  # only now the whole key: a wrong secret costs no more than above
    if key.revoked_at is not None or (key.user is not None and key.user.disabled):
        raise InvalidApiKey("invalid or revoked API key")
    if scope is not None and not key.allows(checks.choice(scope, "scope", SCOPES)):
        raise MissingScope(f"this API key lacks the {scope!r} scope (it has {', '.join(key.scopes)})")
    return key


def upgrade_api_key_hash(session: Session, token: str) -> None:
    """Rehash a valid key still on an old scheme with the current one (a no-op when it is current)."""
    key = verify_api_key(session, token)
    if key.hash_scheme != HASH_SCHEME:
        key.hash_scheme, key.salt = HASH_SCHEME, secrets.token_bytes(16)
        key.key_hash = _hash_secret(_parse(token)[1], key.salt, HASH_SCHEME)
        session.flush()


def lock_active_key(session: Session, prefix: str) -> None:
    """Inside a write: the key must still be valid now, and stays so until the write commits.

    A key verified earlier (and cached) may have been revoked, or its user disabled or deleted, since; this
    re-check in the write's own transaction closes that gap, and the shared row lock makes a concurrent
    revoke or delete wait for the write (or the write for it) instead of crossing it.
    """
    found = session.execute(
        sa.select(ApiKey.id, User.disabled).outerjoin(ApiKey.user)
        .where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
        .with_for_update(read=True, of=ApiKey)).first()
    if found is None or found.disabled:
        raise InvalidApiKey("invalid or revoked API key")


def revoke_api_key(session: Session, prefix: str) -> ApiKey:
    """Revoke the key: with the auth epoch moved, no replica accepts it once this commits."""
    key = session.scalar(sa.select(ApiKey).where(ApiKey.prefix == prefix))
    if key is None:
        raise NotFound(f"no API key with prefix {prefix!r}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        bump_auth_epoch(session)
        session.flush()
    return key


def list_api_keys(session: Session, *, include_revoked: bool = False) -> list[ApiKey]:
    query = sa.select(ApiKey).outerjoin(ApiKey.user).options(contains_eager(ApiKey.user)).order_by(ApiKey.id)
    return list(session.scalars(query if include_revoked else query.where(ApiKey.revoked_at.is_(None))))
