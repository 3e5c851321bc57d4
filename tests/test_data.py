"""Loaders on the real files in ../shared, TRL formats, errors that name file/row/field, splits, synthetic truth."""
from __future__ import annotations

import dataclasses
import gzip
import json

import numpy as np
import pytest
from rewardprism.data import (
    SPLIT_RULE,
    DataError,
    PreferencePair,
    load_pairs,
    normalized_prompt,
    render,
    save_pairs,
    split_by_prompt,
    split_record,
)
from rewardprism.synthetic import ATTRIBUTES, DEFAULT_USERS, SyntheticGenerator, rating_matrix


def test_hh_rlhf_splits_shared_prompt_from_final_turn(shared_data):
    path = shared_data / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    with pytest.raises(DataError, match=r"row 1254, field 'rejected'"):
        load_pairs(path)  # the real file has malformed rows; strict by default
    pairs = load_pairs(path, group="harmless", skip_bad_rows=True)
    assert len(pairs) == 2312 - 5
    with gzip.open(path, "rt") as f:
        raw = json.loads(f.readline())
    first = pairs[0]
    assert isinstance(first.prompt, list) and first.prompt[0]["role"] == "user"
    assert first.prompt[-1]["role"] == "user"  # the prompt ends where the compared Assistant turn starts
    assert raw["chosen"].rstrip().endswith(first.chosen.strip()) and raw["rejected"].rstrip().endswith(
        first.rejected.strip())
    assert first.chosen != first.rejected and first.group == "harmless"


@pytest.mark.parametrize("judge", ["alpaca_eval_gpt4", "weighted_alpaca_eval_gpt4_turbo"])
def test_alpaca_eval_preferences_ties_groups_annotators(shared_data, judge):
    path = shared_data / "alpaca_eval" / judge / "alpaca-7b.json.gz"
    with gzip.open(path, "rt") as f:
        raw = json.load(f)
    decided = [r for r in raw if r["preference"] not in (None, 0, 1.5)]
    pairs = load_pairs(path)
    assert len(pairs) == len(decided) < len(raw)
    for rec, pair in zip(decided, pairs):
        winner, loser = ("output_1", "output_2") if rec["preference"] < 1.5 else ("output_2", "output_1")
        assert (pair.chosen, pair.rejected) == (rec[winner], rec[loser])
        assert pair.group == rec["dataset"] and pair.annotator == rec["annotator"] == judge
        assert 0.5 < pair.weight <= 1.0
    assert {p.group for p in pairs} == {"helpful_base", "koala", "oasst", "selfinstruct", "vicuna"}
    if judge.startswith("weighted"):
        assert any(p.weight < 1.0 for p in pairs)  # soft labels keep their confidence


def test_folder_of_files_and_limit(shared_data):
    folder = shared_data / "alpaca_eval" / "alpaca_eval_gpt4"
    assert len(load_pairs(folder, limit=1000)) == 1000


def test_trl_standard_and_conversational_formats(tmp_path):
    rows = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "assistant", "content": "go away"}]},
        {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
         "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]},
    ]
    path = tmp_path / "trl.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    a, b, c = load_pairs(path)
    assert (a.prompt, a.chosen, a.rejected) == ("2+2?", "4", "5")
    assert b.prompt == [{"role": "user", "content": "hi"}] and (b.chosen, b.rejected) == ("hello", "go away")
    assert c.prompt == [{"role": "user", "content": "q"}] and (c.chosen, c.rejected) == ("good", "bad")
    # the same rows as parquet
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "trl.parquet")
    assert load_pairs(tmp_path / "trl.parquet") == [a]


def test_canonical_roundtrip(tmp_path):
    pairs = SyntheticGenerator(3).dataset(5)
    assert load_pairs(save_pairs(pairs, tmp_path / "p.jsonl.gz")) == pairs


@pytest.mark.parametrize("line, match", [
    ('{"prompt": "x", "chosen": 3, "rejected": "b"}', r"row 1, field 'chosen': must be a string"),
    ('{"prompt": "x", "chosen": "a"}', r"row 1, field 'rejected': missing"),
    ('{"prompt": "x", "chosen": "a", "rejected": "b", "weight": -1}', r"row 1, field 'weight'"),
    ('{"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}', r"row 1, field 'prompt'"),
    ('{"prompt": "x", "chosen": "a", "rejected": "b", "group": 1}', r"row 1, field 'group': must be a string"),
    ('{"prompt": "x", "chosen": "a", "rejected": "b", "attributes": {"score": 3}}', r"row 1, field 'attributes'"),
    ('{"prompt": "x", "chosen": "a", "rejected": "b", "attributes": {"chosen": {"help": 1}, '
     '"rejected": {"harm": 0}}}', r"row 1, field 'attributes': .* with the same names"),
    ('{"text": "no pair here"}', r"row 1: unrecognized record"),
    ("{not json", r"row 1: invalid JSON"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    with pytest.raises(DataError, match=match) as info:
        load_pairs(path)
    assert str(path) in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported format"):
        load_pairs(tmp_path / "x.csv")


def test_render_plain_and_chat_template():
    assert render("Q", "A") == "Q\n\nA"  # the DRM reference's text format
    chat = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    assert render(chat, "A2") == "Human: Q\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant: A2"

    class Templated:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize):
            return "|".join(f"<{m['role']}>{m['content']}" for m in messages)

    assert render("Q", "A", Templated()) == "<user>Q|<assistant>A"


def test_split_by_prompt_is_deterministic_and_disjoint():
    pairs = SyntheticGenerator(0).dataset(100)
    train, test = split_by_prompt(pairs, 0.5, seed=0)
    assert sorted(train + test) == list(range(len(pairs)))
    assert not {pairs[i].prompt_key for i in train} & {pairs[i].prompt_key for i in test}
    assert (train, test) == split_by_prompt(pairs, 0.5, seed=0)
    assert test != split_by_prompt(pairs, 0.5, seed=1)[1]
    assert abs(len({pairs[i].prompt_key for i in test}) / len({p.prompt_key for p in pairs}) - 0.5) < 0.15


def test_split_by_prompt_depends_on_the_prompt_alone():
    """Two folders with the same prompts in another order, each dropping other rows (ties, missing labels), and
    one writing the prompts with other spacing, put every shared prompt on the same side (issue 19)."""
    pairs = SyntheticGenerator(0).dataset(200)
    first = [p for i, p in enumerate(pairs) if i % 7 != 3]
    gone = {p.prompt for p in pairs[:6]}  # prompts the second folder lost every row of
    second = [dataclasses.replace(p, prompt="  " + p.prompt.replace(" ", "   ") + "\n")
              for i, p in enumerate(reversed(pairs)) if i % 5 != 1 and p.prompt not in gone]
    sides = []
    for folder in (first, second):
        train, test = split_by_prompt(folder, 0.5, seed=3)
        sides.append({normalized_prompt(folder[i].prompt): i in set(test) for i in train + test})
    shared = sides[0].keys() & sides[1].keys()
    assert len(shared) > 100 and len(sides[0]) > len(sides[1]) and len(first) != len(second)
    assert all(sides[0][k] == sides[1][k] for k in shared)
    assert any(sides[0].values()) and not all(sides[0].values())
    # chat messages: canonical JSON, so key order and spacing do not matter either
    chat = [PreferencePair([{"role": "user", "content": f"q {i}"}], "a", "b") for i in range(40)]
    respaced = [PreferencePair([{"content": f" q  {i} ", "role": "user"}], "a", "b") for i in range(40)]
    assert split_by_prompt(chat, 0.3, 1) == split_by_prompt(respaced, 0.3, 1)
    assert split_record(0.3, 1) == {"rule": SPLIT_RULE, "seed": 1, "test_fraction": 0.3}


def test_synthetic_ground_truth_matches_text_and_labels():
    gen = SyntheticGenerator(seed=7)
    pairs = gen.dataset(400)
    assert pairs == SyntheticGenerator(seed=7).dataset(400)  # deterministic
    chosen, rejected = rating_matrix(pairs, "chosen"), rating_matrix(pairs, "rejected")
    # recorded ratings are what the text shows
    for pair, ratings in zip(pairs, chosen):
        r = dict(zip(ATTRIBUTES, ratings))
        assert ("can't help" in pair.chosen or "not able to" in pair.chosen) == bool(r["refusal"])
        assert ("\n- " in pair.chosen) == bool(r["lists"])
    # each simulated user's labels follow its own utility, and users disagree with each other
    agreement = {}
    for user in DEFAULT_USERS:
        rows = [i for i, p in enumerate(pairs) if p.group == user.name]
        margin = user.utility(chosen[rows]) - user.utility(rejected[rows])
        agreement[user.name] = float(np.mean(margin > 0))
        assert agreement[user.name] > 0.8
    majority = DEFAULT_USERS[0]
    concise_rows = [i for i, p in enumerate(pairs) if p.group == "concise"]
    assert np.mean(majority.utility(chosen[concise_rows]) > majority.utility(rejected[concise_rows])) < 0.6
    assert isinstance(pairs[0], PreferencePair) and set(pairs[0].attributes) == {"chosen", "rejected"}
