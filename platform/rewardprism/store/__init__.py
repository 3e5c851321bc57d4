"""User profiles, feedback, the head-set registry and API keys, in Postgres or SQLite (`rewardprism.store`).

    settings = StoreSettings.from_env()              # DATABASE_URL, RP_DB_POOL_SIZE, ...
    sessions = make_sessions(make_engine(settings))
    profile = commit_with_retry(  # one transaction, rerun on ProfileConflict
        sessions, lambda s: append_feedback_and_update_profile(s, "alice", pairs, adapt))

Schema changes go through Alembic (`rewardprism db upgrade`); helpers never commit (see repository.py).
"""
from rewardprism.store.config import DEFAULT_URL, Limits, StoreSettings, safe_url
from rewardprism.store.engine import make_engine, make_sessions
from rewardprism.store.errors import (
    AlreadyExists,
    InvalidApiKey,
    InvalidInput,
    MissingScope,
    NotFound,
    ProfileConflict,
    StoreError,
    UserDisabled,
)
from rewardprism.store.models import (
    KINDS,
    POPULATION_METHOD,
    PROFILE_METHODS,
    SCOPES,
    ApiKey,
    AuditEntry,
    Feedback,
    HeadSetRow,
    ProfileRow,
    User,
)
from rewardprism.store.repository import (
    Adapter,
    FeedbackPair,
    Page,
    ProfileUpdate,
    activate_head_set,
    append_feedback_and_update_profile,
    check_feedback_pair,
    commit_with_retry,
    create_api_key,
    create_user,
    delete_user,
    export_user,
    get_head_set,
    get_or_create_user,
    get_profile,
    get_user,
    import_user,
    list_api_keys,
    list_feedback,
    list_head_sets,
    list_users,
    record_audit,
    register_head_set,
    reset_profile,
    revoke_api_key,
    save_profile,
    set_user_disabled,
    verify_api_key,
)

__all__ = [
    "DEFAULT_URL", "KINDS", "POPULATION_METHOD", "PROFILE_METHODS", "SCOPES",
    "Adapter", "AlreadyExists", "ApiKey", "AuditEntry", "Feedback", "FeedbackPair", "HeadSetRow",
    "InvalidApiKey", "InvalidInput", "Limits", "MissingScope", "NotFound", "Page", "ProfileRow",
    "ProfileConflict", "ProfileUpdate", "StoreError", "StoreSettings", "User", "UserDisabled",
    "activate_head_set", "append_feedback_and_update_profile", "check_feedback_pair", "commit_with_retry",
    "create_api_key", "create_user", "delete_user", "export_user", "get_head_set", "get_or_create_user", "get_profile",
    "get_user", "import_user", "list_api_keys", "list_feedback", "list_head_sets", "list_users",
    "make_engine", "make_sessions", "record_audit", "register_head_set", "reset_profile", "revoke_api_key",
    "safe_url", "save_profile", "set_user_disabled", "verify_api_key",
]
