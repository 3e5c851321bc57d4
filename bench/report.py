"""Each benchmark owns one section of BENCHMARKS.md, replaced in place on every run."""
from __future__ import annotations

import datetime as dt
import platform
import re
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEach section is written by the script it names; rerun it to refresh the numbers.\n"


def machine() -> str:
    import os

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {device}, torch {torch.__version__}"


def write_section(name: str, command: str, body: str, path: Path = BENCHMARKS) -> None:
    """Replace (or append) the section `name` of `path` with `body`, stamped with the date, machine and
    command (a table the docs show too goes into them the same way)."""
    text = path.read_text() if path.exists() else HEADER
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"<!-- bench:{name} -->\n## {name}\n\n`{command}` — {stamp}, {machine()}\n\n{body.strip()}\n"
               f"<!-- /bench:{name} -->")
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.DOTALL)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)
