"""`rewardprism pools register | list`: candidate pairs the service may ask users to label.

A pool belongs to one head-set version and stores the head scores of its pairs, computed here from an embedding
folder made with that head set's features, so that a query (`POST /v1/users/{id}/queries`) costs no forward pass.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from rewardprism.cli_store import _audit, _connect, _fail, _table, _transaction, _when
from rewardprism.store import InvalidInput, get_head_set, list_query_pools, register_query_pool
from rewardprism.store.pools import checked_pool_name

pools_app = typer.Typer(help="Pools of candidate pairs to ask users about (active selection).",
                        no_args_is_help=True)
pools_app.callback()(_connect)


def _head_set_ref(value: str) -> tuple[str, str | None]:
    name, _, version = value.partition("@")
    return name, version or None


@pools_app.command("register")
def pools_register(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="the pool's name, unique per head-set version")],
    head_set: Annotated[str, typer.Option(help="NAME or NAME@VERSION (default: the active version of NAME)")],
    embeddings: Annotated[Path, typer.Option(help="embedding folder of the candidate pairs (`rewardprism embed` "
                                                  "with the head set's backbone); their labels are not used")],
    limit: Annotated[int | None, typer.Option(min=1, help="only the first N pairs")] = None,
    seed: Annotated[int, typer.Option(help="seed of the order each pair's two responses are shown in")] = 0,
) -> None:
    """Register the pairs of an embedding folder as a pool of the head set, with their head scores."""
    from rewardprism.embed import EmbeddingSet
    from rewardprism.features import require_same
    from rewardprism.heads import HeadSet
    from rewardprism.select import unlabelled_pool

    try:
        checked_pool_name(name)  # before the head set and every embedding are read
    except InvalidInput as exc:
        _fail(f"NAME: {exc}")
    head_name, version = _head_set_ref(head_set)
    with _transaction(ctx) as session:
        row = get_head_set(session, head_name, version)
        uri, label = row.uri, row.label
    try:
        heads = HeadSet.load(uri)
    except (OSError, ValueError) as exc:
        _fail(f"--head-set: cannot load {label} from {uri}: {exc}")
    try:
        data = EmbeddingSet(embeddings)
        require_same(heads.feature_spec(), data.features, f"the embedding folder {embeddings}")
        chosen, rejected = data.load()
        pairs = data.pairs()
    except (FileNotFoundError, ValueError) as exc:
        _fail(f"--embeddings: {exc}")
    texts, gaps = unlabelled_pool(heads, chosen[:limit], rejected[:limit], pairs[:limit], seed)
    if not np.isfinite(gaps.astype(np.float32)).all():  # as the store stores them
        _fail(f"--embeddings: the head scores of {embeddings}'s pairs hold NaN or inf (or values beyond float32)")
    with _transaction(ctx) as session:
        pool = register_query_pool(session, get_head_set(session, head_name, version), name, texts, gaps,
                                   limits=ctx.obj.settings.limits)
        _audit(ctx, session, "pools.register", f"{label}/{name}", pairs=len(texts), embeddings=str(embeddings))
        pool_id = pool.id
    typer.echo(f"registered pool {name!r} (id {pool_id}) of {label}: {len(texts)} pairs")


@pools_app.command("list")
def pools_list(
    ctx: typer.Context,
    head_set: Annotated[str, typer.Option(help="NAME or NAME@VERSION (default: the active version of NAME)")],
) -> None:
    """The pools registered with a head-set version."""
    head_name, version = _head_set_ref(head_set)
    with _transaction(ctx) as session:
        row = get_head_set(session, head_name, version)
        rows = [(p.id, p.name, row.label, p.size, _when(p.created_at)) for p in list_query_pools(session, row)]
    _table(("id", "name", "head set", "pairs", "registered"), rows)
