"""Rolling users onto a new head-set version: migrate their profiles from their feedback, and shadow-evaluate.

`migrate_profiles` walks the users who have feedback in id order, a batch at a time: it reads their pairs, embeds
and scores them under the new head set, adapts the whole batch at once (`rewardprism.migrate_profiles`) and writes
the batch's profiles in one transaction. A profile over the new version is up to date when its `n_pairs` equals
the user's feedback count (feedback is append-only), so a rerun after a kill skips finished users and the
(user, head set) unique key rules out duplicates. A user who sends feedback while their batch is being adapted is
not written (their count moved) and is picked up by the next pass; passes repeat until one finds nobody behind.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session, selectinload, sessionmaker

from rewardprism.adapt import Method
from rewardprism.embed import EmbeddingExtractor
from rewardprism.heads import HeadSet
from rewardprism.migrate_profiles import PairText, ShadowReport, adapt_on_head_set, scores_per_user, shadow_evaluate
from rewardprism.store.errors import ProfileConflict
from rewardprism.store.models import Feedback, HeadSetRow, ProfileRow, User
from rewardprism.store.profiles import ProfileUpdate, write_profile

# The stored method of each adaptation method: adapt's `default` shrinks toward the population profile, stored as
# "shrink" (the stored "default" is POPULATION_METHOD: the head set's population weights, as after a reset).
STORED_METHOD = {"default": "shrink", "hyre": "hyre", "bt": "bt"}


@dataclass
class MigrationProgress:
    """Where a migration stands: what its progress bar and the admin API's job status show."""

    total: int  # users behind when the migration started (more may join while it runs)
    done: int = 0
    pairs: int = 0
    started: float = 0.0
    passes: int = 0

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / max(time.perf_counter() - self.started, 1e-9)

    @property
    def eta_s(self) -> float | None:
        if not self.done:
            return None
        elapsed = time.perf_counter() - self.started
        return max(self.total - self.done, 0) * elapsed / self.done


def _behind(head_set_id: int, after_user_id: int, limit: int | None) -> sa.Select:
    """Users with feedback whose profile over the head set is missing or adapted from fewer pairs, by id."""
    count = sa.func.count(Feedback.id)
    query = (sa.select(User.id, User.external_id, count)
             .join(Feedback, Feedback.user_id == User.id)
             .outerjoin(ProfileRow, sa.and_(ProfileRow.user_id == User.id, ProfileRow.head_set_id == head_set_id))
             .where(User.id > after_user_id, User.disabled.is_(False))
             .group_by(User.id, User.external_id, ProfileRow.n_pairs)
             .having(sa.or_(ProfileRow.n_pairs.is_(None), ProfileRow.n_pairs != count))
             .order_by(User.id))
    return query if limit is None else query.limit(limit)


def users_behind(session: Session, head_set: HeadSetRow) -> int:
    """How many users a migration onto `head_set` still has to (re-)adapt."""
    return session.scalar(sa.select(sa.func.count()).select_from(_behind(head_set.id, 0, None).subquery())) or 0


def _feedback_by_user(session: Session, user_ids: list[int]) -> dict[int, list[PairText]]:
    pairs: dict[int, list[PairText]] = {u: [] for u in user_ids}
    rows = session.execute(sa.select(Feedback.user_id, Feedback.prompt, Feedback.chosen, Feedback.rejected)
                           .where(Feedback.user_id.in_(user_ids)).order_by(Feedback.user_id, Feedback.id))
    for user_id, prompt, chosen, rejected in rows:
        pairs[user_id].append((prompt, chosen, rejected))
    return pairs


def _batches(sessions: sessionmaker, head_set_id: int, batch_users: int) -> Iterator[dict[int, list[PairText]]]:
    """Batches of behind users' pairs, by user id ascending, each read in a short read-only transaction."""
    after = 0
    while True:
        with sessions() as session:  # closed before the caller writes: SQLite has one writer, and no open reader
            ids = [row[0] for row in session.execute(_behind(head_set_id, after, batch_users))]
            pairs = _feedback_by_user(session, ids) if ids else {}
        if not ids:
            return
        yield pairs
        after = ids[-1]


def _write_batch(session: Session, head_set: HeadSetRow, user_pairs: dict[int, list[PairText]],
                 weights: np.ndarray, bias: np.ndarray, method: str) -> int:
    """Write each user's profile unless their feedback moved since it was read; the number written."""
    ids = list(user_pairs)
    position = {user_id: i for i, user_id in enumerate(ids)}
    counts = {user_id: n for user_id, n in session.execute(
        sa.select(Feedback.user_id, sa.func.count(Feedback.id)).where(Feedback.user_id.in_(ids))
        .group_by(Feedback.user_id))}
    users = session.scalars(sa.select(User).where(User.id.in_(ids))
                            .options(selectinload(User.profiles).joinedload(ProfileRow.head_set))).all()
    written = 0
    for user in users:
        n = len(user_pairs[user.id])
        if counts.get(user.id) != n or user.disabled:
            continue  # new feedback arrived: the next pass adapts the user from all of it
        current = user.profile_on(head_set.id)
        i = position[user.id]
        update = ProfileUpdate(weights[i].tolist(), method, float(bias[i]))
        write_profile(session, user, head_set, current.version if current else None, update, n_pairs=n)
        written += 1
    return written


def migrate_profiles(sessions: sessionmaker, head_set_row_id: int, heads: HeadSet, extractor: EmbeddingExtractor,
                     *, method: Method = "default", batch_users: int = 256,
                     progress: Callable[[MigrationProgress], None] = lambda _: None) -> MigrationProgress:
    """Adapt every user with feedback onto the head set (row `head_set_row_id`, loaded as `heads`) until none
    is behind; returns the final progress. Safe to rerun, and to run while users send feedback."""
    with sessions() as session:
        state = MigrationProgress(total=users_behind(session, session.get(HeadSetRow, head_set_row_id)),
                                  started=time.perf_counter())
    progress(state)
    stored_method = STORED_METHOD[method]
    while True:
        state.passes += 1
        written_this_pass = 0
        for user_pairs in _batches(sessions, head_set_row_id, batch_users):
            weights, bias = adapt_on_head_set(heads, scores_per_user(heads, extractor, list(user_pairs.values())),
                                              method)
            try:
                with sessions.begin() as session:
                    written = _write_batch(session, session.get(HeadSetRow, head_set_row_id), user_pairs, weights,
                                           bias, stored_method)
            except ProfileConflict:  # the service wrote one of these profiles meanwhile: the next pass redoes them
                written = 0
            written_this_pass += written
            state.done += written
            state.pairs += sum(map(len, user_pairs.values()))
            progress(state)
        if written_this_pass == 0:
            with sessions() as session:  # nobody left, or only users whose feedback keeps moving: go again
                if users_behind(session, session.get(HeadSetRow, head_set_row_id)) == 0:
                    return state


def shadow_report(sessions: sessionmaker, old: tuple[HeadSet, EmbeddingExtractor],
                  new: tuple[HeadSet, EmbeddingExtractor], *, min_pairs: int = 5, folds: int = 5,
                  max_drop_points: float = 10.0, method: Method = "default",
                  batch_users: int = 256) -> ShadowReport:
    """`shadow_evaluate` over every user with feedback, a batch of users at a time."""
    parts: list[ShadowReport] = []
    after = 0
    while True:
        with sessions() as session:
            rows = session.execute(sa.select(User.id, User.external_id).where(
                User.id > after, sa.exists().where(Feedback.user_id == User.id)).order_by(User.id)
                .limit(batch_users)).all()
            if not rows:
                return ShadowReport.merged(parts, max_drop_points)
            pairs = list(_feedback_by_user(session, [r[0] for r in rows]).values())
        after = rows[-1][0]
        scored = [(heads, scores_per_user(heads, extractor, pairs)) for heads, extractor in (old, new)]
        parts.append(shadow_evaluate([r[1] for r in rows], scored[0], scored[1], min_pairs=min_pairs,
                                     folds=folds, max_drop_points=max_drop_points, method=method))
