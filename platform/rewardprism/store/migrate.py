"""Schema migrations from Python (`rewardprism db ...` and the tests): Alembic over migrations/."""
from __future__ import annotations

from importlib.resources import files

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from rewardprism.store.config import StoreSettings
from rewardprism.store.engine import make_engine

# Package data of rewardprism: in a checkout, platform/rewardprism/migrations links to the top-level migrations/
# (beside alembic.ini); a wheel carries the files themselves.
MIGRATIONS = files("rewardprism") / "migrations"


def alembic_config(database_url: str) -> Config:
    """An Alembic Config for `database_url` that leaves the caller's logging alone."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # Passed as an attribute, not a main option: ini interpolation would mangle a '%' in a password.
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(database_url: str) -> str | None:
    """The revision the database is at (None: empty, never migrated)."""
    engine = make_engine(StoreSettings.from_env(database_url))
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
