"""Profile migrations started from the admin API: one detached, named Ray actor per head-set version.

The actor runs `rewardprism.store.rollout.migrate_profiles` (what `rewardprism models migrate` runs) in a thread
and answers status calls while it works; once done, it runs the shadow evaluation against the version active
then (`models report`, default thresholds) and keeps its lines and gate failures (`regressions`) for
`activate?require_no_regression=true`. Detached and named after the version, it outlives the replica that
started it, any replica finds it, and starting it again while it runs is a no-op; started again after it
finished or died, it resumes (finished users are skipped). Settings come from the caller's ServeSettings.
"""
from __future__ import annotations

import threading
import traceback
from typing import Any

import ray

NAMESPACE = "rewardprism"
MAX_LOSING_SHARE = 0.05  # the gate's default, as `rewardprism models activate --require-no-regression`


def actor_name(name: str, version: str) -> str:
    return f"migrate:{name}@{version}"


@ray.remote(num_cpus=0.5, max_restarts=0)  # beside the replicas on a small machine
class MigrationJob:
    def __init__(self, database_url: str, head_set_row_id: int, uri: str, method: str):
        self.state: dict[str, Any] = {"state": "starting", "users_done": 0, "users_total": None, "pairs": 0,
                                      "pairs_per_s": 0.0, "eta_s": None, "error": None, "report": None,
                                      "regressions": None}
        self.args = (database_url, head_set_row_id, uri, method)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        from rewardprism import store
        from rewardprism.embed import EmbeddingExtractor
        from rewardprism.heads import HeadSet
        from rewardprism.store.rollout import migrate_profiles, shadow_report

        database_url, row_id, uri, method = self.args
        engine = store.make_engine(store.StoreSettings.from_env(database_url))
        sessions = store.make_sessions(engine)

        def loaded(path: str):
            heads = HeadSet.load(path)
            return heads, EmbeddingExtractor(heads.feature_spec().load_backbone())  # the features it was fitted on
        try:
            new = loaded(uri)
            self.state["state"] = "running"
            migrate_profiles(sessions, row_id, *new, method=method, progress=self._progress)
            with sessions() as session:
                name = session.get(store.HeadSetRow, row_id).name
                active = [h.uri for h in store.list_head_sets(session, name) if h.active]
            if active:
                report = shadow_report(sessions, loaded(active[0]), new, method=method)
                self.state.update(report=report.lines(), regressions=report.gate_failures(MAX_LOSING_SHARE))
            self.state["state"] = "done"
        except Exception as exc:  # noqa: BLE001 (reported by status(); a rerun resumes)
            self.state.update(state="failed", error=f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
        finally:
            engine.dispose()

    def _progress(self, progress) -> None:
        self.state.update(users_done=progress.done, users_total=max(progress.total, progress.done),
                          pairs=progress.pairs, pairs_per_s=progress.pairs_per_s, eta_s=progress.eta_s)

    def status(self) -> dict[str, Any]:
        return dict(self.state)


def _find(name: str, version: str):
    try:
        return ray.get_actor(actor_name(name, version), namespace=NAMESPACE)
    except ValueError:
        return None


async def start(name: str, version: str, database_url: str, head_set_row_id: int, uri: str,
                method: str) -> dict[str, Any]:
    """Start the version's migration unless it is running; its status."""
    actor = _find(name, version)
    if actor is not None and (await actor.status.remote())["state"] in ("done", "failed"):
        ray.kill(actor)  # finished: a new run resumes from where the store stands
        actor = None
    if actor is None:
        actor = MigrationJob.options(name=actor_name(name, version), namespace=NAMESPACE, lifetime="detached",
                                     get_if_exists=True).remote(database_url, head_set_row_id, uri, method)
    return await actor.status.remote()


async def status(name: str, version: str) -> dict[str, Any] | None:
    """The version's migration status (None: none started since the cluster came up)."""
    actor = _find(name, version)
    return None if actor is None else await actor.status.remote()
