"""The docs run as written: every ```bash block marked `<!-- runnable -->` in README.md and docs/serve.md is run,
in order, in one shell, from a fresh folder that looks like the repository root (its `.venv` is this test's
environment), against a throwaway SQLite database and small data (tiny-bert, 100 synthetic pairs; README says
how). A command that drifts from the code (a renamed option, a path no earlier block writes, a user never
created) fails here, naming the block.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/serve.md")  # run in this order: serve.md starts from README's head set
MARKER = "<!-- runnable -->"
SMALL = {"RP_EMBED_BACKBONE": "tiny-bert", "RP_SYNTHETIC_PER_USER": "25"}


def runnable_blocks(text: str, source: str) -> list[tuple[str, str]]:
    """(where, code) of each ```bash block that directly follows a MARKER line."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        start = next(j for j in range(i + 1, len(lines)) if lines[j].strip())
        if lines[start].strip() != "```bash":
            raise ValueError(f"{source}:{i + 1}: {MARKER} must be followed by a ```bash block")
        end = next(j for j in range(start + 1, len(lines)) if lines[j].strip() == "```")
        blocks.append((f"{source}:{start + 1}", "\n".join(lines[start + 1:end])))
    return blocks


def test_the_marker_picks_exactly_the_marked_blocks() -> None:
    text = f"```bash\nnot me\n```\n{MARKER}\n\n```bash\necho one\necho two\n```\n```bash\nnor me\n```\n"
    assert runnable_blocks(text, "x.md") == [("x.md:6", "echo one\necho two")]


def test_runnable_blocks_of_readme_and_serve_docs_run_in_order(tmp_path: Path) -> None:
    blocks = [b for doc in DOCS for b in runnable_blocks((ROOT / doc).read_text(), doc)]
    assert {where.split(":")[0] for where, _ in blocks} == set(DOCS) and len(blocks) >= 4
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))  # `.venv/bin/rewardprism` as the docs write it
    script = ["set -euo pipefail"]
    for where, code in blocks:
        script += [f"echo '### {where}' >&2", code]
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "RP_HEAD_SET")}
    env.update(SMALL, PYTHONPATH=os.pathsep.join([str(ROOT / "platform"), str(ROOT), env.get("PYTHONPATH", "")]),
               RP_ACTOR="docs-test", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    run = subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    failed_in = [line for line in run.stderr.splitlines() if line.startswith("### ")][-1:]
    assert run.returncode == 0, f"failed in {failed_in}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    # what the blocks promise exists: the head sets, alice's profile file, the registry and alice herself
    assert (tmp_path / "runs/heads-drm/headset.json").is_file() and (tmp_path / "runs/me.json").is_file()
    assert "active: drm@1" in run.stdout and "alice: default weights of drm@2" in run.stdout


def test_train_drm_help_lists_the_fields_override_takes() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "train_drm.py"), "--help"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert run.returncode == 0, run.stderr
    text = " ".join(run.stdout.split())
    assert "Embed a dataset, decompose" in text and "n_components=50" in text and "seeds=20" in text
