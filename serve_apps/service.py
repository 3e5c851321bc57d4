"""What the HTTP routes do, as a plain class that knows nothing of Ray or HTTP: `ScoringService`.

It owns the replica's state — the served head set, the profile cache, verified API keys, head scores of
feedback pairs — and the database work, which always runs in a thread pool so the event loop never blocks.
Texts are embedded and scored by an injected `embed` coroutine (in the service: the batching embedder
deployment), so requests from many users meet in one forward pass.

Staying up without the database: scoring falls back to the last cached profile (marked stale) or the default
profile; feedback and admin calls answer 503 and write nothing (each is one transaction). Every call after the
database returns works again: the engine re-connects (pool pre-ping), and nothing here caches a failure.

Profiles are cached per replica by (user, revision). Every score request checks its user's current revision
with the store — one small query for all the requests that arrive together (`Coalesced`) — so a profile
written by any replica is used by the very next request anywhere, and a cached one costs no more than that
check. The active head set is re-read every `head_set_poll_s`. The admin operations are `serve_apps.admin`.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import sqlalchemy as sa
from rewardprism import store
from rewardprism.data import Prompt
from rewardprism.heads import HeadSet
from rewardprism.migrate_profiles import adapt_on_head_set
from rewardprism.scoring import (
    LruCache,
    Profile,
    ProfileCache,
    ScoredJob,
    ScoreJob,
    UserState,
    explain,
    preference_probability,
)
from rewardprism.store import Feedback, FeedbackPair, ProfileUpdate
from rewardprism.store.rollout import STORED_METHOD
from sqlalchemy.orm import Session

from serve_apps import data, schemas
from serve_apps.coalesce import Coalesced
from serve_apps.settings import ServeSettings

log = logging.getLogger("ray.serve.rewardprism")  # under ray.serve: its handlers write the replica logs
T = TypeVar("T")

# The caller behind REWARDPRISM_ADMIN_KEY; "env:admin" is what the audit log records as its key.
BOOTSTRAP_ADMIN = data.Caller("env:admin", frozenset({"admin"}), None)
FEEDBACK_ATTEMPTS = 20  # transactions tried per feedback call before answering 409
# A dropped or refused connection, a pool that cannot hand one out: the database is unreachable, not wrong.
DATABASE_DOWN = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)
CONFLICT = "a concurrent change conflicts with this one; retry"  # 409: another writer got there first


def _rolled_back_for_a_conflict(exc: Exception) -> bool:
    """Postgres aborted the transaction to settle a conflict with another (serialization failure 40001,
    deadlock 40P01); the driver raises it as an OperationalError, but a retry, not a wait, is what helps."""
    return getattr(getattr(exc, "orig", None), "sqlstate", None) in ("40001", "40P01")


class ApiError(Exception):
    """A request the service refuses: an HTTP status and a message for the client.

    `fields` names the body fields at fault (e.g. `responses[3]`), for 422s shaped like FastAPI's own.
    """

    def __init__(self, status: int, message: str, fields: Sequence[str] = ()):
        super().__init__(message)
        self.status, self.message, self.fields = status, message, list(fields)


class Unavailable(ApiError):
    def __init__(self, message: str):
        super().__init__(503, message)


class MissingPairs(Exception):
    """Raised inside a feedback transaction (rolling it back) when stored pairs have no head scores yet."""

    def __init__(self, pairs: list[FeedbackPair]):
        super().__init__(f"{len(pairs)} stored pairs need embedding")
        self.pairs = pairs


@dataclass(frozen=True)
class HeadSetRef:
    """How an embedder replica finds a head set: where it was saved and the hash it must have."""

    uri: str
    content_hash: str
    backbone: str


@dataclass(frozen=True)
class ServedHeads:
    heads: HeadSet
    row_id: int
    label: str  # name@version
    ref: HeadSetRef


class Metrics(Protocol):
    def scored(self, responses: int, personalized: bool) -> None: ...

    def cache(self, result: str) -> None: ...

    def adapted(self, seconds: float, pairs: int) -> None: ...


Embed = Callable[[HeadSetRef, ScoreJob], Awaitable[ScoredJob]]


def pair_key(prompt: Prompt, chosen: str, rejected: str) -> str:
    return hashlib.sha1(json.dumps([prompt, chosen, rejected], sort_keys=True).encode()).hexdigest()


def profile_out(user: str, row: store.ProfileRow | None, served: ServedHeads | None) -> schemas.ProfileOut:
    """A stored profile, or the served head set's default for a user without one."""
    if row is None:
        if served is None:
            raise Unavailable("no head set is active: activate one (POST /admin/head-sets)")
        heads = served.heads
        return schemas.ProfileOut(user_id=user, version=None, head_set=served.label, method=store.POPULATION_METHOD,
                                  n_pairs=0, bias=0.0, weights=heads.default_weights.tolist(),
                                  head_names=heads.head_names, updated_at=None)
    return schemas.ProfileOut(user_id=user, version=row.version, head_set=row.head_set.label, method=row.method,
                              n_pairs=row.n_pairs, bias=row.bias, weights=list(row.weights),
                              head_names=row.head_set.head_names, updated_at=row.updated_at)



class ScoringService:
    def __init__(self, settings: ServeSettings, embed: Embed, metrics: Metrics):
        self.settings, self.embed, self.metrics = settings, embed, metrics
        store_settings = settings.store()
        self.limits = store_settings.limits
        self.engine = store.make_engine(store_settings)
        self.sessions = store.make_sessions(self.engine)
        self.read_sessions = store.make_sessions(self.engine, read_only=True)
        self.db = ThreadPoolExecutor(store_settings.pool_size + store_settings.max_overflow,
                                     thread_name_prefix="rewardprism-db")
        self.profiles = ProfileCache(settings.profile_cache_size)
        # Keyed by (head-set row id, user): a replica looks up the profile over the head set it serves.
        self.revisions = Coalesced(self.read, data.current_revisions)  # (user exists, profile version, created)
        self.states = Coalesced(self.read, data.read_user_states)  # the profiles of cache misses
        self.keys: LruCache[str, tuple[data.Caller, float]] = LruCache(10_000)  # sha256(token) → caller, when
        self._verifying: dict[str, asyncio.Future[data.Caller]] = {}  # sha256(token) → its one verification
        self.pair_scores: LruCache[tuple[str, str], np.ndarray] = LruCache(settings.pair_cache_size)  # (2, H)
        self.served: ServedHeads | None = None
        self.database_ok = True
        self._user_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._poller: asyncio.Task | None = None

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load the active head set if possible (the poll retries if not), and start polling for activations."""
        try:
            await self.refresh()
        except Exception:  # the replica must come up and report it (/healthz says degraded)
            log.exception("no head set loaded at start; the head-set poll keeps trying")
        self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    def reconfigure(self, settings: ServeSettings) -> None:
        self.settings = settings

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        self.db.shutdown(wait=False, cancel_futures=True)
        self.engine.dispose()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.head_set_poll_s)
            try:
                await self.refresh()
            except Unavailable:
                pass  # already recorded in database_ok; the next poll tries again
            except Exception:  # the poller must outlive any one bad poll (e.g. an unreadable head-set folder)
                log.exception("head-set poll failed")

    async def refresh(self) -> None:
        """Serve the active version of the head set (an activation elsewhere reaches this replica here)."""
        row = await self.read(data.active_head_set, self.settings.head_set)
        if row is None:
            self.served = None
        elif self.served is None or self.served.row_id != row.id:
            heads = await asyncio.get_running_loop().run_in_executor(self.db, HeadSet.load, row.uri)
            if heads.content_hash != row.content_hash:
                raise ValueError(f"head set {row.label} at {row.uri} changed after registration")
            self.served = ServedHeads(heads, row.id, row.label, HeadSetRef(row.uri, row.content_hash, row.backbone))
            log.info("serving head set %s (%d heads)", row.label, heads.num_heads)

    # ------------------------------------------------------------------------------------------ database

    async def read(self, work: Callable[..., T], *args: Any) -> T:
        """`work(session, *args)` in a worker thread; the session is rolled back and closed afterwards."""
        def call() -> T:
            with self.read_sessions() as session:
                return work(session, *args)
        return await self._in_thread(call)

    async def write(self, work: Callable[..., T], *args: Any) -> T:
        """`work(session, *args)` in a worker thread, in one transaction that commits if it returns."""
        def call() -> T:
            with self.sessions.begin() as session:
                return work(session, *args)
        return await self._in_thread(call)

    async def _in_thread(self, call: Callable[[], T]) -> T:
        try:
            result = await asyncio.get_running_loop().run_in_executor(self.db, call)
        except DATABASE_DOWN as exc:
            if _rolled_back_for_a_conflict(exc):  # the database is up: another transaction won
                self.database_ok = True
                raise ApiError(409, CONFLICT) from None
            self.database_ok = False
            log.warning("database unreachable: %s", type(exc.orig if hasattr(exc, "orig") else exc).__name__)
            raise Unavailable("the database is unreachable; try again shortly") from None
        except store.InvalidInput as exc:
            raise ApiError(422, str(exc)) from None
        except sa.exc.DataError:  # a value the database cannot hold (out of range, bad encoding)
            raise ApiError(422, "a value in the request cannot be stored") from None
        except sa.exc.IntegrityError:  # a concurrent writer got there first (unique or one-active constraints)
            raise ApiError(409, CONFLICT) from None
        except store.NotFound as exc:
            raise ApiError(404, str(exc)) from None
        except (store.AlreadyExists, store.ProfileConflict) as exc:
            raise ApiError(409, str(exc)) from None
        except store.UserDisabled as exc:
            raise ApiError(403, str(exc)) from None
        self.database_ok = True
        return result

    # ------------------------------------------------------------------------------------------ auth

    async def authenticate(self, token: str | None) -> data.Caller:
        """The caller behind an API key; a key verified before an outage keeps working through it.

        A key is verified at most once at a time: the hash is deliberately slow (scrypt, ~16 MiB), and when a
        busy key's cache entry expired every request in flight used to hash it again at once — two thirds of
        the Ingress's CPU under load (bench/bench_serve.py).
        """
        if not token:
            raise ApiError(401, "missing API key: send it in the X-API-Key header")
        admin_key = self.settings.admin_key
        if admin_key is not None and hmac.compare_digest(token.encode(), admin_key.get_secret_value().encode()):
            return BOOTSTRAP_ADMIN
        digest = hashlib.sha256(token.encode()).hexdigest()
        cached = self.keys.peek(digest)
        if cached is not None and time.monotonic() - cached[1] < self.settings.auth_cache_s:
            return cached[0]
        if digest not in self._verifying:
            task = asyncio.ensure_future(self._verify(token, digest, cached))
            self._verifying[digest] = task
            task.add_done_callback(lambda _: self._verifying.pop(digest, None))
        return await asyncio.shield(self._verifying[digest])

    async def _verify(self, token: str, digest: str, cached: tuple[data.Caller, float] | None) -> data.Caller:
        try:
            caller = await self.read(data.authenticate, token)
        except store.InvalidApiKey:
            self.keys.pop(digest)
            raise ApiError(401, "invalid or revoked API key") from None
        except Unavailable:
            if cached is None:
                raise
            return cached[0]
        self.keys.put(digest, (caller, time.monotonic()))
        return caller

    @staticmethod
    def authorize(caller: data.Caller, scope: str, user: str | None) -> str | None:
        """The user a request acts for: a key bound to a user acts only for that user (and by default)."""
        if not caller.allows(scope):
            raise ApiError(403, f"this API key lacks the {scope!r} scope")
        if caller.user is not None:
            if user is not None and user != caller.user:
                raise ApiError(403, "this API key is bound to another user")
            return caller.user
        return user
    # ------------------------------------------------------------------------------------------ scoring

    def heads(self) -> ServedHeads:
        if self.served is None:
            detail = "" if self.database_ok else " (the database is unreachable)"
            raise Unavailable(f"no head set named {self.settings.head_set!r} is active yet{detail}")
        return self.served

    async def profile_for(self, user: str | None, served: ServedHeads) -> tuple[Profile, schemas.ProfileUsed]:
        """The profile to score `user` with, and what the response says about it (see ProfileUsed)."""
        default = Profile.default(served.heads)

        def fallback(reason: str, stale: bool = False) -> tuple[Profile, schemas.ProfileUsed]:
            return default, schemas.ProfileUsed(user_id=user, version=None, source="default", reason=reason,
                                                stale=stale)
        if user is None:
            return fallback("no_user")
        stale = False
        # With something cached to fall back on, a slow check is not waited for; without, it is.
        timeout = self.settings.version_check_timeout_s if self.profiles.latest(user) is not None else None
        try:
            revision = await self.revisions((served.row_id, user), timeout)
            state = self.profiles.get(user, revision)
            self.metrics.cache("miss" if state is None else "hit")
            if state is None:
                state = await self.states((served.row_id, user))
                self.profiles.put(user, state)
        except (Unavailable, TimeoutError):  # unreachable or too slow: the last state this replica saw, if any
            state, stale = self.profiles.latest(user), True
            self.metrics.cache("unverified")
            if state is None:
                return fallback("database_unavailable", stale=False)
        if not state.known:
            if self.settings.unknown_user == "404" and not stale:
                raise ApiError(404, f"unknown user {user!r}")
            return fallback("unknown_user", stale)
        if state.profile is None:
            return fallback("no_profile", stale)
        problem = state.profile.problem(served.heads)
        if problem is not None:
            return fallback(problem, stale)
        return state.profile, schemas.ProfileUsed(user_id=user, version=state.profile.version, source="user",
                                                  stale=stale)

    async def _score(self, user: str | None, items: list[tuple[Prompt, str]], field: Callable[[int], str]):
        served = self.heads()
        profile, used = await self.profile_for(user, served)
        job = ScoreJob(items, profile.weights, profile.bias, self.settings.over_length == "reject")
        result = await self.embed(served.ref, job)
        if result.scores is None:
            raise over_length_error([field(i) for i in result.over_length], self.settings.max_tokens)
        self.metrics.scored(len(items), used.source == "user")
        return served, profile, used, result

    async def score(self, caller: data.Caller, request: schemas.ScoreRequest) -> schemas.ScoreResponse:
        user = self.authorize(caller, "score", request.user_id)
        if len(request.responses) > self.settings.max_responses:
            raise ApiError(422, f"at most {self.settings.max_responses} responses per request, "
                                f"got {len(request.responses)}", ["responses"])
        prompt = request.conversation
        served, profile, used, result = await self._score(user, [(prompt, r) for r in request.responses],
                                                          lambda i: f"responses[{i}]")
        names = served.heads.head_names
        scored = [
            schemas.ScoredResponse(
                index=i, score=float(result.scores[i]), truncated=result.truncated[i],
                explanation=[schemas.Contribution(**vars(c)) for c in
                             explain(result.head_scores[i], profile.weights, names, request.explain_top)]
                if request.explain else None)
            for i in range(len(request.responses))
        ]
        return schemas.ScoreResponse(scores=scored, bias=profile.bias, profile=used, head_set=served.label)

    async def compare(self, caller: data.Caller, request: schemas.CompareRequest) -> schemas.CompareResponse:
        user = self.authorize(caller, "score", request.user_id)
        prompt = request.conversation
        served, _, used, result = await self._score(user, [(prompt, request.a), (prompt, request.b)],
                                                    lambda i: "ab"[i])
        a, b = (float(s) for s in result.scores)
        return schemas.CompareResponse(probability_a=preference_probability(a, b), score_a=a, score_b=b,
                                       truncated=any(result.truncated), profile=used, head_set=served.label)

    # ------------------------------------------------------------------------------------------ feedback

    async def feedback(self, caller: data.Caller, user: str,
                       request: schemas.FeedbackRequest) -> schemas.FeedbackResponse:
        """Store the pairs and re-adapt the profile from all the user's feedback, in one transaction.

        Head scores are computed before the transaction (no connection is held during a forward pass): the new
        pairs' here, and any stored pair this replica has not seen yet when the transaction finds it (it rolls
        back, embeds them and tries again). A concurrent writer makes it retry too (ProfileConflict).
        """
        self.authorize(caller, "feedback", user)
        served = self.heads()
        pairs = [FeedbackPair(p.conversation, p.chosen, p.rejected, p.source) for p in request.pairs]
        for i, pair in enumerate(pairs):  # the store's own limits (RP_MAX_* included), before any forward pass
            try:
                store.check_feedback_pair(pair, self.limits)
            except store.InvalidInput as exc:
                raise ApiError(422, str(exc), [f"pairs[{i}]"]) from None
        started = time.perf_counter()
        lock = self._user_locks.setdefault(user, asyncio.Lock())
        async with lock:  # this replica's writers for one user queue here rather than conflict in the database
            known = await self._pair_scores(served, pairs, reject=self.settings.over_length == "reject")
            for attempt in range(FEEDBACK_ATTEMPTS):
                try:
                    profile, out = await self.write(self._append_feedback, user, pairs, served, known)
                    break
                except MissingPairs as missing:
                    known.update(await self._pair_scores(served, missing.pairs, reject=False))
                except ApiError as exc:
                    if exc.status != 409 or attempt == FEEDBACK_ATTEMPTS - 1:
                        raise
                    await asyncio.sleep(random.uniform(0, 0.01 * (attempt + 1)))  # another replica wrote first
            else:
                raise ApiError(409, "the profile kept changing under concurrent feedback; retry")
            self.profiles.put(user, UserState(True, profile))
        self.metrics.adapted(time.perf_counter() - started, len(pairs))
        return schemas.FeedbackResponse(user_id=user, stored=len(pairs), profile=out)

    def _append_feedback(self, session: Session, user: str, pairs: list[FeedbackPair], served: ServedHeads,
                         known: dict[str, np.ndarray]) -> tuple[Profile, schemas.ProfileOut]:
        method = self.settings.adaptation
        head_set_row = session.get(store.HeadSetRow, served.row_id)

        def adapt(current: store.ProfileRow | None, history: Sequence[Feedback]) -> ProfileUpdate:
            keys = [pair_key(f.prompt, f.chosen, f.rejected) for f in history]
            missing = [FeedbackPair(f.prompt, f.chosen, f.rejected) for f, k in zip(history, keys) if k not in known]
            if missing:
                raise MissingPairs(missing)
            scores = np.stack([known[k] for k in keys])  # (n, 2, H)
            # plain Bradley-Terry resumes Newton from the current weights (a step or two)
            warm = current is not None and current.head_set_id == served.row_id and method == "bt"
            opts = {"init": np.asarray(current.weights)} if warm else {}
            weights, bias = adapt_on_head_set(served.heads, [scores], method, **opts)  # as a migration adapts
            profile = Profile(np.asarray(weights[0], dtype=np.float64), float(bias[0]), served.heads.content_hash)
            if profile.problem(served.heads) is not None:
                raise ValueError(f"adaptation ({method}) gave unusable weights for user {user!r}")
            return ProfileUpdate(profile.weights.tolist(), STORED_METHOD[method], profile.bias)

        store.get_or_create_user(session, user, limits=self.limits)
        row = store.append_feedback_and_update_profile(session, user, pairs, adapt, head_set_row, limits=self.limits)
        return data.to_profile(row), profile_out(user, row, served)

    async def _pair_scores(self, served: ServedHeads, pairs: Sequence[FeedbackPair],
                           reject: bool) -> dict[str, np.ndarray]:
        """Head scores (2, H) of each pair's chosen and rejected response, by `pair_key`; embeds what is missing."""
        digest = served.heads.content_hash
        known, missing, positions = {}, {}, {}  # positions: the indices in `pairs` of each missing pair
        for index, pair in enumerate(pairs):
            key = pair_key(pair.prompt, pair.chosen, pair.rejected)
            cached = self.pair_scores.get((digest, key))
            if cached is not None:
                known[key] = cached
            else:
                missing[key] = pair
                positions.setdefault(key, []).append(index)
        if missing:
            todo = list(missing.values())
            items = [(p.prompt, p.chosen) for p in todo] + [(p.prompt, p.rejected) for p in todo]
            heads = served.heads
            result = await self.embed(served.ref, ScoreJob(items, heads.default_weights, 0.0, reject))
            if result.scores is None:
                n, where = len(todo), list(positions.values())
                raise over_length_error([f"pairs[{index}].{'chosen' if i < n else 'rejected'}"
                                         for i in result.over_length for index in where[i % n]],
                                        self.settings.max_tokens)
            for i, key in enumerate(missing):
                known[key] = np.stack([result.head_scores[i], result.head_scores[len(todo) + i]])
                self.pair_scores.put((digest, key), known[key])
        return known

    # ------------------------------------------------------------------------------------------ profiles

    async def profile(self, caller: data.Caller, user: str) -> schemas.ProfileOut:
        self.authorize(caller, "score", user)
        served = self.heads()
        return await self.read(lambda session: profile_out(
            user, store.get_user(session, user).profile_on(served.row_id), served))

    # ------------------------------------------------------------------------------------------ health

    async def health(self) -> schemas.Health:
        try:
            await self.read(lambda session: session.execute(sa.text("SELECT 1")))
        except Unavailable:
            pass
        ok = self.database_ok and self.served is not None
        return schemas.Health(status="ok" if ok else "degraded", database="ok" if self.database_ok else "unreachable",
                              head_set=None if self.served is None else self.served.label,
                              cached_profiles=len(self.profiles))


def over_length_error(fields: list[str], limit: int) -> ApiError:
    return ApiError(422, f"longer than {limit} tokens (this service refuses over-long texts instead of "
                         "truncating them)", fields)
