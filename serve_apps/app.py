"""The Ray Serve application: `serve run serve_apps/config.yaml` (or `rewardprism serve`).

Two thin deployments over plain classes:
- `Embedder` wraps `rewardprism.scoring.BatchScorer`: the backbone is loaded once per replica, as the served
  head set's feature spec says (`rewardprism.features`: the features it was fitted on), and
  `@serve.batch` gathers requests from every user and every ingress replica into one token-budget batched
  forward pass, after which each request's own profile is applied (one small matrix product per batch).
  Per-user multiplexing is deliberately not used: it would split batches by user.
- `Ingress` wraps `serve_apps.service.ScoringService` behind FastAPI (`serve_apps.api`): auth, profiles from
  the per-replica cache, feedback and adaptation, the admin API.

Settings come from the environment (`serve_apps.settings`); `user_config` changes the live ones in place.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram
from rewardprism.features import FeatureMismatch, FeatureSpec
from rewardprism.heads import HeadSet
from rewardprism.scoring import BatchScorer, LruCache, ScoredJob, ScoreJob

from serve_apps import migration
from serve_apps.api import create_api
from serve_apps.service import HeadSetRef, ScoringService, Unavailable
from serve_apps.settings import ServeSettings

# glibc keeps the memory freed after each batch for reuse, but batches come in ever new shapes, so a busy
# replica grew by ~65 MiB/min and never gave it back; trimming after every batch keeps it flat at no measurable
# cost (bench/bench_serve.py, BENCHMARKS.md). Elsewhere (macOS, musl) nothing is done.
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform == "linux" else None


# A batch runs as soon as it holds `batch_max_texts` texts; until then it waits for more up to this share of
# what the last batch took (`batch_wait_s` unset). Under a full load on CPU a batch takes over a second, and
# the clients of the batch that just finished are still on their way back through the proxy: without the wait
# batches split into ever smaller ones (docs/serve.md). Under a light load batches are small and quick, so the
# wait is too; on a GPU it is milliseconds.
BATCH_WAIT_SHARE = 0.1
FIRST_BATCH_WAIT_S = 0.005  # until a batch has been timed


def batch_texts(requests: list[tuple[HeadSetRef, ScoreJob, int]]) -> int:
    """A batch's size in texts (each request's count, capped when it was queued), not in requests."""
    return sum(texts for _, _, texts in requests)


def score_and_trim(scorer: BatchScorer, heads: HeadSet, jobs: list[ScoreJob]) -> list[ScoredJob]:
    try:
        return scorer.score(heads, jobs)
    finally:
        if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
            _LIBC.malloc_trim(0)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
class Embedder:
    def __init__(self):
        self.last_batch_s: float | None = None  # how long the last batch's forward passes took
        self.apply(ServeSettings.from_env())
        self.scorers: dict[FeatureSpec, BatchScorer] = {}  # normally one: the served head set's
        # One thread runs every forward pass: the event loop stays free to gather the next batch, and the memory
        # the allocator keeps for the batch shapes it has seen stays in one arena instead of one per thread.
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="embedder")
        self.heads: LruCache[str, HeadSet] = LruCache(4)  # by content hash: the served one, and the last few

    def reconfigure(self, user_config: dict) -> None:
        self.apply(ServeSettings.from_env().live(user_config))

    def apply(self, settings: ServeSettings) -> None:
        self.settings = settings
        self._batch.set_max_batch_size(settings.batch_max_texts)
        self.set_batch_wait()

    def set_batch_wait(self) -> None:
        wait = self.settings.batch_wait_s
        if wait is None:
            wait = FIRST_BATCH_WAIT_S if self.last_batch_s is None else min(1.0, BATCH_WAIT_SHARE * self.last_batch_s)
        self._batch.set_batch_wait_timeout_s(wait)

    def timed(self, seconds: float) -> None:
        """The last batch's cost, which the next batch's wait follows."""
        self.last_batch_s = seconds
        self.set_batch_wait()

    def scorer(self, heads: HeadSet) -> BatchScorer:
        """The head set's features, from `RP_BACKBONE`'s copy of the weights when set; a head set whose features
        this replica cannot make is refused (503, saying why), never scored on other features."""
        try:
            spec = heads.feature_spec()
            if spec not in self.scorers:
                backbone = spec.load_backbone(device=self.settings.device, weights_from=self.settings.backbone)
                if backbone.dim != heads.dim:
                    raise FeatureMismatch(f"{self.settings.backbone} gives {backbone.dim}-d features, the head set "
                                          f"reads {heads.dim}-d")
                self.scorers[spec] = BatchScorer(backbone, self.settings.token_budget, self.settings.max_batch)
        except FeatureMismatch as exc:
            raise Unavailable(f"cannot serve head set {heads.name}@{heads.version}: {exc}") from None
        return self.scorers[spec]

    def head_set(self, ref: HeadSetRef) -> HeadSet:
        heads = self.heads.get(ref.content_hash)
        if heads is None:
            heads = HeadSet.load(ref.uri)
            if heads.content_hash != ref.content_hash:
                raise ValueError(f"head set at {ref.uri} has hash {heads.content_hash}, not {ref.content_hash}")
            self.heads.put(ref.content_hash, heads)
        return heads

    async def score(self, ref: HeadSetRef, job: ScoreJob) -> ScoredJob:
        # A request larger than a whole batch counts as one whole batch: it runs alone.
        result = await self._batch((ref, job, min(len(job.items), self.settings.batch_max_texts)))
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=FIRST_BATCH_WAIT_S, batch_size_fn=batch_texts)
    async def _batch(self, requests: list[tuple[HeadSetRef, ScoreJob, int]]) -> list[ScoredJob | Exception]:
        """All requests in one forward pass per head set (normally one); a failing group fails only itself."""
        groups: dict[HeadSetRef, list[int]] = defaultdict(list)
        for i, (ref, _, _) in enumerate(requests):
            groups[ref].append(i)
        results: list[ScoredJob | Exception] = [ValueError("not scored")] * len(requests)
        for ref, members in groups.items():
            try:
                heads = self.head_set(ref)
                scorer = self.scorer(heads)
                jobs = [requests[i][1] for i in members]
                started = time.perf_counter()
                scored = await asyncio.get_running_loop().run_in_executor(
                    self.compute, score_and_trim, scorer, heads, jobs)
                self.timed(time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 (handed to each caller of the group, who re-raises it)
                scored = [exc] * len(members)
            for i, result in zip(members, scored):
                results[i] = result
        return results


class RayMetrics:
    """The service's Prometheus metrics, next to Serve's own (request counts, latencies, batch sizes)."""

    def __init__(self):
        self.responses = Counter("rewardprism_responses_scored", "responses scored, by profile kind",
                                 tag_keys=("profile",))
        self.lookups = Counter("rewardprism_profile_cache_lookups", "profile cache lookups: hit, miss, unverified",
                               tag_keys=("result",))
        self.pairs = Counter("rewardprism_feedback_pairs", "feedback pairs stored")
        self.adaptation = Histogram("rewardprism_adaptation_seconds", "feedback call: embed, adapt and commit",
                                    boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30])

    def scored(self, responses: int, personalized: bool) -> None:
        self.responses.inc(responses, tags={"profile": "user" if personalized else "default"})

    def cache(self, result: str) -> None:
        self.lookups.inc(tags={"result": result})

    def adapted(self, seconds: float, pairs: int) -> None:
        self.adaptation.observe(seconds)
        self.pairs.inc(pairs)


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256)
@serve.ingress()
class Ingress:
    async def __init__(self, embedder: DeploymentHandle):
        self.embedder = embedder
        self.service = ScoringService(ServeSettings.from_env(), self.embed, RayMetrics())
        await self.service.start()

    async def embed(self, ref: HeadSetRef, job: ScoreJob) -> ScoredJob:
        try:
            return await self.embedder.score.remote(ref, job)
        except RayActorError:  # the replica died under this request; Serve is starting another
            raise Unavailable("the embedding replica failed; retry") from None
        except RayTaskError as exc:  # the replica's own 503 (it cannot serve this head set) stays a 503
            if isinstance(exc.cause, Unavailable):
                raise exc.cause from None
            raise

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.service, migration)

    def reconfigure(self, user_config: dict) -> None:
        self.service.reconfigure(ServeSettings.from_env().live(user_config))

    async def __del__(self):
        await self.service.close()


app = Ingress.bind(Embedder.bind())
