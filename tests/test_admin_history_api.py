"""Reads for people over HTTP, on a real store (SQLite) the admin CLI wrote and a head set `decompose` made:
`GET /admin/audit` and `GET /admin/users/{id}/history` show what `audit list` and `users history` show, and
`GET /v1/heads` the served head set's cards."""
from __future__ import annotations

import asyncio
import secrets
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from rewardprism.cards import load_cards
from rewardprism.cli import app
from rewardprism.scoring import ScoredJob, ScoreJob
from test_evaluate import linear_synthetic, write_embedding_folder
from typer.testing import CliRunner

from serve_apps.api import create_api
from serve_apps.service import ScoringService
from serve_apps.settings import ServeSettings

ADMIN_KEY = secrets.token_hex(32)


async def fixed_head_scores(ref, job: ScoreJob) -> ScoredJob:
    """The Embedder's answer without a backbone: head scores 1, 2, 3, ... for every text."""
    head_scores = np.tile(np.arange(1.0, len(job.weights) + 1), (len(job.items), 1))
    return ScoredJob([False] * len(job.items), head_scores @ job.weights + job.bias, head_scores)


class NoMetrics:
    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def test_audit_and_history_over_http(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    write_embedding_folder(tmp_path / "emb", linear_synthetic(per_user=30))
    runner = CliRunner()
    made = runner.invoke(app, ["decompose", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "h"),
                               "--components", "2", "--no-calibrate", "--name", "h", "--version", "1"])
    assert made.exit_code == 0, made.output
    heads = tmp_path / "h"
    for args in (["db", "upgrade"], ["models", "register", str(heads), "--activate"], ["users", "create", "alice"],
                 ["users", "create", "bob"], ["users", "set-weights", "alice", "[1, 0, 0, 0, 0]"]):
        result = runner.invoke(app, [args[0], "--database-url", url, "--actor", "ops", *args[1:]])
        assert result.exit_code == 0, result.output

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    running: dict[str, uvicorn.Server] = {}

    def run() -> None:  # the service loads the active head set `h` at start, as a replica does
        async def main() -> None:
            scoring = ScoringService(ServeSettings(database_url=url, admin_key=ADMIN_KEY, head_set="h"),
                                     fixed_head_scores, NoMetrics())
            await scoring.start()
            running["server"] = uvicorn.Server(uvicorn.Config(create_api(scoring), host="127.0.0.1", port=port,
                                                              log_level="warning"))
            try:
                await running["server"].serve()
            finally:
                await scoring.close()
        asyncio.run(main())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not (running.get("server") and running["server"].started) and time.monotonic() < deadline:
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

        cards = load_cards(heads)
        served = http.get("/v1/heads").json()
        assert served["head_set"] == "h@1" and served["cards"] is True
        assert [h["head"] for h in served["heads"]] == ["population", "+pc0", "+pc1", "-pc0", "-pc1"]
        assert served["heads"][1]["summary"] == cards["+pc0"].summary and served["heads"][1]["highest"] is None
        with_pairs = http.get("/v1/heads", params={"excerpts": "true"}).json()
        assert with_pairs["heads"][1]["highest"][0]["chosen"] == cards["+pc0"].highest[0]["chosen"]
        # alice's weights [1, 0, 0, 0, 0]: the explanation names the one head that contributes, with its card
        scored = http.post("/v1/score", json={"user_id": "alice", "prompt": "p", "responses": ["r"],
                                              "explain": True, "explain_top": 3}).json()
        assert [(c["head"], c["summary"]) for c in scored["scores"][0]["explanation"]] == [
            ("population", cards["population"].summary)]
    finally:
        running["server"].should_exit = True
        thread.join(10)
