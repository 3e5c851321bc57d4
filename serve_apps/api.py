"""HTTP routes over a `ScoringService` and its `AdminOperations`: parse, authenticate, call, map errors to statuses.

Errors are JSON: `{"detail": "message"}`, and for 422 FastAPI's own list `{"detail": [{"loc": [...], "msg": ...}]}`
so a client reads one shape for every invalid field, whether pydantic or the service found it.

Feedback and the admin writes (except creating a key, whose answer holds the token) take an `Idempotency-Key`
header: a retry with the same key and body gets the first answer again, marked `Idempotent-Replayed: true`.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from rewardprism.store import IdempotentRequest, checks
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_apps import schemas
from serve_apps.admin import AdminOperations, Migrations
from serve_apps.data import Caller
from serve_apps.service import IDEMPOTENCY, ApiError, Replayed, ScoringService

UserPath = Annotated[str, Path(min_length=1, max_length=schemas.EXTERNAL_ID_MAX, pattern=schemas.NO_NUL)]
api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key from `rewardprism keys create`")


async def caller(request: Request, key: Annotated[str | None, Depends(api_key)]) -> Caller:
    return await request.app.state.service.authenticate(key)


Auth = Annotated[Caller, Depends(caller)]
IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", min_length=1, max_length=255, pattern=schemas.NO_NUL,
    description="a retry with the same key and body gets the first answer (kept `RP_IDEMPOTENCY_TTL_S`); "
                "the same key with another request is a 422")]


async def idempotent(request: Request, who: Auth, key: IdempotencyKey = None) -> None:
    """Mark this request's write as idempotent under `key` (`serve_apps.service.IDEMPOTENCY`)."""
    if key is None:
        return
    route = request.scope.get("route")
    fingerprint = hashlib.sha256(b"\0".join([request.method.encode(), request.url.path.encode(),
                                              await request.body()])).hexdigest()
    IDEMPOTENCY.set(IdempotentRequest(who.key, key, fingerprint, getattr(route, "status_code", None) or 200,
                                      request.app.state.service.settings.idempotency_ttl_s))


Idempotent = Depends(idempotent)


class BodyLimit:
    """ASGI middleware: 413 for a body over the live `max_request_bytes`, by Content-Length or as it streams."""

    def __init__(self, app: ASGIApp, service: ScoringService):
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.service.settings.max_request_bytes
        too_large = HTTPException(413, f"request body over the limit of {limit} bytes")
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await JSONResponse({"detail": too_large.detail}, status_code=413)(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise too_large  # FastAPI passes HTTPExceptions raised while reading the body through
            return message
        await self.app(scope, counted, send)


class StrictJsonRequest(Request):
    """A request whose body must be UTF-8 JSON that Python can parse: anything else is a JSON decode error, so
    FastAPI answers 422 (`json_invalid`) instead of its generic 400 for invalid UTF-8 or absurd nesting."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise json.JSONDecodeError(f"the body is not valid UTF-8 ({exc.reason})", "", exc.start) from None
            try:
                self._json = json.loads(text)
            except RecursionError:
                raise json.JSONDecodeError("the body nests too deeply", "", 0) from None
        return self._json


class StrictJsonRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))
        return strict


# What the routes answer besides success and FastAPI's own 422, as `{"detail": message}`, for the OpenAPI schema.
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.Error, "description": description} for status, description in (
        (401, "missing, invalid or revoked API key"),
        (403, "the key lacks the scope, is bound to another user, or the user is disabled"),
        (404, "unknown user, head set or key"),
        (409, "a concurrent change conflicts with this one, or the record already exists; retry or reload"),
        (413, "request body over `max_request_bytes`"),
        (503, "the database is unreachable or too slow, or no head set is active; retry after `Retry-After`"),
    )}


DOCS_ASSETS = "/docs-assets"


def self_hosted_docs(api: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc from assets this package serves itself, not from a CDN, so the pages
    render offline and behind a firewall (FastAPI's self-hosting recipe; the assets are fastapi-offline's copy
    of Swagger UI and ReDoc)."""
    from importlib.resources import files

    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    api.mount(DOCS_ASSETS, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs-assets")

    def assets(request: Request) -> tuple[str, str]:
        root = request.scope.get("root_path", "").rstrip("/")
        return root, f"{root}{DOCS_ASSETS}"

    @api.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> Response:
        root, static = assets(request)
        return get_swagger_ui_html(openapi_url=f"{root}{api.openapi_url}", title=f"{api.title} - Swagger UI",
                                   swagger_js_url=f"{static}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{static}/swagger-ui.css",
                                   swagger_favicon_url=f"{static}/favicon.png")

    @api.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> Response:
        root, static = assets(request)
        return get_redoc_html(openapi_url=f"{root}{api.openapi_url}", title=f"{api.title} - ReDoc",
                              redoc_js_url=f"{static}/redoc.standalone.js", redoc_favicon_url=f"{static}/favicon.png",
                              with_google_fonts=False)


HeadSetName = Annotated[str, Path(max_length=128, pattern=schemas.NO_NUL)]
HeadSetVersion = Annotated[str, Path(max_length=64, pattern=schemas.NO_NUL)]


def create_api(service: ScoringService, migrations: Migrations | None = None) -> FastAPI:
    api = FastAPI(title="RewardPrism", version="1",
                  description="Personalized reward scores: one backbone pass shared by all users, each user's "
                              "own weights over the served head set. See docs/serve.md.",
                  responses=ERRORS, docs_url=None, redoc_url=None)
    self_hosted_docs(api)
    api.router.route_class = StrictJsonRoute
    api.state.service = service
    admin = AdminOperations(service, migrations)
    api.add_middleware(BodyLimit, service=service)

    @api.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422 without echoing the input back: it may be huge, or NaN (which JSON cannot carry)."""
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @api.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        if exc.status == 422:
            locs = ([["body", *field.replace("]", "").replace("[", ".").split(".")] for field in exc.fields]
                    or [["body"]])
            detail: Any = [{"loc": [int(p) if p.isdigit() else p for p in loc], "msg": exc.message,
                            "type": "value_error"} for loc in locs]
        else:
            detail = exc.message
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse({"detail": detail}, status_code=exc.status, headers=headers)

    @api.exception_handler(Replayed)
    async def replayed(_: Request, exc: Replayed) -> Response:
        headers = {"Idempotent-Replayed": "true"}
        if exc.body is None:
            return Response(status_code=exc.status, headers=headers)
        return JSONResponse(exc.body, status_code=exc.status, headers=headers)

    @api.post("/v1/score", response_model=schemas.ScoreResponse, tags=["scoring"])
    async def score(request: schemas.ScoreRequest, who: Auth) -> schemas.ScoreResponse:
        """A personalized score per response (and each head's contribution, with `explain`)."""
        return await service.score(who, request)

    @api.post("/v1/compare", response_model=schemas.CompareResponse, tags=["scoring"])
    async def compare(request: schemas.CompareRequest, who: Auth) -> schemas.CompareResponse:
        """The probability that `a` is preferred over `b` by this user (Bradley-Terry on their scores)."""
        return await service.compare(who, request)

    @api.post("/v1/users/{user_id}/feedback", response_model=schemas.FeedbackResponse, tags=["users"],
              dependencies=[Idempotent])
    async def feedback(user_id: UserPath, request: schemas.FeedbackRequest, who: Auth) -> schemas.FeedbackResponse:
        """Store labelled pairs and re-adapt the user's profile from all their feedback; the next score uses it."""
        return await service.feedback(who, user_id, request)

    @api.post("/v1/users/{user_id}/queries", response_model=schemas.QueryResponse, tags=["users"])
    async def queries(user_id: UserPath, request: schemas.QueryRequest, who: Auth) -> schemas.QueryResponse:
        """The pairs this user should label next: the ones whose answers would teach their profile the most.

        From a pool registered with the served head set (`rewardprism pools register`), or among the `responses`
        sent for one prompt. Send the answers as feedback citing each pair's `query_id`.
        """
        return await service.queries(who, user_id, request)

    @api.get("/v1/heads", response_model=schemas.HeadsOut, tags=["scoring"])
    async def heads(who: Auth, excerpts: bool = False) -> schemas.HeadsOut:
        """What each head of the served head set means (its card); `excerpts=true` adds the training pairs it
        scores highest and lowest."""
        return await service.head_cards(who, excerpts)

    @api.get("/v1/users/{user_id}/profile", response_model=schemas.ProfileOut, tags=["users"])
    async def profile(user_id: UserPath, who: Auth) -> schemas.ProfileOut:
        return await service.profile(who, user_id)

    @api.post("/admin/users", response_model=schemas.UserOut, status_code=201, tags=["admin"],
              dependencies=[Idempotent])
    async def create_user(body: schemas.UserCreate, who: Auth) -> schemas.UserOut:
        return await admin.create_user(who, body)

    @api.get("/admin/users", response_model=schemas.UserPage, tags=["admin"])
    async def list_users(who: Auth, offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
                         limit: Annotated[int, Query(ge=1, le=1000)] = 50,
                         search: Annotated[str | None, Query(max_length=schemas.EXTERNAL_ID_MAX,
                                                             pattern=schemas.NO_NUL)] = None,
                         disabled: bool | None = None) -> schemas.UserPage:
        return await admin.list_users(who, offset, limit, search, disabled)

    @api.get("/admin/users/{user_id}", response_model=schemas.UserOut, tags=["admin"])
    async def get_user(user_id: UserPath, who: Auth) -> schemas.UserOut:
        return await admin.get_user(who, user_id)

    @api.get("/admin/users/{user_id}/history", response_model=schemas.UserHistory, tags=["admin"])
    async def user_history(user_id: UserPath, who: Auth,
                           limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> schemas.UserHistory:
        """The user's profiles (one per head-set version) and the audit-log entries about them."""
        return await admin.user_history(who, user_id, limit)

    @api.get("/admin/audit", response_model=list[schemas.AuditOut], tags=["admin"])
    async def audit(who: Auth, user: Annotated[str | None, Query(max_length=schemas.EXTERNAL_ID_MAX,
                                                                 pattern=schemas.NO_NUL)] = None,
                    since: datetime | None = None,
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[schemas.AuditOut]:
        """The audit log, newest first; `user`: only entries about that user; `since`: an ISO date-time."""
        return await admin.list_audit(who, user, since, limit)

    @api.patch("/admin/users/{user_id}", response_model=schemas.UserOut, tags=["admin"],
               dependencies=[Idempotent])
    async def patch_user(user_id: UserPath, body: schemas.UserPatch, who: Auth) -> schemas.UserOut:
        return await admin.set_disabled(who, user_id, body.disabled)

    @api.delete("/admin/users/{user_id}", status_code=204, tags=["admin"],
                dependencies=[Idempotent])
    async def delete_user(user_id: UserPath, who: Auth) -> Response:
        """Delete the user with their profile, feedback and bound API keys."""
        await admin.delete_user(who, user_id)
        return Response(status_code=204)

    @api.post("/admin/users/{user_id}/reset", response_model=schemas.ProfileOut, tags=["admin"],
              dependencies=[Idempotent])
    async def reset(user_id: UserPath, who: Auth) -> schemas.ProfileOut:
        """Back to the served head set's default weights (feedback is kept)."""
        return await admin.reset(who, user_id)

    @api.put("/admin/users/{user_id}/profile", response_model=schemas.ProfileOut, tags=["admin"],
             dependencies=[Idempotent])
    async def set_weights(user_id: UserPath, body: schemas.WeightsIn, who: Auth) -> schemas.ProfileOut:
        return await admin.set_weights(who, user_id, body)

    @api.get("/admin/users/{user_id}/export", tags=["admin"])
    async def export_user(user_id: UserPath, who: Auth) -> dict[str, Any]:
        return await admin.export_user(who, user_id)

    @api.post("/admin/users/import", response_model=schemas.UserOut, status_code=201, tags=["admin"],
              dependencies=[Idempotent])
    async def import_user(export: Annotated[dict[str, Any], Body()], who: Auth) -> schemas.UserOut:
        """Recreate a user from an export (GET /admin/users/{id}/export)."""
        try:
            schemas.storable_json(export, "the export", checks.MAX_JSON_DEPTH + 1)  # metadata is one level down
        except ValueError as exc:
            raise ApiError(422, str(exc)) from None
        return await admin.import_user(who, export)

    @api.get("/admin/head-sets", response_model=list[schemas.HeadSetOut], tags=["admin"])
    async def list_head_sets(who: Auth) -> list[schemas.HeadSetOut]:
        return await admin.list_head_sets(who)

    @api.post("/admin/head-sets", response_model=schemas.HeadSetOut, status_code=201, tags=["admin"],
              dependencies=[Idempotent])
    async def register_head_set(body: schemas.HeadSetIn, who: Auth) -> schemas.HeadSetOut:
        return await admin.register_head_set(who, body)

    @api.post("/admin/head-sets/{name}/{version}/activate", response_model=schemas.HeadSetOut, tags=["admin"],
              dependencies=[Idempotent])
    async def activate_head_set(name: HeadSetName, version: HeadSetVersion, who: Auth,
                                require_no_regression: bool = False) -> schemas.HeadSetOut:
        """Serve this version of `name` from now on, with users' profiles over it (migrate first: users
        without one get its default weights). `require_no_regression`: 409 unless the version's finished
        migration's shadow evaluation passes the gate (the reasons in the message)."""
        return await admin.activate_head_set(who, name, version, require_no_regression)

    @api.post("/admin/head-sets/{name}/{version}/migrate", response_model=schemas.MigrationOut, status_code=202,
              tags=["admin"])
    async def migrate_head_set(name: HeadSetName, version: HeadSetVersion, who: Auth) -> schemas.MigrationOut:
        """Re-adapt every user with feedback onto this version in the background (a detached Ray actor), as
        `rewardprism models migrate` does; a rerun resumes. Activate once GET says `done`."""
        return await admin.start_migration(who, name, version)

    @api.get("/admin/head-sets/{name}/{version}/migrate", response_model=schemas.MigrationOut, tags=["admin"])
    async def migration_status(name: HeadSetName, version: HeadSetVersion, who: Auth) -> schemas.MigrationOut:
        """The migration's progress: users done of total, pairs per second, ETA."""
        return await admin.migration_status(who, name, version)

    @api.post("/admin/keys", response_model=schemas.KeyCreated, status_code=201, tags=["admin"])
    async def create_key(body: schemas.KeyCreate, who: Auth) -> schemas.KeyCreated:
        """A new API key; its token is in this response only."""
        return await admin.create_key(who, body)

    @api.get("/admin/keys", response_model=list[schemas.KeyOut], tags=["admin"])
    async def list_keys(who: Auth, revoked: bool = False) -> list[schemas.KeyOut]:
        """Keys without their secrets; `revoked=true` lists revoked ones too."""
        return await admin.list_keys(who, revoked)

    @api.delete("/admin/keys/{prefix}", response_model=schemas.KeyOut, tags=["admin"],
                dependencies=[Idempotent])
    async def revoke_key(prefix: Annotated[str, Path(min_length=1, max_length=16, pattern=r"^[0-9a-f]+$")],
                         who: Auth) -> schemas.KeyOut:
        """Revoke a key: refused at once on every replica."""
        return await admin.revoke_key(who, prefix)

    @api.get("/healthz", response_model=schemas.Health, tags=["ops"])
    async def healthz() -> schemas.Health:
        """Always 200 while the replica runs; `degraded` when the database is unreachable or no head set is active."""
        return await service.health()

    return api
