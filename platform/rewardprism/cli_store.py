"""Admin commands over the store: `rewardprism db | users | keys | models ...`.

Each command runs in one transaction; those that change something, or read a user's data out, write an
audit-log entry in that same transaction. The database is `--database-url`, else $DATABASE_URL, else
sqlite:///rewardprism.db in the working directory; it is only ever shown with its password masked.
"""
from __future__ import annotations

import getpass
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, NoReturn

import click
import sqlalchemy as sa
import typer
from sqlalchemy.orm import Session
from typer.core import TyperGroup

from rewardprism.cards import load_cards
from rewardprism.store import (
    SCOPES,
    Feedback,
    HeadSetRow,
    StoreError,
    StoreSettings,
    User,
    activate_head_set,
    create_api_key,
    create_user,
    delete_user,
    export_user,
    get_head_set,
    get_user,
    import_user,
    list_api_keys,
    list_audit,
    list_head_sets,
    list_users,
    make_engine,
    make_sessions,
    migrate,
    missing_sqlite_file,
    record_audit,
    register_head_set,
    reset_profile,
    revoke_api_key,
    safe_url,
    save_profile,
    set_user_disabled,
)

_GROUP_OPTIONS = ("--database-url", "--actor")


class _AdminGroup(TyperGroup):
    """A command group whose own options (--database-url, --actor) may also follow the sub-command:
    `users list --database-url URL` is read as `users --database-url URL list`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        moved: list[str] = []
        rest: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                rest.extend(args[i:])
                break
            if arg in _GROUP_OPTIONS and i + 1 < len(args):
                moved.extend(args[i:i + 2])
                i += 2
                continue
            if arg.partition("=")[0] in _GROUP_OPTIONS and "=" in arg:
                moved.append(arg)
            else:
                rest.append(arg)
            i += 1
        return super().parse_args(ctx, moved + rest)


def _group(help: str) -> typer.Typer:
    return typer.Typer(cls=_AdminGroup, help=help, no_args_is_help=True)


db_app = _group("The database schema (Alembic migrations).")
users_app = _group("Users, their profiles and feedback.")
keys_app = _group("API keys for clients and admins.")
models_app = _group("The head-set registry: which saved heads are served.")
audit_app = _group("The audit log: who changed or read out what, and when.")


@dataclass(frozen=True)
class _Admin:
    settings: StoreSettings
    actor: str  # recorded in the audit log


def _connect(
    ctx: typer.Context,
    database_url: Annotated[str | None, typer.Option(
        "--database-url", show_default=False,
        help="SQLAlchemy URL (before or after the sub-command); default: $DATABASE_URL, else "
             "sqlite:///rewardprism.db in the working directory",
    )] = None,
    actor: Annotated[str | None, typer.Option(
        help="who is acting, for the audit log; default: $RP_ACTOR or your login")] = None,
) -> None:
    try:
        settings = StoreSettings.from_env(database_url)
    except StoreError as exc:
        _fail(str(exc))
    ctx.obj = _Admin(settings, actor or os.environ.get("RP_ACTOR") or getpass.getuser())


for _sub in (db_app, users_app, keys_app, models_app, audit_app):
    _sub.callback()(_connect)


def _fail(message: str, code: int = 2) -> NoReturn:
    """A user error: one line on stderr and exit code 2 (as in rewardprism.cli), no traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def _errors(settings: StoreSettings) -> Iterator[None]:
    """Store and database errors as one line each; the URL shown has its password masked."""
    try:
        yield
    except StoreError as exc:
        _fail(str(exc))
    except sa.exc.DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        _fail(f"database {safe_url(settings.database_url)}: {reason} "
              "(is it reachable, and migrated with `rewardprism db upgrade`?)", code=1)


def _refuse_missing_file(settings: StoreSettings) -> None:
    if (path := missing_sqlite_file(settings.database_url)) is not None:
        _fail(f"no database file {path}: create it with `rewardprism db upgrade` (or give --database-url)")


@contextmanager
def _transaction(ctx: typer.Context) -> Iterator[Session]:
    """One session, committed when the command body finishes and rolled back if it fails."""
    admin: _Admin = ctx.obj
    _refuse_missing_file(admin.settings)
    engine = make_engine(admin.settings)
    try:
        with _errors(admin.settings), make_sessions(engine).begin() as session:
            yield session
    finally:
        engine.dispose()


def _audit(ctx: typer.Context, session: Session, action: str, target: str, **details: Any) -> None:
    record_audit(session, ctx.obj.actor, action, target, details, limits=ctx.obj.settings.limits)


def _read_json(source: str) -> Any:
    """JSON from a file path, from stdin for '-', or the argument itself when it is not a file."""
    if source == "-":
        text = sys.stdin.read()
    elif _is_file(source):
        text = Path(source).read_text()
    else:
        text = source
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(f"not valid JSON (nor a file): {exc}")
    except RecursionError:
        _fail("the JSON nests too deeply to read")


def _is_file(source: str) -> bool:
    try:
        return Path(source).is_file()
    except OSError:  # e.g. inline JSON longer than a file name may be
        return False


def _when(value: datetime | None) -> str:
    return "" if value is None else f"{value:%Y-%m-%d %H:%M}"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(header), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    typer.echo("\n".join(lines))


def _pick_head_set(session: Session, user: User, name: str | None) -> HeadSetRow:
    """--head-set NAME: its active version; else the active version of the profile's head set (the profile's own
    version when none is active); else the only active head set."""
    if name is not None:
        return get_head_set(session, name)
    if user.profile is not None:  # the active version of the profile's head set, which may be newer
        own = user.profile.head_set
        return own if own.active else next((h for h in list_head_sets(session, own.name) if h.active), own)
    active = [h for h in list_head_sets(session) if h.active]
    if len(active) != 1:
        _fail(f"user {user.external_id!r} has no profile and {len(active)} head sets are active "
              f"({', '.join(h.label for h in active) or 'none'}): choose one with --head-set NAME")
    return active[0]


# ---------------------------------------------------------------------------------------------- db


@contextmanager
def _migrations(ctx: typer.Context) -> Iterator[tuple[ModuleType, str]]:
    """The migrate module and the URL; Alembic is imported only here, so other commands start faster."""
    from alembic.util import CommandError


    settings: StoreSettings = ctx.obj.settings
    with _errors(settings):
        try:
            yield migrate, settings.database_url
        except CommandError as exc:  # e.g. an unknown revision
            _fail(str(exc))


@db_app.command("upgrade")
def db_upgrade(
    ctx: typer.Context, revision: Annotated[str, typer.Argument(help="target revision")] = "head"
) -> None:
    """Migrate the database up to REVISION (default: the newest); creates an SQLite file if needed."""
    with _migrations(ctx) as (migrate, url):
        migrate.upgrade(url, revision)
        typer.echo(f"{safe_url(url)} is at revision {migrate.current_revision(url)}")


@db_app.command("downgrade")
def db_downgrade(
    ctx: typer.Context,
    revision: Annotated[str, typer.Argument(help="target revision; 'base' drops every table")],
) -> None:
    """Migrate the database down to REVISION."""
    _refuse_missing_file(ctx.obj.settings)
    with _migrations(ctx) as (migrate, url):
        migrate.downgrade(url, revision)
        typer.echo(f"{safe_url(url)} is at revision {migrate.current_revision(url) or 'base (empty)'}")


@db_app.command("current")
def db_current(ctx: typer.Context) -> None:
    """Show the database's revision and whether it is the newest; exit code 1 when it is behind."""
    with _migrations(ctx) as (migrate, url):
        missing = missing_sqlite_file(url) is not None  # reported as empty, not created by looking
        current, head = None if missing else migrate.current_revision(url), migrate.head_revision()
    typer.echo(f"{safe_url(url)}: revision {current or 'none (empty)'}, newest {head}")
    if current != head:
        _fail("the schema is behind: run `rewardprism db upgrade`", code=1)


# ---------------------------------------------------------------------------------------------- users


@users_app.command("create")
def users_create(
    ctx: typer.Context,
    external_id: Annotated[str, typer.Argument(help="the calling application's id for this user")],
    name: Annotated[str | None, typer.Option(help="display name")] = None,
    metadata: Annotated[str | None, typer.Option(help="JSON object: inline, a file, or - for stdin")] = None,
) -> None:
    """Create a user (with no profile: they score with the head set's default weights until adapted)."""
    meta = _read_json(metadata) if metadata is not None else None
    with _transaction(ctx) as session:
        user = create_user(session, external_id, display_name=name, metadata=meta,
                           limits=ctx.obj.settings.limits)
        _audit(ctx, session, "users.create", external_id)
    typer.echo(f"created user {user.external_id}")


@users_app.command("list")
def users_list(
    ctx: typer.Context,
    search: Annotated[str | None, typer.Option(help="part of the external id or display name")] = None,
    disabled: Annotated[bool | None, typer.Option("--disabled/--enabled", help="only those")] = None,
    method: Annotated[str | None, typer.Option(help="only profiles adapted by this method")] = None,
    head_set: Annotated[str | None, typer.Option(help="only profiles over this head-set name")] = None,
    limit: Annotated[int, typer.Option(min=1, help="rows per page")] = 50,
    offset: Annotated[int, typer.Option(min=0, help="rows to skip")] = 0,
) -> None:
    """List users as a table, with their profiles."""
    with _transaction(ctx) as session:
        page = list_users(session, offset=offset, limit=limit, search=search, disabled=disabled,
                          method=method, head_set_name=head_set)
        rows = [
            (u.external_id, u.display_name or "", "yes" if u.disabled else "",
             *((p.head_set.label, p.method, p.n_pairs, p.version) if (p := u.profile) else ("-", "", "", "")),
             _when(u.created_at))
            for u in page.items
        ]
    _table(("user", "name", "disabled", "head set", "method", "pairs", "version", "created"), rows)
    shown = f"{offset + 1}-{offset + len(rows)}" if rows else "none"
    typer.echo(f"{shown} of {page.total}")


def net_directions(names: Sequence[str], weights: Sequence[float]) -> list[tuple[str, float]]:
    """(label, weight) per direction: a mirrored pair of heads (`+pc3`/`-pc3`, or `pc3+`/`pc3-`, whose scores
    are each other's negatives) is one direction `pc3` with net weight w(+) − w(−); other heads as they are."""
    index = {name: i for i, name in enumerate(names)}
    out = []
    for name, w in zip(names, weights):
        base, sign = (name[1:], name[0]) if name[:1] in "+-" else (name[:-1], name[-1:])
        plus, minus = (f"+{base}", f"-{base}") if name[:1] in "+-" else (f"{base}+", f"{base}-")
        if sign in ("+", "-") and plus in index and minus in index:
            if sign == "+":
                out.append((base, weights[index[plus]] - weights[index[minus]]))
        else:
            out.append((name, w))
    return out


def _weight_chart(names: Sequence[str], weights: Sequence[float], top: int, width: int = 30,
                  summaries: Mapping[str, str] | None = None) -> list[str]:
    """A one-line-per-60-directions sparkline of the net weights, then the `top` directions by |net weight|
    (those weighted 0 left out) as bars, each with the one-line summary of the card of the head it leans on."""
    ticks = "▁▂▃▄▅▆▇█"
    directions = net_directions(names, weights)
    values = [w for _, w in directions]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    spark = "".join(ticks[round((w - low) / span * (len(ticks) - 1))] for w in values)
    lines = [f"  {i:>4}  {spark[i:i + 60]}" for i in range(0, len(spark), 60)]
    lines.append(f"        min {low:+.3f}  max {high:+.3f}  ({len(values)} directions: mirrored ±heads as one)")
    largest = max(abs(w) for w in values) or 1.0
    ranked = [i for i in sorted(range(len(values)), key=lambda i: -abs(values[i])) if values[i]][:top]
    label = max((len(directions[i][0]) for i in ranked), default=0)
    for i in ranked:
        name, w = directions[i]
        bar = "█" * max(1, round(abs(w) / largest * width))
        sign = "+" if w >= 0 else "-"
        card = next((summaries[n] for n in (name, f"{sign}{name}", f"{name}{sign}") if n in summaries), "") \
            if summaries else ""
        lines.append(f"  {name:<{label}}  {w:+.4f}  {typer.style(bar.ljust(width), fg='green' if w >= 0 else 'red')}"
                     + (f"  {sign}{name}: {card}" if card and name not in summaries else f"  {card}" if card else ""))
    return lines


@users_app.command("show")
def users_show(
    ctx: typer.Context,
    external_id: Annotated[str, typer.Argument()],
    top: Annotated[int, typer.Option(min=1, help="how many directions to name")] = 5,
) -> None:
    """Show a user and their profile: the net weight of each direction as a chart, the strongest named."""
    with _transaction(ctx) as session:
        user = get_user(session, external_id)
        pairs = session.scalar(sa.select(sa.func.count(Feedback.id)).where(Feedback.user_id == user.id))
    state = "disabled" if user.disabled else "enabled"
    typer.echo(f"user     {user.external_id}  {user.display_name or ''}  "
               f"({state}, created {_when(user.created_at)})")
    if user.meta:
        typer.echo(f"metadata {json.dumps(user.meta)}")
    typer.echo(f"feedback {pairs} pairs")
    profile = user.profile
    if profile is None:
        typer.echo("profile  none yet: scored with the active head set's default weights")
        return
    heads = profile.head_set
    typer.echo(f"profile  {heads.label} ({heads.kind}, {heads.num_heads} heads), "
               f"method {profile.method}, {profile.n_pairs} pairs, version {profile.version}, "
               f"bias {profile.bias:+.4f}, updated {_when(profile.updated_at)}")
    typer.echo("net weights")
    cards = load_cards(heads.uri) if Path(heads.uri).is_dir() else None  # `rewardprism heads show` explains them
    summaries = {name: card.summary for name, card in cards.items()} if cards else None
    for line in _weight_chart(heads.head_names, profile.weights, top, summaries=summaries):
        typer.echo(line)


@users_app.command("history")
def users_history(
    ctx: typer.Context,
    external_id: Annotated[str, typer.Argument()],
    limit: Annotated[int, typer.Option(min=1, help="audit entries shown, newest first")] = 50,
) -> None:
    """A user's profiles (one per head-set version: method, pairs, version, when) and the audit log about them.

    Each profile row holds its latest weights only; earlier versions of a profile are not stored, so the audit
    entries (who set, reset, imported or exported, with the version made) are its history.
    """
    with _transaction(ctx) as session:
        user = get_user(session, external_id)
        profiles = sorted(user.profiles, key=lambda p: (p.updated_at, p.id), reverse=True)
        rows = [("*" if p.head_set.active else "", p.head_set.label, p.method, p.n_pairs, p.version,
                 _when(p.created_at), _when(p.updated_at)) for p in profiles]
        audit = [(_when(e.created_at), e.actor, e.action, json.dumps(e.details, ensure_ascii=False))
                 for e in list_audit(session, target=external_id, limit=limit)]
    typer.echo(f"profiles of {external_id} ('*': over the active version of its head set)")
    _table(("", "head set", "method", "pairs", "version", "created", "updated"), rows)
    typer.echo("audit log")
    _table(("when", "actor", "action", "details"), audit)


@users_app.command("set-weights")
def users_set_weights(
    ctx: typer.Context,
    external_id: Annotated[str, typer.Argument()],
    weights: Annotated[str, typer.Argument(help="a JSON list, or {head name: weight} (other heads 0); "
                                                "inline, a file, or - for stdin")],
    head_set: Annotated[str | None, typer.Option(help="use the active version of this head set")] = None,
    bias: Annotated[float, typer.Option(help="added to every personalized score")] = 0.0,
    expected_version: Annotated[int | None, typer.Option(
        help="refuse unless the profile is still at this version (default: whatever it is now)")] = None,
) -> None:
    """Set a user's weights by hand (method 'manual')."""
    value = _read_json(weights)
    with _transaction(ctx) as session:
        user = get_user(session, external_id)
        heads = _pick_head_set(session, user, head_set)
        if isinstance(value, dict):
            unknown = set(value) - set(heads.head_names)
            if unknown:
                _fail(f"no heads named {sorted(unknown)} in {heads.label}")
            value = [value.get(name, 0.0) for name in heads.head_names]
        current = profile.version if (profile := user.profile_on(heads.id)) else None
        profile = save_profile(session, external_id, value, method="manual", bias=bias, head_set=heads,
                               expected_version=current if expected_version is None else expected_version)
        _audit(ctx, session, "users.set-weights", external_id, head_set=heads.label, version=profile.version)
    typer.echo(f"{external_id}: profile version {profile.version} over {heads.label}")


@users_app.command("reset")
def users_reset(
    ctx: typer.Context,
    external_id: Annotated[str, typer.Argument()],
    head_set: Annotated[str | None, typer.Option(help="reset to the active version of this head set")] = None,
) -> None:
    """Reset a user's weights to the head set's defaults (their feedback is kept)."""
    with _transaction(ctx) as session:
        heads = _pick_head_set(session, get_user(session, external_id), head_set)
        profile = reset_profile(session, external_id, heads)
        _audit(ctx, session, "users.reset", external_id, head_set=heads.label, version=profile.version)
    typer.echo(f"{external_id}: default weights of {heads.label}, profile version {profile.version}")


def _set_disabled(ctx: typer.Context, external_id: str, disabled: bool) -> None:
    with _transaction(ctx) as session:
        set_user_disabled(session, external_id, disabled)
        _audit(ctx, session, "users.disable" if disabled else "users.enable", external_id)
    typer.echo(f"{external_id}: {'disabled' if disabled else 'enabled'}")


@users_app.command("disable")
def users_disable(ctx: typer.Context, external_id: Annotated[str, typer.Argument()]) -> None:
    """Disable a user: no more feedback or profile changes, and keys bound to them stop working."""
    _set_disabled(ctx, external_id, True)


@users_app.command("enable")
def users_enable(ctx: typer.Context, external_id: Annotated[str, typer.Argument()]) -> None:
    """Enable a disabled user again."""
    _set_disabled(ctx, external_id, False)


@users_app.command("delete")
def users_delete(
    ctx: typer.Context,
    external_id: Annotated[str, typer.Argument()],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
) -> None:
    """Delete a user with their profile, feedback and API keys."""
    if not yes:
        typer.confirm(f"delete user {external_id!r} and all their feedback and keys?", abort=True)
    with _transaction(ctx) as session:
        delete_user(session, external_id)
        _audit(ctx, session, "users.delete", external_id)
    typer.echo(f"deleted user {external_id}")


@users_app.command("export")
def users_export(
    ctx: typer.Context,
    external_id: Annotated[str, typer.Argument()],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write here, not to stdout")] = None,
) -> None:
    """Export a user, their profile and feedback as JSON (for `users import`)."""
    with _transaction(ctx) as session:
        data = export_user(session, external_id)
        _audit(ctx, session, "users.export", external_id, pairs=len(data["feedback"]))
    text = json.dumps(data, indent=1, ensure_ascii=False)
    if output is None:
        typer.echo(text)
    else:
        output.write_text(text + "\n")
        typer.echo(f"wrote {output}", err=True)


@users_app.command("import")
def users_import(
    ctx: typer.Context, source: Annotated[str, typer.Argument(help="a `users export` file, or -")]
) -> None:
    """Import a user from `users export` JSON; their head set must be registered here."""
    data = _read_json(source)
    with _transaction(ctx) as session:
        user = import_user(session, data, limits=ctx.obj.settings.limits)
        _audit(ctx, session, "users.import", user.external_id, pairs=len(data["feedback"]))
    typer.echo(f"imported user {user.external_id} ({len(data['feedback'])} feedback pairs)")


# ---------------------------------------------------------------------------------------------- keys


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    scope: Annotated[list[str], typer.Option("--scope", "-s", help=f"repeatable: {', '.join(SCOPES)}")],
    user: Annotated[str | None, typer.Option(help="bind the key to this user: it acts only for them")] = None,
    name: Annotated[str | None, typer.Option(help="a label, e.g. the client's name")] = None,
) -> None:
    """Create an API key and print its token once (only a salted hash is stored)."""
    with _transaction(ctx) as session:
        key, token = create_api_key(session, scope, user_external_id=user, name=name)
        _audit(ctx, session, "keys.create", key.prefix, scopes=key.scopes, user=user)
    typer.echo(token)
    typer.echo(f"key {key.prefix} ({', '.join(key.scopes)}): keep the token above; it cannot be shown again",
               err=True)


@keys_app.command("revoke")
def keys_revoke(
    ctx: typer.Context, prefix: Annotated[str, typer.Argument(help="the key's prefix, from `keys list`")]
) -> None:
    """Revoke an API key; it stops working at once, on every service replica (the store's auth epoch moves)."""
    with _transaction(ctx) as session:
        revoke_api_key(session, prefix)
        _audit(ctx, session, "keys.revoke", prefix)
    typer.echo(f"revoked key {prefix}")


@keys_app.command("list")
def keys_list(
    ctx: typer.Context, all_: Annotated[bool, typer.Option("--all", help="include revoked keys")] = False
) -> None:
    """List API keys (prefixes and scopes; the secrets are not stored)."""
    with _transaction(ctx) as session:
        rows = [(k.prefix, k.name or "", ",".join(k.scopes), k.user.external_id if k.user else "",
                 _when(k.created_at), _when(k.revoked_at))
                for k in list_api_keys(session, include_revoked=all_)]
    _table(("prefix", "name", "scopes", "user", "created", "revoked"), rows)


# ---------------------------------------------------------------------------------------------- models


@models_app.command("list")
def models_list(
    ctx: typer.Context, name: Annotated[str | None, typer.Option(help="only this head-set name")] = None
) -> None:
    """List registered head sets; '*' marks the active (served) version of each name."""
    with _transaction(ctx) as session:
        rows = [("*" if h.active else "", h.name, h.version, h.kind, h.backbone, h.dim, h.num_heads,
                 h.content_hash, _when(h.created_at), h.uri)
                for h in list_head_sets(session, name)]
    _table(("", "name", "version", "kind", "backbone", "dim", "heads", "hash", "registered", "uri"), rows)


@models_app.command("activate")
def models_activate(
    ctx: typer.Context, name: Annotated[str, typer.Argument()], version: Annotated[str, typer.Argument()],
    require_no_regression: Annotated[bool, typer.Option(
        help="refuse unless the shadow evaluation against the active version passes (see `models report`)")] = False,
    min_pairs: Annotated[int, typer.Option(help="with --require-no-regression: see `models report`")] = 5,
    max_drop: Annotated[float, typer.Option(help="with --require-no-regression: see `models report`")] = 10.0,
    max_losing_share: Annotated[float, typer.Option(
        help="with --require-no-regression: the largest share of users allowed to lose more than --max-drop "
             "points")] = 0.05,
) -> None:
    """Serve this version of head set NAME (the previously active version of NAME is deactivated).

    Replicas switch to it and to their users' profiles over it together; run `models migrate` first, or users
    without a profile over it are scored with its default weights until they send feedback.
    """
    if require_no_regression:
        report = _shadow_report(ctx, name, version, min_pairs=min_pairs, max_drop=max_drop)
        failures = report.gate_failures(max_losing_share)
        if failures:
            _fail(f"not activating {name}@{version}: " + "; ".join(failures))
    with _transaction(ctx) as session:
        activate_head_set(session, name, version)
        _audit(ctx, session, "models.activate", f"{name}@{version}")
    typer.echo(f"active: {name}@{version}")


def _loaded(ctx: typer.Context, name: str, version: str | None):
    """The registry row id, the HeadSet from its uri, and an extractor of the features it was fitted on."""
    from rewardprism.embed import EmbeddingExtractor
    from rewardprism.heads import HeadSet

    with _transaction(ctx) as session:
        row = get_head_set(session, name, version)
        row_id, uri, label = row.id, row.uri, row.label
    try:
        heads = HeadSet.load(uri)
        return row_id, heads, EmbeddingExtractor(heads.feature_spec().load_backbone())
    except (OSError, ValueError) as exc:
        _fail(f"cannot load {label} from {uri}: {exc}")


def _shadow_report(ctx: typer.Context, name: str, version: str, *, min_pairs: int, max_drop: float,
                   against: str | None = None):
    from rewardprism.store.rollout import shadow_report

    if against is None:
        with _transaction(ctx) as session:
            active = [h.version for h in list_head_sets(session, name) if h.active]
        if not active:
            _fail(f"no version of {name} is active to compare {name}@{version} with: give --against VERSION")
        against = active[0]
    _, old, old_extractor = _loaded(ctx, name, against)
    _, new, new_extractor = _loaded(ctx, name, version)
    engine = make_engine(ctx.obj.settings)
    try:
        with _errors(ctx.obj.settings):
            report = shadow_report(make_sessions(engine), (old, old_extractor), (new, new_extractor),
                                   min_pairs=min_pairs, folds=min(5, min_pairs), max_drop_points=max_drop)
    except ValueError as exc:
        _fail(str(exc))
    finally:
        engine.dispose()
    typer.echo(f"shadow evaluation: {name}@{against} (old) vs {name}@{version} (new), "
               f"{min(5, min_pairs)}-fold cross-validation on each user's own pairs")
    for line in report.lines():
        typer.echo(f"  {line}")
    return report


@models_app.command("report")
def models_report(
    ctx: typer.Context, name: Annotated[str, typer.Argument()], version: Annotated[str, typer.Argument()],
    against: Annotated[str | None, typer.Option(help="the old version (default: the active one)")] = None,
    min_pairs: Annotated[int, typer.Option(help="evaluate users with at least this many feedback pairs")] = 5,
    max_drop: Annotated[float, typer.Option(help="a user loses when their accuracy drops by more than this "
                                                 "many points")] = 10.0,
) -> None:
    """Shadow evaluation of VERSION against the active version, on every user's own feedback pairs."""
    if min_pairs < 2:
        _fail("--min-pairs must be at least 2 (one pair to adapt on, one to test)")
    _shadow_report(ctx, name, version, min_pairs=min_pairs, max_drop=max_drop,
                   against=against)


@models_app.command("migrate")
def models_migrate(
    ctx: typer.Context, name: Annotated[str, typer.Argument()], version: Annotated[str, typer.Argument()],
    method: Annotated[str, typer.Option(help="adaptation method: default, hyre or bt (as the service's "
                                             "RP_ADAPTATION)")] = "default",
    batch_users: Annotated[int, typer.Option(help="users read, adapted and written per transaction")] = 256,
    progress: Annotated[bool, typer.Option(help="show a progress bar on stderr")] = True,
) -> None:
    """Re-adapt every user with feedback onto NAME@VERSION from their feedback, without activating it.

    Resumable: a rerun (after a crash or kill) skips users already up to date. Users who send feedback while it
    runs are caught up before it finishes.
    """
    from tqdm.auto import tqdm

    from rewardprism.adapt import METHODS
    from rewardprism.store.rollout import migrate_profiles

    if method not in METHODS:
        _fail(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if batch_users < 1:
        _fail("--batch-users must be positive")
    row_id, heads, extractor = _loaded(ctx, name, version)
    engine = make_engine(ctx.obj.settings)
    bar = tqdm(unit="user", desc=f"migrating onto {name}@{version}", disable=not progress, file=sys.stderr)

    def show(state) -> None:
        bar.total = max(state.total, state.done)
        bar.n = state.done
        bar.set_postfix_str(f"{state.pairs_per_s:.0f} pairs/s", refresh=False)
        bar.refresh()
    try:
        with _errors(ctx.obj.settings):
            state = migrate_profiles(make_sessions(engine), row_id, heads, extractor, method=method,
                                     batch_users=batch_users, progress=show)
            with _transaction(ctx) as session:
                _audit(ctx, session, "models.migrate", f"{name}@{version}", users=state.done, pairs=state.pairs)
    finally:
        bar.close()
        engine.dispose()
    typer.echo(f"migrated {state.done} users ({state.pairs} pairs) onto {name}@{version}; "
               f"every user with feedback has a profile over it")


@models_app.command("register")
def models_register(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="a folder HeadSet.save wrote")],
    activate: Annotated[bool, typer.Option(help="also make it the active version of its name")] = False,
) -> None:
    """Register a saved head set (registering the same content twice is a no-op).

    The folder is loaded, which checks its tensors against headset.json's content hash: a folder edited after
    saving is refused here, not found out by every replica that tries to serve it.
    """
    from rewardprism.heads import HeadSet

    try:
        heads = HeadSet.load(folder)
    except (OSError, ValueError) as exc:
        _fail(str(exc))
    with _transaction(ctx) as session:
        row = register_head_set(session, heads, uri=str(folder.resolve()), activate=activate)
        _audit(ctx, session, "models.register", row.label, content_hash=row.content_hash, active=row.active)
    active = " - active" if row.active else ""
    typer.echo(f"registered {row.label} ({row.kind}, {row.num_heads} heads){active}")


# ---------------------------------------------------------------------------------------------- audit


def _since(value: str | None) -> datetime | None:
    """--since: an ISO date or time (UTC unless it names a zone), or an age such as 30m, 12h, 7d."""
    if value is None:
        return None
    units = {"m": "minutes", "h": "hours", "d": "days"}
    if value[:-1].isdigit() and value[-1:] in units:
        return datetime.now(timezone.utc) - timedelta(**{units[value[-1]]: int(value[:-1])})
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        _fail(f"--since: {value!r} is neither an ISO date/time (2026-12-04, 2026-12-04T16:00) nor an age (30m, "
              "12h, 7d)")


@audit_app.command("list")
def audit_list(
    ctx: typer.Context,
    user: Annotated[str | None, typer.Option(help="only entries about this user (external id)")] = None,
    since: Annotated[str | None, typer.Option(help="from this ISO date/time (UTC) or age (30m, 12h, 7d) on")] = None,
    limit: Annotated[int, typer.Option(min=1, help="newest entries shown")] = 50,
) -> None:
    """The audit log, newest first: when, who, what, about whom, and the details recorded."""
    start = _since(since)
    with _transaction(ctx) as session:
        rows = [(_when(e.created_at), e.actor, e.action, e.target, json.dumps(e.details, ensure_ascii=False))
                for e in list_audit(session, target=user, since=start, limit=limit)]
    _table(("when", "actor", "action", "target", "details"), rows)
