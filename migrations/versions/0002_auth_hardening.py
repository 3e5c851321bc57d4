"""Auth hardening: fast key hashes (with the scheme per key), the auth epoch, user tombstones, idempotent answers.

Existing keys keep their scrypt hashes (`hash_scheme` 'scrypt') and keep verifying; the service rehashes each
on its first successful use. The epoch starts at 0 in its one row. A downgrade keeps the keys but not their
scheme: keys hashed with sha256 (all made or used since) stop verifying under 0001 and must be made again.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONDoc = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def timestamp(name: str) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:  # batch: SQLite cannot add a CHECK constraint in place
        batch.add_column(sa.Column("hash_scheme", sa.String(length=16), nullable=False, server_default="scrypt"))
        batch.create_check_constraint("hash_scheme", "hash_scheme IN ('sha256', 'scrypt')")
    with op.batch_alter_table("api_keys") as batch:  # new rows name their scheme (the model always sets it)
        batch.alter_column("hash_scheme", server_default=None)

    epoch = op.create_table(
        "auth_epoch",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_auth_epoch")),
    )
    op.bulk_insert(epoch, [{"id": 1, "epoch": 0}])

    op.create_table(
        "deleted_users",
        sa.Column("external_id", sa.String(length=255), nullable=False),
        timestamp("deleted_at"),
        sa.PrimaryKeyConstraint("external_id", name=op.f("pk_deleted_users")),
    )

    op.create_table(
        "idempotent_answers",
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("body", JSONDoc, nullable=True),
        timestamp("created_at"),
        sa.PrimaryKeyConstraint("owner", "key", name=op.f("pk_idempotent_answers")),
    )
    op.create_index(op.f("ix_idempotent_answers_created_at"), "idempotent_answers", ["created_at"])


def downgrade() -> None:
    for table in ("idempotent_answers", "deleted_users", "auth_epoch"):
        op.drop_table(table)
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_constraint(op.f("ck_api_keys_hash_scheme"), type_="check")
        batch.drop_column("hash_scheme")
