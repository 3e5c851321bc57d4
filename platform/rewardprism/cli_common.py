"""What the command-line shells share: a one-line error with exit code 2, the `--override` option, progress logs.

Every job (`rewardprism train`, train_drm.py, the Tune sweeps, the demo) takes `--config FILE.yaml` and repeated
`--override key.sub=value` (values read as YAML), loaded by `rewardprism.config.load_config`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Annotated, Any, NoReturn

import typer


def overrides(example: str) -> Any:
    """The `--override KEY=VALUE` option (repeatable), with an example of the command's own fields."""
    return Annotated[list[str] | None, typer.Option(
        "--override", metavar="KEY=VALUE",
        help=f"set a config field, e.g. {example} (repeatable; values are YAML; a.b is field b of section a)")]


def config_fields(cls: type) -> str:
    """A `--help` epilog naming every field of a job's config dataclass with its default, the names
    `--override` takes."""
    def default(f: dataclasses.Field) -> Any:
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    fields = ", ".join(f"{f.name}={default(f)!r}" for f in dataclasses.fields(cls))
    return f"Config fields (--override FIELD=VALUE, or the YAML file's keys), with their defaults: {fields}."


def fail(message: str) -> NoReturn:
    """A user error: one clear line on stderr and exit code 2, no traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def log_progress() -> None:
    """Show the recipes' progress lines (the `rewardprism` loggers at INFO) with a timestamp."""
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("rewardprism").setLevel(logging.INFO)
