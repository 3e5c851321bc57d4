"""Head cards read off the pairs a head set was fitted on: on synthetic data with planted directions, each leading
head's card names the attribute it was planted from; decompose writes them, `heads show` and `users show` read
them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from rewardprism.cards import head_cards, load_cards
from rewardprism.cli import app
from rewardprism.drm import PreferenceDecomposition, build_head_set, fit_population_head
from test_evaluate import LINEAR, linear_synthetic, write_embedding_folder
from typer.testing import CliRunner

runner = CliRunner()


def test_cards_name_the_planted_attributes_and_show_extreme_pairs() -> None:
    data = linear_synthetic(per_user=60)
    heads = build_head_set(PreferenceDecomposition(6).fit(data.chosen, data.rejected),
                           fit_population_head(data.chosen, data.rejected), features=LINEAR)
    cards = {c.head: c for c in head_cards(heads, data.chosen, data.rejected, data.pairs, excerpt=40)}
    assert set(cards) == set(heads.head_names)
    # every planted direction is some PC: each of the 6 leading ±pc heads correlates strongly with an attribute
    strongest = [abs(cards[f"+pc{k}"].correlations[0]["r"]) for k in range(6)]
    assert min(strongest) > 0.5, strongest
    plus, minus = cards["+pc0"], cards["-pc0"]
    assert plus.correlations[0]["attribute"] == minus.correlations[0]["attribute"]
    assert plus.correlations[0]["r"] == -minus.correlations[0]["r"]  # mirrored heads, mirrored cards
    assert plus.explained_variance_ratio == heads.info["explained_variance_ratio"][0]
    assert "% of variance" in plus.summary and plus.correlations[0]["attribute"] in plus.summary
    margins = [e["margin"] for e in plus.highest + plus.lowest]
    assert margins[:3] == sorted(margins[:3], reverse=True) and margins[0] > margins[-1]
    assert all(len(e[k]) <= 40 for e in plus.highest for k in ("prompt", "chosen", "rejected"))
    assert [g["group"] for g in plus.groups] == [g["group"] for g in minus.groups][::-1]


def test_decompose_writes_cards_that_heads_show_and_users_show_read(tmp_path: Path) -> None:
    write_embedding_folder(tmp_path / "emb", linear_synthetic(per_user=40))
    ok = runner.invoke(app, ["decompose", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "h"),
                             "--components", "4", "--no-calibrate", "--version", "1"])
    assert ok.exit_code == 0, ok.output
    cards = load_cards(tmp_path / "h")
    assert cards is not None and len(cards) == 9
    listing = runner.invoke(app, ["heads", "show", str(tmp_path / "h")]).output
    assert all(f"{head}  " in listing or f"{head} " in listing for head in cards) and "% of variance" in listing
    one = runner.invoke(app, ["heads", "show", str(tmp_path / "h"), "--head", "pc1"])
    assert one.exit_code == 0 and "+pc1: " in one.output and "-pc1: " in one.output and "scores lowest" in one.output
    missing = runner.invoke(app, ["heads", "show", str(tmp_path / "h"), "--head", "pc99"])
    assert missing.exit_code == 2 and "no head 'pc99'" in missing.output

    url = f"sqlite:///{tmp_path / 'c.db'}"
    for args in (["db", "upgrade"], ["models", "register", str(tmp_path / "h"), "--activate"],
                 ["users", "create", "carol"], ["users", "set-weights", "carol", json.dumps({"-pc1": 0.5})]):
        result = runner.invoke(app, [args[0], "--database-url", url, *args[1:]])
        assert result.exit_code == 0, result.output
    shown = runner.invoke(app, ["users", "show", "carol", "--database-url", url]).output
    line = next(line for line in shown.splitlines() if line.strip().startswith("pc1"))
    assert "-0.5000" in line and f"-pc1: {cards['-pc1'].summary}" in line


def test_a_head_set_without_cards_gets_them_from_embeddings(tmp_path: Path) -> None:
    write_embedding_folder(tmp_path / "emb", linear_synthetic(per_user=30))
    runner.invoke(app, ["decompose", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "h"),
                        "--components", "3", "--no-calibrate"])
    (tmp_path / "h" / "cards.json").unlink()
    refused = runner.invoke(app, ["heads", "show", str(tmp_path / "h")])
    assert refused.exit_code == 2 and "--embeddings" in refused.output
    made = runner.invoke(app, ["heads", "show", str(tmp_path / "h"), "--embeddings", str(tmp_path / "emb")])
    assert made.exit_code == 0 and (tmp_path / "h" / "cards.json").is_file() and np.isfinite(
        [c.explained_variance_ratio or 0 for c in load_cards(tmp_path / "h").values()]).all()
