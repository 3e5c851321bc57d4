"""`rewardprism serve`: prepare the database, then run the Serve config (serve_apps/config.yaml) as `serve run` does."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer
import yaml

from rewardprism.cli_common import fail

# serve_apps/ sits beside platform/ at the repository root (a source checkout or an editable install).
ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "serve_apps" / "config.yaml"


def serve(
    config: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="a Ray Serve config file")] = CONFIG,
    database_url: Annotated[str | None,
                            typer.Option(help="instead of DATABASE_URL (default: SQLite file here)")] = None,
    head_set: Annotated[Path | None, typer.Option(exists=True, file_okay=False,
                                                  help="register this saved head set and make it active first")] = None,
    migrate: Annotated[bool, typer.Option(help="upgrade the database schema to head first")] = True,
    host: Annotated[str | None, typer.Option(help="HTTP host to bind (default: the config's http_options.host)",
                                             show_default=False)] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, show_default=False,
                                             help="HTTP port (default: the config's http_options.port)")] = None,
) -> None:
    """Start the scoring service on a local Ray cluster (blocks; Ctrl-C stops it).

    The HTTP host and port are the config's http_options unless --host/--port are given. On a cluster, use the
    config itself (`serve deploy`, or the RayService in k8s/) with DATABASE_URL in the nodes' environment.
    """
    import sqlalchemy as sa
    from ray.serve.scripts import cli

    from rewardprism.heads import HeadSet
    from rewardprism.store import (
        StoreError,
        StoreSettings,
        make_engine,
        make_sessions,
        missing_sqlite_file,
        record_audit,
        register_head_set,
        safe_url,
    )
    from rewardprism.store.migrate import upgrade

    try:
        settings = StoreSettings.from_env(database_url)
        url = sa.make_url(settings.database_url)
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            # the replicas run in the repository root (below): pin a relative SQLite file to this directory
            url = url.set(database=str(Path(url.database).resolve()))
            settings = StoreSettings.from_env(url.render_as_string(hide_password=False))
        if not migrate and (missing := missing_sqlite_file(settings.database_url)) is not None:
            raise StoreError(f"no database file {missing}: create it with `rewardprism db upgrade` "
                             "(or leave out --no-migrate)")
        if migrate:
            upgrade(settings.database_url)
        if head_set is not None:
            heads = HeadSet.load(head_set)
            engine = make_engine(settings)
            with make_sessions(engine).begin() as session:
                row = register_head_set(session, heads, uri=str(head_set.resolve()), activate=True)
                record_audit(session, "cli:serve", "head_set.activate", row.label)
            engine.dispose()
            os.environ.setdefault("RP_HEAD_SET", heads.name)
    except (StoreError, ValueError, OSError) as exc:
        fail(str(exc))
    except sa.exc.DBAPIError as exc:  # e.g. Postgres down: one line, as the admin CLI says it
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        fail(f"database {safe_url(settings.database_url)}: {reason} (is it reachable?)")
    config = _with_http_options(config.resolve(), host, port)
    os.environ["DATABASE_URL"] = settings.database_url  # the replicas read it (config: "${DATABASE_URL}")
    os.chdir(ROOT)  # the config's import_path (serve_apps.app:app) is relative to the repository root
    typer.echo(f"serving {config} with database {safe_url(settings.database_url)}", err=True)
    cli.main(args=["run", str(config)], prog_name="serve", standalone_mode=True)


def _with_http_options(config: Path, host: str | None, port: int | None) -> Path:
    """The config, or a copy of it (in a temporary folder) with --host/--port set in its http_options."""
    if host is None and port is None:
        return config
    data = yaml.safe_load(config.read_text())
    options = data.setdefault("http_options", {})
    options.update({k: v for k, v in (("host", host), ("port", port)) if v is not None})
    copy = Path(tempfile.mkdtemp(prefix="rewardprism-serve-")) / config.name
    copy.write_text(yaml.safe_dump(data, sort_keys=False))
    return copy
