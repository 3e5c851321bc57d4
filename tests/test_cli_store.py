"""`rewardprism db | users | keys | models` through the real command line, on SQLite files and Postgres."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import Result
from rewardprism.cli import app
from rewardprism.heads import HeadSet
from rewardprism.store import (
    AuditEntry,
    InvalidApiKey,
    StoreSettings,
    make_engine,
    make_sessions,
    migrate,
    verify_api_key,
)
from typer.testing import CliRunner

HEADS = ["pc0+", "pc1+", "pc2+", "pc0-", "pc1-", "pc2-"]
runner = CliRunner()


@pytest.fixture(scope="module")
def headset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A head set folder exactly as HeadSet.save writes it."""
    rng = np.random.default_rng(0)
    heads = HeadSet(rng.normal(size=(6, 8)), np.zeros(6), HEADS, "drm", "minilm", np.full(6, 1 / 6),
                    name="drm-cli", version="1")
    return heads.save(tmp_path_factory.mktemp("heads") / "drm-cli-1")


def rp(url: str, group: str, *args: str, input: str | None = None) -> Result:
    return runner.invoke(app, [group, "--database-url", url, "--actor", "tester", *args], input=input)


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def test_admin_workflow_on_sqlite(tmp_path: Path, headset_dir: Path) -> None:
    url = f"sqlite:///{tmp_path / 'admin.db'}"
    behind = rp(url, "db", "current")
    assert behind.exit_code == 1 and "rewardprism db upgrade" in behind.output
    assert f"at revision {migrate.head_revision()}" in ok(rp(url, "db", "upgrade"))
    registered = ok(rp(url, "models", "register", str(headset_dir), "--activate"))
    assert "registered drm-cli@1 (drm, 6 heads) - active" in registered
    listing = ok(rp(url, "models", "list"))
    assert "*  drm-cli  1" in listing and str(headset_dir) in listing

    ok(rp(url, "users", "create", "alice", "--name", "Alice", "--metadata", '{"team": "a"}'))
    ok(rp(url, "users", "create", "bob"))
    duplicate = rp(url, "users", "create", "alice")
    assert duplicate.exit_code == 2 and "already exists" in duplicate.output

    assert "profile version 1" in ok(rp(url, "users", "set-weights", "alice", '{"pc0+": 0.9, "pc1-": -0.4}'))
    shown = ok(rp(url, "users", "show", "alice", "--top", "2"))
    assert "drm-cli@1" in shown and "method manual" in shown and '{"team": "a"}' in shown
    top = [line.split() for line in shown.splitlines() if line.strip().startswith("pc")]
    assert [(t[0], t[1]) for t in top] == [("pc0+", "+0.9000"), ("pc1-", "-0.4000")]
    assert top[0][2] == "█" * 30 and len(top[1][2]) == round(0.4 / 0.9 * 30)  # bars scaled to the largest

    wrong_length = rp(url, "users", "set-weights", "alice", "[1, 2]")
    assert wrong_length.exit_code == 2 and "2 values, but there are 6 heads" in wrong_length.output
    stale = rp(url, "users", "set-weights", "alice", "[0, 0, 0, 0, 0, 1]", "--expected-version", "7")
    assert stale.exit_code == 2 and "not at version 7" in stale.output
    assert "default weights of drm-cli@1, profile version 2" in ok(rp(url, "users", "reset", "alice"))

    assert "1-1 of 1" in ok(rp(url, "users", "list", "--search", "ali"))
    ok(rp(url, "users", "disable", "bob"))
    disabled = ok(rp(url, "users", "list", "--disabled"))
    assert "bob" in disabled and "alice" not in disabled

    made = rp(url, "keys", "create", "-s", "score", "-s", "feedback", "--user", "alice", "--name", "app")
    token = ok(made).strip()
    assert "cannot be shown again" in made.stderr and token not in made.stderr
    bad_scope = rp(url, "keys", "create", "-s", "root")
    assert bad_scope.exit_code == 2 and "root" in bad_scope.output
    engine = make_engine(StoreSettings(database_url=url))
    sessions = make_sessions(engine)
    with sessions() as s:
        prefix = verify_api_key(s, token, "feedback").prefix
    assert prefix in ok(rp(url, "keys", "list"))
    ok(rp(url, "keys", "revoke", prefix))
    assert prefix not in ok(rp(url, "keys", "list")) and prefix in ok(rp(url, "keys", "list", "--all"))
    with sessions() as s, pytest.raises(InvalidApiKey):
        verify_api_key(s, token)

    export = tmp_path / "alice.json"
    ok(rp(url, "users", "export", "alice", "-o", str(export)))
    assert json.loads(ok(rp(url, "users", "export", "alice"))) == json.loads(export.read_text())
    other = f"sqlite:///{tmp_path / 'other.db'}"
    ok(rp(other, "db", "upgrade"))
    unknown_heads = rp(other, "users", "import", str(export))
    assert unknown_heads.exit_code == 2 and "unknown head set drm-cli@1" in unknown_heads.output
    ok(rp(other, "models", "register", str(headset_dir)))
    ok(rp(other, "users", "import", "-", input=export.read_text()))
    imported = json.loads(ok(rp(other, "users", "export", "alice")))
    assert imported["profile"]["weights"] == json.loads(export.read_text())["profile"]["weights"]

    assert rp(url, "users", "delete", "bob", input="n\n").exit_code == 1  # not confirmed: nothing happens
    ok(rp(url, "users", "delete", "alice", "--yes"))
    gone = rp(url, "users", "show", "alice")
    assert gone.exit_code == 2 and "unknown user 'alice'" in gone.output
    assert "bob" in ok(rp(url, "users", "list"))

    with sessions() as s:
        audit = s.execute(sa.select(AuditEntry.actor, AuditEntry.action, AuditEntry.details)).all()
    engine.dispose()
    assert {actor for actor, _, _ in audit} == {"tester"}
    assert [action for _, action, _ in audit] == [
        "models.register", "users.create", "users.create", "users.set-weights", "users.reset",
        "users.disable", "keys.create", "keys.revoke", "users.export", "users.export", "users.delete",
    ]
    assert token.split("_", 2)[2] not in json.dumps([details for _, _, details in audit])


@pytest.mark.postgres
def test_users_on_postgres(postgres_url: str, headset_dir: Path) -> None:
    user = f"pg-{uuid.uuid4().hex[:8]}"
    ok(rp(postgres_url, "db", "upgrade"))
    ok(rp(postgres_url, "models", "register", str(headset_dir), "--activate"))
    ok(rp(postgres_url, "users", "create", user, "--name", "Postgres User"))
    ok(rp(postgres_url, "users", "set-weights", user, json.dumps([0.1, 0.2, 0.3, -0.1, -0.2, -0.6])))
    shown = ok(rp(postgres_url, "users", "show", user, "--top", "1"))
    assert "version 1" in shown and "pc2-  -0.6000" in shown
    listing = ok(rp(postgres_url, "users", "list", "--search", user))
    assert user in listing and "drm-cli@1" in listing and "1-1 of 1" in listing


def test_password_in_database_url_is_never_printed() -> None:
    result = rp("postgresql://admin:s3cretpw@127.0.0.1:1/rewardprism", "users", "list")
    assert result.exit_code == 1
    assert "admin:***@127.0.0.1:1/rewardprism" in result.output and "s3cretpw" not in result.output


def test_console_script_reads_database_url_from_the_environment(tmp_path: Path) -> None:
    script = shutil.which("rewardprism", path=str(Path(sys.executable).parent))
    assert script is not None, "the rewardprism console script is not installed in this environment"
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'env.db'}"}
    done = subprocess.run([script, "db", "upgrade"], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"env.db is at revision {migrate.head_revision()}" in done.stdout


def test_register_refuses_a_folder_whose_tensors_changed_after_saving(tmp_path: Path, headset_dir: Path) -> None:
    """headset.json's hash is checked against the tensors at registration, not first at every replica's poll."""
    from safetensors.numpy import load_file, save_file

    url = f"sqlite:///{tmp_path / 'edited.db'}"
    ok(rp(url, "db", "upgrade"))
    edited = Path(shutil.copytree(headset_dir, tmp_path / "edited"))
    tensors = next(edited.glob("heads*.safetensors"))
    saved = load_file(tensors)
    save_file({**saved, "weight": saved["weight"] * 2}, tensors)  # headset.json still names the old hash
    refused = rp(url, "models", "register", str(edited), "--activate")
    assert refused.exit_code == 2 and "content hash mismatch" in refused.output
    assert ok(rp(url, "models", "list")).count("\n") == 2  # the header and its rule: nothing registered
    assert "registered drm-cli@1" in ok(rp(url, "models", "register", str(headset_dir)))  # the intact folder
