"""Alembic environment: the URL comes from the caller (`rewardprism db ...`) or DATABASE_URL, not a file."""
from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from rewardprism.store.config import StoreSettings
from rewardprism.store.engine import make_engine
from rewardprism.store.models import Base

config = context.config
# `alembic ...` configures logging from alembic.ini; rewardprism.store.migrate leaves the caller's alone.
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name)

settings = StoreSettings.from_env(config.attributes.get("database_url"))
options = {
    "target_metadata": Base.metadata,
    "compare_type": True,
    "render_as_batch": True,  # SQLite cannot ALTER most things; batch mode copies the table instead
}

if context.is_offline_mode():
    context.configure(url=settings.database_url, literal_binds=True, **options)
    with context.begin_transaction():
        context.run_migrations()
else:
    # A migration may rewrite a large table: no statement timeout (the lock timeout stays, so it never queues
    # behind a stalled client while blocking everyone else).
    engine = make_engine(settings.model_copy(update={"statement_timeout_s": 0}))
    with engine.connect() as connection:
        context.configure(connection=connection, **options)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
