"""Query pools: candidate pairs registered with a head set (with their head scores), and feedback citing a query.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONDoc = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")  # spelled out, as in 0001


def upgrade() -> None:
    op.create_table(
        "query_pools",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("head_set_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("gaps", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["head_set_id"], ["head_sets.id"], ondelete="RESTRICT",
                                name=op.f("fk_query_pools_head_set_id_head_sets")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_query_pools")),
        sa.UniqueConstraint("head_set_id", "name", name=op.f("uq_query_pools_head_set_id_name")),
    )
    op.create_index(op.f("ix_query_pools_head_set_id"), "query_pools", ["head_set_id"])
    op.create_table(
        "query_pool_pairs",
        sa.Column("pool_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("prompt", JSONDoc, nullable=False),
        sa.Column("response_a", sa.Text(), nullable=False),
        sa.Column("response_b", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["pool_id"], ["query_pools.id"], ondelete="CASCADE",
                                name=op.f("fk_query_pool_pairs_pool_id_query_pools")),
        sa.PrimaryKeyConstraint("pool_id", "position", name=op.f("pk_query_pool_pairs")),
    )
    with op.batch_alter_table("feedback") as batch:  # batch: SQLite rebuilds the table, keeping its rows
        batch.add_column(sa.Column("query_id", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("query_id")
    op.drop_table("query_pool_pairs")
    op.drop_index(op.f("ix_query_pools_head_set_id"), "query_pools")
    op.drop_table("query_pools")
