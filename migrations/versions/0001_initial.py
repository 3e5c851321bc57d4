"""Initial schema: users, profiles, feedback, head sets, API keys, audit log.

The column types are spelled out here rather than imported from rewardprism.store.models, so this revision
keeps meaning the same schema when the models move on.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONDoc = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
FloatVector = sa.JSON().with_variant(postgresql.ARRAY(sa.Double()), "postgresql")


def timestamp(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=255), nullable=False),
        sa.Column("details", JSONDoc, nullable=False),
        timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_created_at"), "audit_log", ["created_at"])

    op.create_table(
        "head_sets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("backbone", sa.String(length=255), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("num_heads", sa.Integer(), nullable=False),
        sa.Column("head_names", JSONDoc, nullable=False),
        sa.Column("default_weights", FloatVector, nullable=False),
        sa.Column("uri", sa.String(length=1024), nullable=False),
        sa.Column("content_hash", sa.String(length=128), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        timestamp("created_at"),
        sa.CheckConstraint("kind IN ('drm', 'vrm', 'bt')", name=op.f("ck_head_sets_kind")),
        sa.CheckConstraint("dim > 0 AND num_heads > 0", name=op.f("ck_head_sets_sizes")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_head_sets")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_head_sets_name_version")),
    )
    # At most one active version per name: a partial unique index (both backends support WHERE).
    op.create_index(
        "uq_head_sets_active_name", "head_sets", ["name"], unique=True,
        postgresql_where=sa.text("active"), sqlite_where=sa.text("active"),
    )

    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("external_id", sa.String(length=255), nullable=False),
        sa.Column("display_name", sa.String(length=255), nullable=True),
        sa.Column("metadata", JSONDoc, nullable=False),
        timestamp("created_at"),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("external_id", name=op.f("uq_users_external_id")),
    )

    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("salt", sa.LargeBinary(length=16), nullable=False),
        sa.Column("key_hash", sa.LargeBinary(length=64), nullable=False),
        sa.Column("scopes", JSONDoc, nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        timestamp("created_at"),
        timestamp("revoked_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_api_keys_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("prefix", name=op.f("uq_api_keys_prefix")),
    )
    op.create_index(op.f("ix_api_keys_user_id"), "api_keys", ["user_id"])

    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("prompt", JSONDoc, nullable=False),
        sa.Column("chosen", sa.Text(), nullable=False),
        sa.Column("rejected", sa.Text(), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        timestamp("created_at"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_feedback_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback")),
    )
    op.create_index(op.f("ix_feedback_user_id"), "feedback", ["user_id"])

    op.create_table(
        "profiles",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("head_set_id", sa.Integer(), nullable=False),
        sa.Column("weights", FloatVector, nullable=False),
        sa.Column("bias", sa.Double(), nullable=False),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("n_pairs", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        timestamp("created_at"),
        timestamp("updated_at"),
        sa.CheckConstraint(
            "method IN ('hyre', 'bt', 'manual', 'default', 'shrink')", name=op.f("ck_profiles_method")
        ),
        sa.CheckConstraint("n_pairs >= 0", name=op.f("ck_profiles_n_pairs")),
        sa.ForeignKeyConstraint(
            ["head_set_id"], ["head_sets.id"], name=op.f("fk_profiles_head_set_id_head_sets"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_profiles_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_profiles")),
        sa.UniqueConstraint("user_id", name=op.f("uq_profiles_user_id")),
    )
    op.create_index(op.f("ix_profiles_head_set_id"), "profiles", ["head_set_id"])


def downgrade() -> None:
    # Dependents first; dropping a table drops its indexes.
    for table in ("profiles", "feedback", "api_keys", "users", "head_sets", "audit_log"):
        op.drop_table(table)
