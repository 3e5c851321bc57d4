"""`make demo`, the main job, end to end on the embedded default in a reduced form (10 held-out pairs per user
instead of 300): its own local Ray, Ray Data embedding with MiniLM, DRM head set, SQLite store, the Serve app
over HTTP, feedback from four simulated users, the three who differ asked pairs by the service, and their scores."""
from __future__ import annotations

import re
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

from rewardprism.synthetic import DEFAULT_USERS

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_the_main_job_end_to_end(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "rewardprism.demo", "--override", f"workdir={tmp_path}",
                           "--override", f"port={port}", "--override", "held_out=10"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for noise in ("Running Dataset", "Execution plan", "INFO"):  # Ray's logs stay out of the story
        assert noise not in out + proc.stderr, (noise, proc.stderr[-3000:])
    assert "embedding: 100%" in proc.stderr  # its own bar
    for step in ("[1]", "[2] embedded 800 pairs", "[3] store: sqlite", "[4] each user sends 15 labelled pairs",
                 "[5] scores for", "held-out accuracy on 10 new pairs per user",
                 "[6] the users who differ from the majority, as new users asked 5 pairs",
                 "[7] a new head set", "migrated 7 users (75 pairs)", "personalized rankings on demo@2 vs demo@1"):
        assert step in out, out
    found = re.findall(r"^\s+(\w+)\s+personalized (\d\.\d\d)\s+population \d\.\d\d$", out, re.MULTILINE)
    rows = dict(found[:len(DEFAULT_USERS)])  # on demo@1 (the rest: after the rollout)
    assert set(rows) == {u.name for u in DEFAULT_USERS} and len(found) == 2 * len(DEFAULT_USERS), out
    asked = re.findall(r"^\s+(\w+)\s+5 asked pairs (\d\.\d\d)\s+15 random pairs (\d\.\d\d)$", out, re.MULTILINE)
    assert [name for name, *_ in asked] == [u.name for u in DEFAULT_USERS[1:]], out
    assert all(random == rows[name] for name, _, random in asked)
    minority = {f"{u.name}-asked" for u in DEFAULT_USERS[1:]}
    with sqlite3.connect(tmp_path / "rewardprism.db") as db:  # what the users' feedback left in the store
        stored = dict(db.execute("SELECT u.external_id, COUNT(f.id) FROM users u JOIN feedback f ON f.user_id = u.id "
                                 "GROUP BY u.external_id"))
        versions = set(db.execute("SELECT u.external_id, h.version, p.version, p.n_pairs FROM users u JOIN profiles p "
                                  "ON p.user_id = u.id JOIN head_sets h ON h.id = p.head_set_id"))
        cited = set(db.execute("SELECT u.external_id, COUNT(DISTINCT f.query_id) FROM users u JOIN feedback f ON "
                               "f.user_id = u.id WHERE f.query_id LIKE 'pool:%' GROUP BY u.external_id"))
    assert stored == {**{u.name: 15 for u in DEFAULT_USERS}, **{name: 5 for name in minority}}
    assert cited == {(name, 5) for name in minority}  # five different pool pairs, each answered citing its query
    # over demo@1 a profile written once from all 15 pairs (asked users: once per answer); over demo@2 migrated
    assert versions == ({(u.name, v, 1, 15) for u in DEFAULT_USERS for v in ("1", "2")}
                        | {(name, "1", 5, 5) for name in minority} | {(name, "2", 1, 5) for name in minority})


def test_a_bad_demo_config_exits_naming_the_field_before_anything_starts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rewardprism.demo", "--config", str(ROOT / "configs" / "demo.yaml"),
                           "--override", f"workdir={tmp_path / 'demo'}", "--override", "held_out=0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "error: held_out: must be a positive number of pairs" in proc.stderr, proc.stderr
    assert not (tmp_path / "demo").exists()
