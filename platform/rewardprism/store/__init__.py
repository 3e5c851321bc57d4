"""User profiles, feedback, the head-set registry and API keys, in Postgres or SQLite (`rewardprism.store`).

    settings = StoreSettings.from_env()              # DATABASE_URL, RP_DB_POOL_SIZE, ...
    sessions = make_sessions(make_engine(settings))
    profile = commit_with_retry(  # one transaction, rerun on ProfileConflict
        sessions, lambda s: append_feedback_and_update_profile(s, "alice", pairs, adapt, get_head_set(s, "default")))

Helpers never commit: the caller owns the transaction (as in the full-stack FastAPI template), so "store the
feedback and update the profile" commits or rolls back as one; `commit_with_retry` is the one wrapper that
commits. Every write validates its input first (`checks`) and raises a StoreError subclass before touching the
database, so bad input leaves nothing behind. One module per kind of record: `users`, `profiles` (one per user
and head-set version, and feedback), `head_sets`, `keys`, `audit`, `revocation` (the auth epoch, tombstones),
`idempotency`, `pools` (pairs to ask users about), and `export` across them; `rollout` migrates profiles onto
a new version. Schema changes go through Alembic (`rewardprism db upgrade`).
"""
from rewardprism.store.audit import list_audit, record_audit
from rewardprism.store.config import DEFAULT_URL, Limits, StoreSettings, missing_sqlite_file, safe_url
from rewardprism.store.engine import commit_with_retry, make_engine, make_sessions
from rewardprism.store.errors import (
    AlreadyExists,
    InvalidApiKey,
    InvalidInput,
    MissingScope,
    NotFound,
    ProfileConflict,
    StoreError,
    UserDeleted,
    UserDisabled,
)
from rewardprism.store.export import export_user, import_user
from rewardprism.store.head_sets import activate_head_set, get_head_set, list_head_sets, register_head_set
from rewardprism.store.idempotency import IdempotentRequest
from rewardprism.store.keys import (
    HASH_SCHEME,
    create_api_key,
    list_api_keys,
    lock_active_key,
    revoke_api_key,
    upgrade_api_key_hash,
    verify_api_key,
)
from rewardprism.store.models import (
    KINDS,
    POPULATION_METHOD,
    PROFILE_METHODS,
    SCOPES,
    ApiKey,
    AuditEntry,
    AuthEpoch,
    DeletedUser,
    Feedback,
    HeadSetRow,
    IdempotentAnswer,
    ProfileRow,
    QueryPool,
    QueryPoolPair,
    User,
)
from rewardprism.store.pools import (
    answered_positions,
    get_query_pool,
    list_query_pools,
    pool_gaps,
    pool_pairs,
    pool_query_id,
    register_query_pool,
)
from rewardprism.store.profiles import (
    Adapter,
    FeedbackPair,
    ProfileUpdate,
    append_feedback_and_update_profile,
    check_feedback_pair,
    feedback_of,
    get_profile,
    list_feedback,
    reset_profile,
    save_profile,
)
from rewardprism.store.revocation import auth_epoch, was_deleted
from rewardprism.store.users import (
    Page,
    create_user,
    delete_user,
    get_or_create_user,
    get_user,
    list_users,
    set_user_disabled,
)

__all__ = [
    "DEFAULT_URL", "HASH_SCHEME", "KINDS", "POPULATION_METHOD", "PROFILE_METHODS", "SCOPES", "Adapter",
    "AlreadyExists", "ApiKey", "AuditEntry", "AuthEpoch", "DeletedUser", "Feedback", "FeedbackPair", "HeadSetRow",
    "IdempotentAnswer", "IdempotentRequest", "InvalidApiKey", "InvalidInput", "Limits", "MissingScope", "NotFound",
    "Page", "ProfileConflict", "ProfileRow", "ProfileUpdate", "QueryPool", "QueryPoolPair", "StoreError",
    "StoreSettings", "User", "UserDeleted", "UserDisabled", "activate_head_set", "answered_positions",
    "append_feedback_and_update_profile", "auth_epoch", "check_feedback_pair", "commit_with_retry", "create_api_key",
    "create_user", "delete_user", "export_user", "feedback_of", "get_head_set", "get_or_create_user", "get_profile",
    "get_query_pool", "get_user", "import_user", "list_api_keys", "list_audit", "list_feedback", "list_head_sets",
    "list_query_pools", "list_users", "lock_active_key", "make_engine", "make_sessions", "missing_sqlite_file",
    "pool_gaps", "pool_pairs", "pool_query_id", "record_audit", "register_head_set", "register_query_pool",
    "reset_profile", "revoke_api_key", "safe_url", "save_profile", "set_user_disabled", "upgrade_api_key_hash",
    "verify_api_key", "was_deleted",
]
