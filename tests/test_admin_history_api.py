"""The admin API's read of the audit log and of a user's history, over HTTP on a real store (SQLite) that the
admin CLI wrote: `GET /admin/audit` and `GET /admin/users/{id}/history` show what `audit list` and
`users history` show."""
from __future__ import annotations

import secrets
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from rewardprism.cli import app
from rewardprism.heads import HeadSet
from typer.testing import CliRunner

from serve_apps.api import create_api
from serve_apps.service import ScoringService
from serve_apps.settings import ServeSettings

ADMIN_KEY = secrets.token_hex(32)


class NoMetrics:
    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def test_audit_and_history_over_http(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    heads = HeadSet(np.random.default_rng(0).normal(size=(2, 4)), np.zeros(2), ["+pc0", "-pc0"], "drm", "minilm",
                    np.array([0.5, 0.5]), name="h", version="1").save(tmp_path / "h")
    runner = CliRunner()
    for args in (["db", "upgrade"], ["models", "register", str(heads), "--activate"], ["users", "create", "alice"],
                 ["users", "create", "bob"], ["users", "set-weights", "alice", "[1, 0]"]):
        result = runner.invoke(app, [args[0], "--database-url", url, "--actor", "ops", *args[1:]])
        assert result.exit_code == 0, result.output

    scoring = ScoringService(ServeSettings(database_url=url, admin_key=ADMIN_KEY), None, NoMetrics())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_api(scoring), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": ADMIN_KEY})
        entries = http.get("/admin/audit").json()
        assert [e["action"] for e in entries][:2] == ["users.set-weights", "users.create"]
        assert {e["actor"] for e in entries} == {"ops"}
        about_bob = http.get("/admin/audit", params={"user": "bob"}).json()
        assert [(e["action"], e["target"]) for e in about_bob] == [("users.create", "bob")]
        assert http.get("/admin/audit", params={"since": "2999-01-01T00:00:00"}).json() == []
        bad = http.get("/admin/audit", params={"since": "yesterday"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "since"]

        history = http.get("/admin/users/alice/history").json()
        assert [(p["head_set"], p["active"], p["method"], p["version"]) for p in history["profiles"]] == [
            ("h@1", True, "manual", 1)]
        assert [e["action"] for e in history["audit"]] == ["users.set-weights", "users.create"]
        assert http.get("/admin/users/nobody/history").status_code == 404
        assert httpx.get(f"http://127.0.0.1:{port}/admin/audit").status_code == 401
    finally:
        server.should_exit = True
        thread.join(10)
