"""The admin API's operations — users, profiles, head sets, API keys — over a ScoringService's database and caches.

Every write commits together with its audit entry; reads need the admin scope too. Scoring and feedback
(`serve_apps.service`) never call these: they share only the service's sessions, caches and served head set.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from rewardprism import store
from rewardprism.heads import HeadSet
from rewardprism.store import checks
from sqlalchemy.orm import Session

from serve_apps import data, schemas
from serve_apps.service import ApiError, ScoringService, ServedHeads, profile_out

T = TypeVar("T")


def authorize_admin(caller: data.Caller) -> None:
    if not caller.allows("admin") or caller.user is not None:
        raise ApiError(403, "admin calls need an API key with the 'admin' scope, not bound to a user")


def user_out(user: store.User, served: ServedHeads | None) -> schemas.UserOut:
    """The user with the profile the service scores them with: the one over the served head set."""
    profile = user.profile if served is None else user.profile_on(served.row_id)
    metadata, metadata_error = checks.readable_json(user.meta, "metadata")
    return schemas.UserOut(external_id=user.external_id, display_name=user.display_name, metadata=metadata,
                           metadata_error=metadata_error, disabled=user.disabled, created_at=user.created_at,
                           profile=None if profile is None else profile_out(user.external_id, profile, served))


def head_set_out(row: store.HeadSetRow) -> schemas.HeadSetOut:
    return schemas.HeadSetOut(name=row.name, version=row.version, kind=row.kind, backbone=row.backbone, dim=row.dim,
                              num_heads=row.num_heads, content_hash=row.content_hash, uri=row.uri,
                              active=row.active, created_at=row.created_at)


def audit_out(entry: store.AuditEntry) -> schemas.AuditOut:
    return schemas.AuditOut(created_at=entry.created_at, actor=entry.actor, action=entry.action,
                            target=entry.target, details=entry.details)


def key_out(key: store.ApiKey) -> schemas.KeyOut:
    return schemas.KeyOut(prefix=key.prefix, name=key.name, scopes=key.scopes,
                          user_id=None if key.user is None else key.user.external_id, created_at=key.created_at,
                          revoked_at=key.revoked_at)


class Migrations(Protocol):
    """Where profile migrations run (`serve_apps.migration`: detached Ray actors); each call returns a status."""

    async def start(self, name: str, version: str, database_url: str, head_set_row_id: int, uri: str,
                    method: str) -> dict[str, Any]: ...

    async def status(self, name: str, version: str) -> dict[str, Any] | None: ...


class AdminOperations:
    """What the /admin routes do, as methods over the service (`create_api` makes one per service)."""

    def __init__(self, service: ScoringService, migrations: Migrations | None = None):
        self.service, self.migrations = service, migrations

    async def _audited(self, caller: data.Caller, action: str, target: str, work: Callable[[Session], T],
                       details: dict[str, Any] | None = None) -> T:
        """An admin write and its audit entry, committed together (`work` returns response bodies, built
        inside the transaction) with the caller's key re-checked and any Idempotency-Key answer
        (`ScoringService.write`); a user's cached profile is dropped afterwards, whatever happened."""
        authorize_admin(caller)

        def audited(session: Session) -> T:
            result = work(session)
            store.record_audit(session, f"key:{caller.key}", action, target, details, limits=self.service.limits)
            return result
        try:
            return await self.service.write(audited, caller=caller)
        finally:
            if action.startswith(("user.", "profile.")):
                self.service.profiles.invalidate(target)  # for memory: versions are checked anyway

    async def _read(self, caller: data.Caller, work: Callable[[Session], T]) -> T:
        authorize_admin(caller)
        return await self.service.read(work)

    async def create_user(self, caller: data.Caller, body: schemas.UserCreate) -> schemas.UserOut:
        served = self.service.served
        return await self._audited(caller, "user.create", body.external_id, lambda session: user_out(
            store.create_user(session, body.external_id, display_name=body.display_name, metadata=body.metadata,
                              limits=self.service.limits), served))

    async def list_users(self, caller: data.Caller, offset: int, limit: int, search: str | None,
                         disabled: bool | None) -> schemas.UserPage:
        served = self.service.served

        def page(session: Session) -> schemas.UserPage:
            found = store.list_users(session, offset=offset, limit=limit, search=search, disabled=disabled)
            return schemas.UserPage(items=[user_out(u, served) for u in found.items], total=found.total,
                                    offset=found.offset, limit=found.limit)
        return await self._read(caller, page)

    async def get_user(self, caller: data.Caller, user: str) -> schemas.UserOut:
        served = self.service.served
        return await self._read(caller, lambda session: user_out(store.get_user(session, user), served))

    async def user_history(self, caller: data.Caller, user: str, limit: int) -> schemas.UserHistory:
        def history(session: Session) -> schemas.UserHistory:
            found = store.get_user(session, user)
            profiles = sorted(found.profiles, key=lambda p: (p.updated_at, p.id), reverse=True)
            return schemas.UserHistory(
                user_id=user,
                profiles=[schemas.ProfileVersionOut(head_set=p.head_set.label, active=p.head_set.active,
                                                    method=p.method, n_pairs=p.n_pairs, version=p.version,
                                                    created_at=p.created_at, updated_at=p.updated_at)
                          for p in profiles],
                audit=[audit_out(e) for e in store.list_audit(session, target=user, limit=limit)])
        return await self._read(caller, history)

    async def list_audit(self, caller: data.Caller, user: str | None, since: datetime | None,
                         limit: int) -> list[schemas.AuditOut]:
        return await self._read(caller, lambda session: [
            audit_out(e) for e in store.list_audit(session, target=user, since=since, limit=limit)])

    async def set_disabled(self, caller: data.Caller, user: str, disabled: bool) -> schemas.UserOut:
        served = self.service.served
        action = "user.disable" if disabled else "user.enable"
        return await self._audited(caller, action, user, lambda session: user_out(
            store.set_user_disabled(session, user, disabled), served))

    async def delete_user(self, caller: data.Caller, user: str) -> None:
        await self._audited(caller, "user.delete", user, lambda session: store.delete_user(session, user))

    async def export_user(self, caller: data.Caller, user: str) -> dict[str, Any]:
        return await self._audited(caller, "user.export", user, lambda session: store.export_user(session, user))

    async def import_user(self, caller: data.Caller, export: dict[str, Any]) -> schemas.UserOut:
        served = self.service.served
        target = str(export.get("external_id", ""))[:255]
        return await self._audited(caller, "user.import", target, lambda session: user_out(
            store.import_user(session, export, limits=self.service.limits), served))

    async def set_weights(self, caller: data.Caller, user: str, body: schemas.WeightsIn) -> schemas.ProfileOut:
        served = self.service.heads()

        def save(session: Session) -> schemas.ProfileOut:
            expected = body.expected_version
            if expected is None:
                current = store.get_user(session, user).profile_on(served.row_id)
                expected = None if current is None else current.version
            row = store.save_profile(session, user, body.weights, bias=body.bias, method="manual",
                                     expected_version=expected, head_set=session.get(store.HeadSetRow, served.row_id))
            return profile_out(user, row, served)
        return await self._audited(caller, "profile.set", user, save, details={"bias": body.bias})

    async def reset(self, caller: data.Caller, user: str) -> schemas.ProfileOut:
        served = self.service.heads()
        return await self._audited(caller, "profile.reset", user, lambda session: profile_out(
            user, store.reset_profile(session, user, session.get(store.HeadSetRow, served.row_id)), served))

    async def list_head_sets(self, caller: data.Caller) -> list[schemas.HeadSetOut]:
        return await self._read(caller, lambda session: [head_set_out(h) for h in store.list_head_sets(session)])

    async def register_head_set(self, caller: data.Caller, body: schemas.HeadSetIn) -> schemas.HeadSetOut:
        authorize_admin(caller)
        try:
            heads = await asyncio.get_running_loop().run_in_executor(self.service.db, HeadSet.load, body.uri)
        except (OSError, ValueError) as exc:
            raise ApiError(422, f"cannot load a head set from there: {exc}", ["uri"]) from None

        def register(session: Session) -> schemas.HeadSetOut:
            return head_set_out(store.register_head_set(session, heads, uri=str(Path(body.uri).resolve()),
                                                        activate=body.activate))
        out = await self._audited(caller, "head_set.register", f"{heads.name}@{heads.version}", register,
                                   details={"activate": body.activate})
        await self.service.refresh()
        return out

    async def activate_head_set(self, caller: data.Caller, name: str, version: str,
                                require_no_regression: bool = False) -> schemas.HeadSetOut:
        if require_no_regression:
            state = await self._migrations(caller).status(name, version)
            if state is None or state["state"] != "done" or state["regressions"] is None:
                raise ApiError(409, f"no finished migration onto {name}@{version} with a shadow evaluation: "
                                    f"POST /admin/head-sets/{name}/{version}/migrate and wait until it is done")
            if state["regressions"]:
                raise ApiError(409, f"not activating {name}@{version}: " + "; ".join(state["regressions"]))
        out = await self._audited(caller, "head_set.activate", f"{name}@{version}", lambda session: head_set_out(
            store.activate_head_set(session, name, version)))
        await self.service.refresh()
        return out

    async def start_migration(self, caller: data.Caller, name: str, version: str) -> schemas.MigrationOut:
        """Re-adapt every user with feedback onto the version, in the background (see `rewardprism models
        migrate`); the status of the run, a running one if there is one."""
        migrations = self._migrations(caller)
        row_id, uri = await self._audited(caller, "head_set.migrate", f"{name}@{version}", lambda session: (
            (row := store.get_head_set(session, name, version)).id, row.uri))
        settings = self.service.settings
        state = await migrations.start(name, version, settings.database_url.get_secret_value(), row_id, uri,
                                       settings.adaptation)
        return schemas.MigrationOut(name=name, version=version, **state)

    async def migration_status(self, caller: data.Caller, name: str, version: str) -> schemas.MigrationOut:
        state = await self._migrations(caller).status(name, version)
        if state is None:
            raise ApiError(404, f"no migration onto {name}@{version} was started on this cluster")
        return schemas.MigrationOut(name=name, version=version, **state)

    def _migrations(self, caller: data.Caller) -> Migrations:
        authorize_admin(caller)
        if self.migrations is None:
            raise ApiError(409, "this service runs no migrations (it is not on Ray): use `rewardprism models "
                                "migrate` and `models activate --require-no-regression`")
        return self.migrations

    async def create_key(self, caller: data.Caller, body: schemas.KeyCreate) -> schemas.KeyCreated:
        def create(session: Session) -> schemas.KeyCreated:
            key, token = store.create_api_key(session, body.scopes, user_external_id=body.user_id, name=body.name)
            return schemas.KeyCreated(**key_out(key).model_dump(), token=token)
        return await self._audited(caller, "key.create", body.user_id or "*", create,
                                   details={"scopes": sorted(set(body.scopes)), "name": body.name})

    async def list_keys(self, caller: data.Caller, revoked: bool) -> list[schemas.KeyOut]:
        return await self._read(caller, lambda session: [
            key_out(k) for k in store.list_api_keys(session, include_revoked=revoked)])

    async def revoke_key(self, caller: data.Caller, prefix: str) -> schemas.KeyOut:
        return await self._audited(caller, "key.revoke", prefix, lambda session: key_out(
            store.revoke_api_key(session, prefix)))
