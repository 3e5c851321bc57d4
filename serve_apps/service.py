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

Verified API keys are cached per replica for up to `auth_cache_s`, and each is trusted only while the store's
auth epoch (`rewardprism.store.revocation`) is the one it was verified at: one small query per wave of
requests (`Coalesced` again), so a delete, disable or revoke committed anywhere takes effect on the next
request everywhere. Every write also re-checks its caller's key in its own transaction (`lock_active_key`),
and a write sent with an `Idempotency-Key` stores its answer in that transaction (`IDEMPOTENCY`).
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import sqlalchemy as sa
from pydantic_core import to_jsonable_python
from rewardprism import store
from rewardprism.cards import load_cards
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
from rewardprism.select import choose_pairs, response_pairs
from rewardprism.store import Feedback, FeedbackPair, IdempotentRequest, ProfileUpdate, idempotency
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
PURGE_EVERY_S = 60.0  # how often a replica deletes expired idempotent answers
# The Idempotency-Key of the request being served (set by the route layer, `serve_apps.api`): the one write the
# request makes replays or stores its answer under it.
IDEMPOTENCY: ContextVar[IdempotentRequest | None] = ContextVar("rewardprism_idempotency", default=None)
POOLS_CACHED = 8  # query pools whose head-score gaps a replica keeps in memory
HEALTH_WAIT_S = 0.5  # /healthz waits this long for its database probe, then reports what it knows


class Abandoned(Exception):
    """Raised in a worker thread whose caller has answered 503 already: its transaction rolls back."""


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


class Replayed(Exception):
    """A retried write: its first answer, stored under the same Idempotency-Key (nothing was written again)."""

    def __init__(self, status: int, body: Any):
        super().__init__(f"replayed answer {status}")
        self.status, self.body = status, body


@dataclass(frozen=True)
class CachedCaller:
    caller: data.Caller
    epoch: int  # the store's auth epoch when the key was verified
    when: float  # time.monotonic() then


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


@dataclass(frozen=True)
class ServedHeads:
    heads: HeadSet
    row_id: int
    label: str  # name@version
    ref: HeadSetRef
    summaries: dict[str, str] = field(default_factory=dict)  # head → its card's one line (`rewardprism.cards`)


def _load_heads(uri: str) -> tuple[HeadSet, dict[str, Any] | None]:
    """The head set saved at `uri`, and its cards when it has them (a local folder with cards.json)."""
    return HeadSet.load(uri), load_cards(uri) if Path(uri).is_dir() else None


class Metrics(Protocol):
    def scored(self, responses: int, personalized: bool) -> None: ...

    def cache(self, result: str) -> None: ...

    def adapted(self, seconds: float, pairs: int) -> None: ...


Embed = Callable[[HeadSetRef, ScoreJob], Awaitable[ScoredJob]]


@dataclass(frozen=True)
class QueryState:
    history: list[tuple[Prompt, str, str]]  # the user's feedback pairs, oldest first
    pool_id: int | None
    answered: set[int]  # positions of the pool's pairs the user already labelled


def response_query_id(prompt: Prompt, a: str, b: str) -> str:
    """The id of "which of a and b is better for this prompt", whichever way round it is asked or answered."""
    digest = hashlib.sha256(json.dumps([prompt, sorted([a, b])], sort_keys=True).encode()).hexdigest()
    return f"resp:{digest[:40]}"


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
        threads = store_settings.pool_size + store_settings.max_overflow
        self.db = ThreadPoolExecutor(threads, thread_name_prefix="rewardprism-db")
        # A thread per database call in flight, held until the thread is free again (not merely until its caller
        # gave up), so calls hung on a stalled database cannot queue up behind each other without bound.
        self.db_slots = asyncio.Semaphore(threads)
        self.probes = ThreadPoolExecutor(1, thread_name_prefix="rewardprism-health")  # apart from the pool
        self._probe: asyncio.Future[bool] | None = None
        self._probe_started = 0.0
        self.profiles = ProfileCache(settings.profile_cache_size)
        # Keyed by (head-set row id, user): a replica looks up the profile over the head set it serves.
        self.revisions = Coalesced(self.read, data.current_revisions)  # (user exists, profile version, created)
        self.states = Coalesced(self.read, data.read_user_states)  # the profiles of cache misses
        self.keys: LruCache[str, CachedCaller] = LruCache(10_000)  # by sha256(token)
        self.epochs = Coalesced(self.read, data.auth_epochs)  # the store's auth epoch, one query per wave
        self._purged_at = time.monotonic()
        self._verifying: dict[str, asyncio.Future[data.Caller]] = {}  # sha256(token) → its one verification
        self.pair_scores: LruCache[tuple[str, str], np.ndarray] = LruCache(settings.pair_cache_size)  # (2, H)
        self.pools: LruCache[int, np.ndarray] = LruCache(POOLS_CACHED)  # a pool's gaps by id (pools never change)
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
        self.probes.shutdown(wait=False, cancel_futures=True)
        self.engine.dispose()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.head_set_poll_s)
            try:
                await self.refresh()
                if time.monotonic() - self._purged_at > PURGE_EVERY_S:
                    await self.write(idempotency.forget_expired, self.settings.idempotency_ttl_s)
                    self._purged_at = time.monotonic()
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
            heads, cards = await asyncio.get_running_loop().run_in_executor(self.db, _load_heads, row.uri)
            if heads.content_hash != row.content_hash:
                raise ValueError(f"head set {row.label} at {row.uri} changed after registration")
            self.served = ServedHeads(heads, row.id, row.label, HeadSetRef(row.uri, row.content_hash),
                                      {name: card.summary for name, card in (cards or {}).items()})
            log.info("serving head set %s (%d heads)", row.label, heads.num_heads)

    # ------------------------------------------------------------------------------------------ database

    async def read(self, work: Callable[..., T], *args: Any) -> T:
        """`work(session, *args)` in a worker thread; the session is rolled back and closed afterwards."""
        def call(_: threading.Event) -> T:
            with self.read_sessions() as session:
                return work(session, *args)
        return await self._in_thread(call)

    async def write(self, work: Callable[..., T], *args: Any, caller: data.Caller | None = None,
                    answer: Callable[[T], Any] = lambda result: result) -> T:
        """`work(session, *args)` in a worker thread, in one transaction that commits if it returns in time.

        With a `caller`, the transaction first re-checks that its key is still valid (it may have been revoked
        since it was cached) and, if the request carries an Idempotency-Key, replays the answer stored under it
        (`Replayed`) or stores `answer(result)` under it with the write.
        """
        once = IDEMPOTENCY.get() if caller is not None else None

        def call(abandoned: threading.Event) -> T:
            with self.sessions.begin() as session:
                if caller is not None and caller is not BOOTSTRAP_ADMIN:
                    store.lock_active_key(session, caller.key)
                if once is not None:
                    stored = idempotency.replay(session, once)
                    if stored is not None and stored.fingerprint != once.fingerprint:
                        raise ApiError(422, "this Idempotency-Key header was first sent with another request "
                                            "(method, path or body); use a new key for a new request")
                    if stored is not None:
                        raise Replayed(stored.status, stored.body)
                result = work(session, *args)
                if once is not None:
                    idempotency.remember(session, once, to_jsonable_python(answer(result)))
                if abandoned.is_set():  # the caller got a 503: commit nothing it was told was not written
                    raise Abandoned
                return result
        return await self._in_thread(call)

    async def _in_thread(self, call: Callable[[threading.Event], T]) -> T:
        """Run `call` in the pool under the `db_call_timeout_s` deadline (its wait for a thread included).

        At the deadline the caller gets a 503 and the call is marked abandoned: a write still running rolls
        back instead of committing (only a commit already sent may still land, as after any lost connection).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.db_call_timeout_s
        if self.db_slots.locked() and not self.database_ok:  # every thread hangs on a stalled database
            raise Unavailable("the database is not answering; try again shortly")
        try:
            await asyncio.wait_for(self.db_slots.acquire(), self.settings.db_call_timeout_s)
        except asyncio.TimeoutError:
            raise Unavailable("every database connection is busy; try again shortly") from None
        abandoned = threading.Event()
        future = loop.run_in_executor(self.db, call, abandoned)
        future.add_done_callback(self._release_slot)
        try:
            result = await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            abandoned.set()
            self.database_ok = False
            log.warning("database call past its %ss deadline: answered 503", self.settings.db_call_timeout_s)
            raise Unavailable("the database did not answer in time; nothing was written; retry") from None
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
        except store.UserDeleted as exc:
            raise ApiError(410, str(exc)) from None
        except store.InvalidApiKey:
            raise ApiError(401, "invalid or revoked API key") from None
        self.database_ok = True
        return result

    def _release_slot(self, future: asyncio.Future) -> None:
        self.db_slots.release()
        if not future.cancelled():
            future.exception()  # retrieved: an abandoned call's error was answered as a 503 already

    # ------------------------------------------------------------------------------------------ auth

    async def authenticate(self, token: str | None) -> data.Caller:
        """The caller behind an API key; a key verified before an outage keeps working through it.

        A cached key is used only while the store's auth epoch has not moved since it was verified (one
        coalesced query per wave), so a delete, disable or revoke is immediate on every replica. A key is
        verified at most once at a time: keys made before revision 0002 still have a slow hash (scrypt) until
        their first use rehashes them, and every request in flight hashing one at once cost two thirds of the
        Ingress's CPU under load (bench/bench_serve.py).
        """
        if not token:
            raise ApiError(401, "missing API key: send it in the X-API-Key header")
        admin_key = self.settings.admin_key
        if admin_key is not None and hmac.compare_digest(token.encode(), admin_key.get_secret_value().encode()):
            return BOOTSTRAP_ADMIN
        digest = hashlib.sha256(token.encode()).hexdigest()
        cached = self.keys.peek(digest)
        if cached is not None and time.monotonic() - cached.when < self.settings.auth_cache_s:
            try:
                if await self.epochs("", self.settings.version_check_timeout_s) == cached.epoch:
                    return cached.caller
            except (Unavailable, TimeoutError):  # as for profiles: an unreachable or hung database is not waited
                return cached.caller  # for (and nothing can be revoked while it cannot commit)
        if digest not in self._verifying:
            task = asyncio.ensure_future(self._verify(token, digest, cached))
            self._verifying[digest] = task
            task.add_done_callback(lambda _: self._verifying.pop(digest, None))
        return await asyncio.shield(self._verifying[digest])

    async def _verify(self, token: str, digest: str, cached: CachedCaller | None) -> data.Caller:
        try:
            verified = await self.read(data.authenticate, token)
        except ApiError as exc:
            self.keys.pop(digest)
            if exc.status == 401 or cached is None:
                raise
            return cached.caller  # unreachable: the last verified state (see authenticate)
        if verified.outdated_hash:
            try:
                await self.write(store.upgrade_api_key_hash, token)
            except ApiError as exc:  # the key works either way; the next verification tries again
                log.warning("could not rehash API key %s: %s", verified.caller.key, exc.message)
        self.keys.put(digest, CachedCaller(verified.caller, verified.epoch, time.monotonic()))
        return verified.caller

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
            raise over_length_error([field(i) for i in result.over_length], served.heads)
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
                explanation=[schemas.Contribution(**vars(c), summary=served.summaries.get(c.head)) for c in
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
        pairs = [FeedbackPair(p.conversation, p.chosen, p.rejected, p.source, p.query_id) for p in request.pairs]
        for i, pair in enumerate(pairs):  # the store's own limits (RP_MAX_* included), before any forward pass
            try:
                store.check_feedback_pair(pair, self.limits)
            except store.InvalidInput as exc:
                raise ApiError(422, str(exc), [f"pairs[{i}]"]) from None
        await self._check_query_ids(pairs)
        started = time.perf_counter()
        lock = self._user_locks.setdefault(user, asyncio.Lock())
        try:  # this replica's writers for one user queue here rather than conflict in the database, within the
            # deadline of a database call: behind a hung one they answer 503 in time instead of queueing on
            await asyncio.wait_for(lock.acquire(), self.settings.db_call_timeout_s)
        except TimeoutError:
            raise Unavailable("this user's earlier feedback is still waiting for the database; retry") from None
        try:
            known = await self._pair_scores(served, pairs, reject=self.settings.over_length == "reject")
            for attempt in range(FEEDBACK_ATTEMPTS):
                try:
                    profile, out = await self.write(self._append_feedback, user, pairs, served, known, caller=caller,
                                                    answer=lambda result: result[1])
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
        finally:
            lock.release()
        self.metrics.adapted(time.perf_counter() - started, len(pairs))
        return out

    def _append_feedback(self, session: Session, user: str, pairs: list[FeedbackPair], served: ServedHeads,
                         known: dict[str, np.ndarray]) -> tuple[Profile, schemas.FeedbackResponse]:
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
        return data.to_profile(row), schemas.FeedbackResponse(user_id=user, stored=len(pairs),
                                                              profile=profile_out(user, row, served))

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
                                         for i in result.over_length for index in where[i % n]], heads)
            for i, key in enumerate(missing):
                known[key] = np.stack([result.head_scores[i], result.head_scores[len(todo) + i]])
                self.pair_scores.put((digest, key), known[key])
        return known

    # ------------------------------------------------------------------------------------------ queries

    async def queries(self, caller: data.Caller, user: str, request: schemas.QueryRequest) -> schemas.QueryResponse:
        """The k pairs this user should label next (`rewardprism.select`), from a pool registered with the served
        head set or among the responses sent for one prompt.

        The posterior is the default method's over all of the user's feedback (a user with none starts from the
        population profile); pool pairs the user already answered (feedback citing their query ids) are not asked
        again. Nothing is written: a query id is a name for the pair, checked when feedback cites it.
        """
        self.authorize(caller, "feedback", user)
        served = self.heads()
        if request.responses is not None:  # before any database call or forward pass
            if len(request.responses) > self.settings.max_responses:  # as a score request: one forward pass each
                raise ApiError(422, f"at most {self.settings.max_responses} responses per request, "
                                    f"got {len(request.responses)}", ["responses"])
            first = {}
            for i, response in enumerate(request.responses):
                if first.setdefault(response, i) != i:  # a pair of one response twice asks nothing
                    raise ApiError(422, f"responses[{i}] repeats responses[{first[response]}]", [f"responses[{i}]"])
        state = await self.read(self._query_state, user, served, request.pool)
        history = [FeedbackPair(*pair) for pair in state.history]
        known = await self._pair_scores(served, history, reject=False)
        scores = np.array([known[pair_key(p.prompt, p.chosen, p.rejected)] for p in history]).reshape(
            len(history), 2, served.heads.num_heads)
        exclude = None
        if state.pool_id is not None:
            gaps = self.pools.get(state.pool_id)
            if gaps is None:
                gaps = await self.read(lambda session: store.pool_gaps(session, state.pool_id, served.heads.num_heads))
                self.pools.put(state.pool_id, gaps)
            exclude = np.zeros(len(gaps), bool)
            exclude[sorted(state.answered)] = True
        else:
            items = [(request.conversation, r) for r in request.responses]
            result = await self.embed(served.ref, ScoreJob(items, served.heads.default_weights, 0.0,
                                                           self.settings.over_length == "reject"))
            if result.scores is None:
                raise over_length_error([f"responses[{i}]" for i in result.over_length], served.heads)
            index, gaps = response_pairs(result.head_scores)
        left = len(gaps) - (0 if exclude is None else int(exclude.sum()))
        if request.k > left:
            raise ApiError(422, f"k={request.k} but only {left} pairs are left to ask", ["k"])
        picks = await asyncio.to_thread(choose_pairs, served.heads, scores[:, 0], scores[:, 1], gaps, request.k,
                                        request.method, exclude)
        if state.pool_id is None:
            prompt = request.conversation
            queries = [schemas.Query(query_id=response_query_id(prompt, request.responses[a], request.responses[b]),
                                     prompt=prompt, a=request.responses[a], b=request.responses[b], responses=[a, b])
                       for a, b in index[picks].tolist()]
        else:
            rows = await self.read(lambda session: {
                position: (row.prompt, row.response_a, row.response_b)
                for position, row in store.pool_pairs(session, state.pool_id, picks).items()})
            queries = [schemas.Query(query_id=store.pool_query_id(state.pool_id, int(i)), prompt=rows[int(i)][0],
                                     a=rows[int(i)][1], b=rows[int(i)][2]) for i in picks]
        return schemas.QueryResponse(user_id=user, queries=queries, method=request.method, labelled=len(history),
                                     candidates=len(gaps), head_set=served.label)

    def _query_state(self, session: Session, user: str, served: ServedHeads, pool: str | None) -> QueryState:
        """The user's feedback (none for a user not seen yet) and, with a pool, its id and the positions answered."""
        if store.was_deleted(session, user):
            raise store.UserDeleted(f"user {user!r} was deleted")
        row = session.scalar(sa.select(store.User).where(store.User.external_id == user))
        if row is not None and row.disabled:
            raise store.UserDisabled(f"user {user!r} is disabled")
        history = [] if row is None else [(f.prompt, f.chosen, f.rejected) for f in store.feedback_of(session, row)]
        if pool is None:
            return QueryState(history, None, set())
        found = store.get_query_pool(session, session.get(store.HeadSetRow, served.row_id), pool)
        return QueryState(history, found.id, store.answered_positions(session, row, found))

    async def _check_query_ids(self, pairs: Sequence[FeedbackPair]) -> None:
        """Every cited query id must name its pair: a response query its hash, a pool query the stored pair."""
        cited, first = {}, {}
        for i, pair in enumerate(pairs):
            if pair.query_id is None:
                continue
            if first.setdefault(pair.query_id, i) != i:  # one answer per query: twice would count it twice
                raise ApiError(422, f"cites the same query as pairs[{first[pair.query_id]}]",
                               [f"pairs[{i}].query_id"])
            if pair.query_id.startswith("resp:"):
                if pair.query_id != response_query_id(pair.prompt, pair.chosen, pair.rejected):
                    raise ApiError(422, "query_id does not name this prompt and these two responses",
                                   [f"pairs[{i}].query_id"])
            else:
                cited[i] = tuple(int(part) for part in pair.query_id.split(":")[1:])
        if not cited:
            return
        stored = await self.read(lambda session: {
            i: (row.prompt, {row.response_a, row.response_b}) if row is not None else None
            for i, (pool_id, position) in cited.items()
            for row in [store.pool_pairs(session, pool_id, [position]).get(position)]})
        for i, found in stored.items():
            if found is None or found != (pairs[i].prompt, {pairs[i].chosen, pairs[i].rejected}):
                raise ApiError(422, "query_id does not name a pool pair with this prompt and these two responses",
                               [f"pairs[{i}].query_id"])

    # ------------------------------------------------------------------------------------------ profiles

    async def profile(self, caller: data.Caller, user: str) -> schemas.ProfileOut:
        self.authorize(caller, "score", user)
        served = self.heads()
        return await self.read(lambda session: profile_out(
            user, store.get_user(session, user).profile_on(served.row_id), served))

    async def head_cards(self, caller: data.Caller, excerpts: bool) -> schemas.HeadsOut:
        """The served head set's cards (`rewardprism.cards`, saved beside it), read from its folder."""
        self.authorize(caller, "score", None)
        served = self.heads()
        cards = await asyncio.to_thread(load_cards, served.ref.uri) if Path(served.ref.uri).is_dir() else None
        heads = []
        for name in served.heads.head_names:
            card = (cards or {}).get(name)
            if card is None:
                heads.append(schemas.HeadCardOut(head=name))
            else:
                heads.append(schemas.HeadCardOut(**(asdict(card) if excerpts else card.without_excerpts())))
        return schemas.HeadsOut(head_set=served.label, cards=cards is not None, heads=heads)

    # ------------------------------------------------------------------------------------------ health

    async def health(self) -> schemas.Health:
        """Answers within HEALTH_WAIT_S whatever the database does: one probe at a time runs in a thread of its
        own; a probe unanswered for longer means the database is unreachable (or hangs) for now."""
        loop = asyncio.get_running_loop()
        if self._probe is None or self._probe.done():
            self._probe, self._probe_started = loop.run_in_executor(self.probes, self._ping), loop.time()
        done, _ = await asyncio.wait({self._probe}, timeout=HEALTH_WAIT_S)
        if done:
            self.database_ok = self._probe.result()
        elif loop.time() - self._probe_started >= HEALTH_WAIT_S:
            self.database_ok = False
        ok = self.database_ok and self.served is not None
        return schemas.Health(status="ok" if ok else "degraded", database="ok" if self.database_ok else "unreachable",
                              head_set=None if self.served is None else self.served.label,
                              cached_profiles=len(self.profiles))

    def _ping(self) -> bool:
        try:
            with self.engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))
        except sa.exc.SQLAlchemyError as exc:  # any of them: the probe reports, it never fails /healthz
            log.warning("database health probe failed: %s", type(exc).__name__)
            return False
        return True


def over_length_error(fields: list[str], heads: HeadSet) -> ApiError:
    limit = heads.feature_spec().max_length  # the head set's own: the features it was fitted on
    return ApiError(422, f"longer than {limit} tokens (this service refuses over-long texts instead of "
                         "truncating them)", fields)
