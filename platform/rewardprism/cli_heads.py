"""`rewardprism heads show HEADSET [--head pc3]`: a head set's cards (what each head means), for people.

`decompose` writes the cards beside the head set; for a head set without them (VRM, or saved before cards
existed) `--embeddings` names the pairs to read them off, and they are saved then.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rewardprism.cli_common import fail

heads_app = typer.Typer(help="Head sets for people: what each head means.", no_args_is_help=True)


@heads_app.callback()
def heads() -> None:
    """Head cards: each head's highest and lowest pairs, explained variance and correlated attributes/groups."""


@heads_app.command("show")
def show(
    head_set: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="a head set folder")],
    head: Annotated[str | None, typer.Option(help="one head's whole card, e.g. +pc3 (or pc3: both directions)")]
    = None,
    embeddings: Annotated[Path | None, typer.Option(
        help="embedding folder to read the cards off, when the head set has none yet (e.g. its training data)")]
    = None,
) -> None:
    """Every head's one-line summary, or one head's card with the pairs it scores highest and lowest."""
    from rewardprism.cards import head_cards, load_cards, save_cards
    from rewardprism.embed import EmbeddingSet
    from rewardprism.heads import HeadSet

    try:
        heads = HeadSet.load(head_set)
    except (OSError, ValueError) as exc:
        fail(f"HEADSET: {exc}")
    cards = load_cards(head_set)
    if cards is None or embeddings is not None:
        if embeddings is None:
            fail(f"{head_set} has no head cards yet: give --embeddings (the pairs to read them off)")
        try:
            data = EmbeddingSet(embeddings)
            chosen, rejected = data.load()
            save_cards(head_set, head_cards(heads, chosen, rejected, data.pairs()))
        except (OSError, ValueError) as exc:
            fail(f"--embeddings: {exc}")
        cards = load_cards(head_set)
    typer.echo(f"{heads.name}@{heads.version}: {heads.num_heads} heads ({heads.kind}, {heads.backbone})")
    if head is None:
        width = max(map(len, cards))
        for card in cards.values():
            typer.echo(f"  {card.head:<{width}}  {card.summary}")
        return
    chosen_heads = [c for c in cards.values() if c.head in (head, f"+{head}", f"-{head}")]
    if not chosen_heads:
        fail(f"--head: no head {head!r} in {heads.name}@{heads.version}; heads: {', '.join(list(cards)[:12])}, ...")
    for card in chosen_heads:
        typer.echo(f"\n{card.head}: {card.summary}")
        if card.explained_variance_ratio is not None:
            typer.echo(f"  explained variance  {100 * card.explained_variance_ratio:.2f}%")
        if card.correlations:
            typer.echo("  attributes          " + ", ".join(f"{c['attribute']} {c['r']:+.2f}"
                                                           for c in card.correlations[:5]))
        if card.groups:
            typer.echo("  groups (mean margin, sd)  " + ", ".join(f"{g['group']} {g['mean_margin_sd']:+.2f}"
                                                                 for g in card.groups))
        for title, examples in (("scores highest", card.highest), ("scores lowest", card.lowest)):
            typer.echo(f"  {title}:")
            for e in examples:
                typer.echo(f"    {e['margin']:+.3f}  prompt: {e['prompt']}\n"
                           f"            chosen: {e['chosen']}\n            rejected: {e['rejected']}")
