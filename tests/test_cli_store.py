"""`rewardprism db | users | keys | models` through the real command line, on SQLite files and Postgres."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import yaml
from click.testing import Result
from rewardprism.cli import app
from rewardprism.heads import HeadSet
from rewardprism.store import (
    AuditEntry,
    Feedback,
    InvalidApiKey,
    StoreSettings,
    make_engine,
    make_sessions,
    verify_api_key,
)
from rewardprism.store.migrate import head_revision
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
    assert f"at revision {head_revision()}" in ok(rp(url, "db", "upgrade"))
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
    # mirrored heads as one direction with its net weight w(+) − w(−): pc1- at −0.4 is pc1 at +0.4
    top = [line.split() for line in shown.splitlines() if line.strip().startswith("pc")]
    assert [(t[0], t[1]) for t in top] == [("pc0", "+0.9000"), ("pc1", "+0.4000")]
    assert top[0][2] == "█" * 30 and len(top[1][2]) == round(0.4 / 0.9 * 30)  # bars scaled to the largest
    assert "(3 directions" in shown

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
    assert "version 1" in shown and "pc2  +0.9000" in shown  # net of pc2+ (+0.3) and pc2- (-0.6)
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
    assert f"env.db is at revision {head_revision()}" in done.stdout


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


def test_export_import_round_trips_a_long_history_and_import_bounds_weights(tmp_path: Path, headset_dir: Path) -> None:
    """An export holds a whole history, past the per-call limit on pairs; imported weights are bounded as the
    API bounds them; metadata too deep to store is refused before anything is written."""
    source, target = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    for url in (source, target):
        ok(rp(url, "db", "upgrade"))
        ok(rp(url, "models", "register", str(headset_dir), "--activate"))
    ok(rp(source, "users", "create", "long"))
    ok(rp(source, "users", "set-weights", "long", json.dumps([0.5] * len(HEADS))))
    pairs = StoreSettings().limits.max_pairs_per_call + 1
    engine = make_engine(StoreSettings.from_env(source))
    with make_sessions(engine).begin() as session:
        user_id = session.execute(sa.text("SELECT id FROM users WHERE external_id = 'long'")).scalar_one()
        session.add_all(Feedback(user_id=user_id, prompt=f"q{i}", chosen="c", rejected="r", source="cli")
                        for i in range(pairs))
    engine.dispose()
    exported = tmp_path / "long.json"
    ok(rp(source, "users", "export", "long", "--output", str(exported)))
    assert f"({pairs} feedback pairs)" in ok(rp(target, "users", "import", str(exported)))
    again = json.loads(ok(rp(target, "users", "export", "long")))
    original = json.loads(exported.read_text())
    assert again["feedback"] == original["feedback"] and again["profile"]["weights"] == [0.5] * len(HEADS)

    huge = {**original, "external_id": "huge", "profile": {**original["profile"], "weights": [1e308] * len(HEADS)}}
    refused = rp(target, "users", "import", json.dumps(huge))
    assert refused.exit_code == 2 and "1e+06" in refused.output, refused.output
    deep = {"a": 1}
    for _ in range(100):
        deep = {"a": deep}
    refused = rp(target, "users", "create", "deep", "--metadata", json.dumps(deep))
    assert refused.exit_code == 2 and "nests deeper" in refused.output, refused.output
    refused = rp(target, "users", "import", "[" * 50_000 + "]" * 50_000)
    assert refused.exit_code == 2 and "nests too deeply" in refused.output, refused.output
    listing = ok(rp(target, "users", "list"))
    assert "huge" not in listing and "deep" not in listing


def test_reset_and_set_weights_follow_the_newly_active_version(tmp_path: Path, headset_dir: Path) -> None:
    """alice's profile is over drm-cli@1; once @2 is active, `users reset alice` resets her onto @2, not @1."""
    url = f"sqlite:///{tmp_path / 'reset.db'}"
    ok(rp(url, "db", "upgrade"))
    ok(rp(url, "models", "register", str(headset_dir), "--activate"))
    ok(rp(url, "users", "create", "alice"))
    ok(rp(url, "users", "set-weights", "alice", '{"pc0+": 1.0}'))
    rng = np.random.default_rng(1)
    second = HeadSet(rng.normal(size=(6, 8)), np.zeros(6), HEADS, "drm", "minilm", np.full(6, 1 / 6),
                     name="drm-cli", version="2").save(tmp_path / "drm-cli-2")
    ok(rp(url, "models", "register", str(second), "--activate"))
    assert "default weights of drm-cli@2" in ok(rp(url, "users", "reset", "alice"))
    assert "over drm-cli@2" in ok(rp(url, "users", "set-weights", "alice", '{"pc1+": 1.0}'))
    ok(rp(url, "users", "reset", "alice"))
    shown = ok(rp(url, "users", "show", "alice"))  # defaults 1/6 on every head: each direction nets 0
    assert "drm-cli@2" in shown and not [line for line in shown.splitlines() if line.strip().startswith("pc")]


def test_database_url_after_the_sub_command_and_a_missing_sqlite_file_is_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    for args in (["users", "list", "--database-url", f"sqlite:///{missing}"],
                 ["users", "--database-url", f"sqlite:///{missing}", "list"],
                 ["keys", "list", f"--database-url=sqlite:///{missing}"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert f"no database file {missing}" in result.output and "rewardprism db upgrade" in result.output
        assert not missing.exists()
    current = runner.invoke(app, ["db", "current", "--database-url", f"sqlite:///{missing}"])
    assert current.exit_code == 1 and "rewardprism db upgrade" in current.output and not missing.exists()
    url = f"sqlite:///{tmp_path / 'made.db'}"
    ok(runner.invoke(app, ["db", "upgrade", "--database-url", url]))  # the one command that creates the file
    ok(runner.invoke(app, ["users", "create", "bob", "--database-url", url, "--actor", "tester"]))
    assert "bob" in ok(runner.invoke(app, ["users", "list", "--database-url", url]))


def test_a_registered_version_with_other_content_says_how_to_fix_it(tmp_path: Path, headset_dir: Path) -> None:
    url = f"sqlite:///{tmp_path / 'collide.db'}"
    ok(rp(url, "db", "upgrade"))
    ok(rp(url, "models", "register", str(headset_dir)))
    rng = np.random.default_rng(2)
    other = HeadSet(rng.normal(size=(6, 8)), np.zeros(6), HEADS, "drm", "minilm", np.full(6, 1 / 6),
                    name="drm-cli", version="1").save(tmp_path / "other")
    result = rp(url, "models", "register", str(other))
    assert result.exit_code == 2
    assert "drm-cli@1 is registered with other content" in result.output and "--version" in result.output


def test_decompose_without_a_version_never_collides_on_register(tmp_path: Path) -> None:
    """Two different head sets from `decompose` with no --version both register (before: both were drm@1)."""
    from test_evaluate import linear_synthetic, write_embedding_folder

    write_embedding_folder(tmp_path / "emb", linear_synthetic(per_user=40))
    url = f"sqlite:///{tmp_path / 'reg.db'}"
    ok(rp(url, "db", "upgrade"))
    labels = []
    for k in (3, 4):
        made = json.loads(ok(runner.invoke(app, ["decompose", "--embeddings", str(tmp_path / "emb"), "--out",
                                                 str(tmp_path / f"h{k}"), "--components", str(k), "--no-calibrate"])))
        assert made["head_set"] == f"drm@{made['content_hash'][:8]}"
        labels.append(made["head_set"])
        assert f"registered {made['head_set']}" in ok(rp(url, "models", "register", str(tmp_path / f"h{k}")))
    assert labels[0] != labels[1]


def test_pools_register_refuses_features_holding_nan_naming_the_option(tmp_path: Path) -> None:
    from test_evaluate import linear_synthetic, write_embedding_folder

    data = linear_synthetic(per_user=20)
    write_embedding_folder(tmp_path / "emb", data)
    data.chosen[3, 2] = np.nan
    write_embedding_folder(tmp_path / "nan", data)
    url = f"sqlite:///{tmp_path / 'pools.db'}"
    ok(rp(url, "db", "upgrade"))
    ok(runner.invoke(app, ["decompose", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "h"),
                           "--components", "3", "--no-calibrate", "--version", "1"]))
    ok(rp(url, "models", "register", str(tmp_path / "h"), "--activate"))
    named = rp(url, "pools", "register", "bad name", "--head-set", "drm@1", "--embeddings", str(tmp_path / "none"))
    assert named.exit_code == 2 and named.output.startswith("error: NAME: pool name 'bad name' must be"), named.output
    bad = rp(url, "pools", "register", "p", "--head-set", "drm@1", "--embeddings", str(tmp_path / "nan"))
    assert bad.exit_code == 2 and bad.output.startswith("error: --embeddings: ") and "NaN" in bad.output
    assert "registered pool 'p'" in ok(rp(url, "pools", "register", "p", "--head-set", "drm@1", "--embeddings",
                                          str(tmp_path / "emb")))


def test_serve_against_a_missing_database_is_one_line_and_port_host_reach_the_config(
        tmp_path: Path, headset_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    down = runner.invoke(app, ["serve", "--database-url", "postgresql://rp:pw@127.0.0.1:1/none"])
    assert down.exit_code == 2 and "Traceback" not in down.output, down.output
    assert down.output.count("\n") == 1 and "database postgresql+psycopg://rp:***@127.0.0.1:1/none" in down.output
    missing = runner.invoke(app, ["serve", "--no-migrate", "--database-url", f"sqlite:///{tmp_path / 'no.db'}"])
    assert missing.exit_code == 2 and "no database file" in missing.output and not (tmp_path / "no.db").exists()

    from ray.serve.scripts import cli

    seen: dict[str, object] = {}

    def fake_serve_run(args: list[str], **_: object) -> None:  # Serve itself is tested in test_serve.py
        seen.update(yaml.safe_load(Path(args[1]).read_text()))
    monkeypatch.setattr(cli, "main", fake_serve_run)
    monkeypatch.chdir(tmp_path)  # serve changes directory and sets these: restored after the test
    for name in ("RP_HEAD_SET", "DATABASE_URL"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    result = runner.invoke(app, ["serve", "--database-url", url, "--head-set", str(headset_dir), "--port", "8123",
                                 "--host", "127.0.0.1"])
    assert result.exit_code == 0, result.output
    assert seen["http_options"] == {"host": "127.0.0.1", "port": 8123}
    assert seen["applications"][0]["import_path"] == "serve_apps.app:app"
    assert "*  drm-cli  1" in ok(rp(url, "models", "list"))


def test_users_history_and_audit_list(tmp_path: Path, headset_dir: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    ok(rp(url, "db", "upgrade"))
    ok(rp(url, "models", "register", str(headset_dir), "--activate"))
    for user in ("alice", "bob"):
        ok(rp(url, "users", "create", user))
    ok(rp(url, "users", "set-weights", "alice", '{"pc0+": 1.0}'))
    ok(rp(url, "users", "reset", "alice"))
    history = ok(rp(url, "users", "history", "alice"))
    assert re.search(r"\*\s+drm-cli@1\s+default\s+0\s+2", history), history  # reset: profile version 2
    actions = [line.split()[3] for line in history.split("audit log\n")[1].splitlines()[2:]]
    assert actions == ["users.reset", "users.set-weights", "users.create"]
    assert '"version": 1' in history and "tester" in history

    everything = ok(runner.invoke(app, ["audit", "list", "--database-url", url]))
    assert everything.count("users.create") == 2 and "models.register" in everything
    only_bob = ok(runner.invoke(app, ["audit", "list", "--user", "bob", "--database-url", url]))
    assert "bob" in only_bob and "alice" not in only_bob
    assert "users." not in ok(runner.invoke(app, ["audit", "list", "--since", "2999-01-01", "--database-url", url]))
    assert "users.reset" in ok(runner.invoke(app, ["audit", "list", "--since", "1h", "--database-url", url]))
    bad = runner.invoke(app, ["audit", "list", "--since", "yesterday", "--database-url", url])
    assert bad.exit_code == 2 and "--since" in bad.output
