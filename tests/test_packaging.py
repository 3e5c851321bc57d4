"""The built wheel works outside the checkout: it carries serve_apps and the migrations, and nothing of it is read
from the source tree (issue 17, "An installable package")."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the wheel is built from (as k8s/Dockerfile copies it): a copy, so no stale build/ of the checkout leaks in.
SOURCES = ("pyproject.toml", "README.md", "platform", "serve_apps", "migrations")


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_wheel_installs_outside_the_checkout_with_serve_apps_and_migrations(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, source / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
        source, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("rewardprism-*.whl")

    # A fresh venv without pip. The wheel goes in with this interpreter's pip (--ignore-installed: that pip sees the
    # editable install of the checkout, which must neither satisfy nor be uninstalled); the dependencies (torch,
    # Ray, ...) are this environment's, appended to sys.path by a .pth line after the venv's own site-packages. A
    # path line does not run that folder's .pth files, so the editable install of the checkout stays out.
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--ignore-installed", "-q", wheel,
        cwd=tmp_path)
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "DATABASE_URL", "RP_"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    where = run(python, "-c", "import rewardprism, serve_apps.app, rewardprism.store.migrate as m; "
                "print(rewardprism.__file__); print(serve_apps.app.__file__); print(m.MIGRATIONS)",
                cwd=elsewhere, env=env).split()
    assert all(Path(p).is_relative_to(site) for p in where), where
    assert not any(Path(p).is_relative_to(ROOT) for p in where), where

    url = f"sqlite:///{elsewhere / 'store.db'}"
    out = run(venv / "bin" / "rewardprism", "db", "--database-url", url, "upgrade", cwd=elsewhere, env=env)
    head = run(python, "-c", "from rewardprism.store import migrate; print(migrate.head_revision())",
               cwd=elsewhere, env=env).strip()
    assert f"at revision {head}" in out and head != "None"
