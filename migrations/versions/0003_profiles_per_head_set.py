"""Profiles per (user, head set): a user keeps one profile on every head-set version they were adapted onto.

Activating a new version serves its profiles; the older ones stay, so a rollback restores them exactly. Existing
rows are kept as they are (each is the user's profile on the head set it names).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""
from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("profiles") as batch:  # batch: SQLite rebuilds the table, keeping its rows
        batch.drop_constraint("uq_profiles_user_id", type_="unique")
        batch.create_unique_constraint("uq_profiles_user_id_head_set_id", ["user_id", "head_set_id"])
        batch.create_index("ix_profiles_user_id", ["user_id"])


def downgrade() -> None:
    """Back to one profile per user: each keeps its most recently updated one (the others are dropped)."""
    op.execute(
        "DELETE FROM profiles WHERE id NOT IN (SELECT id FROM (SELECT id, ROW_NUMBER() OVER ("
        "PARTITION BY user_id ORDER BY updated_at DESC, id DESC) AS r FROM profiles) AS ranked WHERE r = 1)"
    )
    with op.batch_alter_table("profiles") as batch:
        batch.drop_index("ix_profiles_user_id")
        batch.drop_constraint("uq_profiles_user_id_head_set_id", type_="unique")
        batch.create_unique_constraint("uq_profiles_user_id", ["user_id"])
