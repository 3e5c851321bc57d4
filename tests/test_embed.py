"""Token-budget batching, streaming shards that resume, and the Ray Data path giving the same folder."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from rewardprism.backbone import load_backbone
from rewardprism.cli import app
from rewardprism.data import render
from rewardprism.embed import EmbeddingSet, EmbedProgress, embed_pairs, token_budget_batches
from rewardprism.features import FeatureSpec
from rewardprism.sources import size_hint
from rewardprism.synthetic import SyntheticGenerator
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny-bert", device="cpu", max_length=64)


@pytest.fixture(scope="module")
def pairs():
    return SyntheticGenerator(1).dataset(10)  # 40 pairs, 4 groups


def test_token_budget_batches_cover_everything_within_budget():
    lengths = np.random.default_rng(0).integers(1, 300, size=500)
    batches = token_budget_batches(lengths, token_budget=2048, max_batch=32)
    assert sorted(np.concatenate(batches).tolist()) == list(range(500))
    for batch in batches:
        assert len(batch) <= 32 and (len(batch) == 1 or len(batch) * lengths[batch].max() <= 2048)
    longest_first = [lengths[b].max() for b in batches]
    assert longest_first == sorted(longest_first, reverse=True)
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert padded < 1.1 * lengths.sum()  # sorting keeps padding small


def test_embed_pairs_matches_direct_encoding_and_resumes(tmp_path, tiny, pairs):
    report = embed_pairs(pairs, tiny, tmp_path, shard_size=16, token_budget=256, progress=False)
    assert (report.n_pairs, report.shards_written, report.shards_reused) == (40, 3, 0)
    emb = EmbeddingSet(tmp_path)
    chosen, rejected = emb.load()
    assert chosen.shape == rejected.shape == (40, tiny.dim) and len(emb) == 40 and emb.backbone == "tiny-bert"
    direct = tiny.encode([render(p.prompt, p.chosen, tiny.tokenizer) for p in pairs[:5]]).numpy()
    np.testing.assert_allclose(chosen[:5], direct, atol=1e-5)
    assert emb.pairs() == pairs
    assert [len(c) for c, _ in emb.shards()] == [16, 16, 8]

    # an unchanged rerun reuses every shard; changing one pair rewrites only its shard
    again = embed_pairs(pairs, tiny, tmp_path, shard_size=16, progress=False)
    assert (again.shards_written, again.shards_reused, again.tokens) == (0, 3, 0)
    edited = list(pairs)
    edited[20] = dataclasses.replace(edited[20], chosen="something else entirely")
    third = embed_pairs(edited, tiny, tmp_path, shard_size=16, progress=False)
    assert (third.shards_written, third.shards_reused) == (1, 2)
    new_chosen, _ = EmbeddingSet(tmp_path).load()
    assert not np.allclose(new_chosen[20], chosen[20]) and np.allclose(new_chosen[:16], chosen[:16])


def test_interrupted_run_resumes_from_finished_shards(tmp_path, tiny, pairs):
    def failing_stream():
        yield from pairs[:32]
        raise KeyboardInterrupt  # the job dies after two full shards were written

    with pytest.raises(KeyboardInterrupt):
        embed_pairs(failing_stream(), tiny, tmp_path, shard_size=16, progress=False)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["n_pairs"] == 32 and not list(tmp_path.glob(".*.tmp*safetensors"))
    report = embed_pairs(pairs, tiny, tmp_path, shard_size=16, progress=False)
    assert (report.shards_reused, report.shards_written, report.n_pairs) == (2, 1, 40)

    # other pairs into the same folder, interrupted: its pairs file is gone with the first shard it replaced,
    # so the folder is not read as the old pairs over new features; a rerun completes it
    others = SyntheticGenerator(2).dataset(10)

    def failing_others():
        yield from others[:16]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_pairs(failing_others(), tiny, tmp_path, shard_size=16, progress=False)
    with pytest.raises(ValueError, match="did not finish"):
        EmbeddingSet(tmp_path).pairs()
    embed_pairs(others, tiny, tmp_path, shard_size=16, progress=False)
    assert EmbeddingSet(tmp_path).pairs() == others


def test_ray_data_path_equals_local(tmp_path, ray_cluster, tiny, pairs):
    from rewardprism.embed_ray import embed_pairs_ray

    # chat prompts (the other Ray test has text ones): a list of messages reaches the actors as it left the driver
    pairs = [dataclasses.replace(p, prompt=[{"role": "user", "content": p.prompt}]) for p in pairs]
    local = embed_pairs(pairs, tiny, tmp_path / "local", shard_size=16, progress=False)
    remote = embed_pairs_ray(pairs, FeatureSpec.of(tiny), tmp_path / "ray", dim=tiny.dim, num_actors=2,
                             shard_size=16, shards_per_actor=1, progress=False)  # two windows: 2 shards, then 1
    assert remote.n_pairs == local.n_pairs and remote.shards_written == 3
    index = [json.loads((tmp_path / run / "index.json").read_text()) for run in ("local", "ray")]
    assert index[0] == index[1]
    assert EmbeddingSet(tmp_path / "ray").pairs() == EmbeddingSet(tmp_path / "local").pairs()
    for (c1, r1), (c2, r2) in zip(EmbeddingSet(tmp_path / "local").shards(), EmbeddingSet(tmp_path / "ray").shards()):
        np.testing.assert_allclose(c1, c2, atol=1e-5)
        np.testing.assert_allclose(r1, r2, atol=1e-5)
    # the local path resumes what the Ray path wrote
    assert embed_pairs(pairs, tiny, tmp_path / "ray", shard_size=16, progress=False).shards_reused == 3


def test_ray_driver_reads_one_window_of_pairs_ahead_of_what_it_writes(tmp_path, ray_cluster, tiny, pairs,
                                                                      monkeypatch):
    """The driver draws pairs from the stream a window ahead of the shards it has written, never the whole stream
    (before, it read every pair into its memory, twice, before writing the first shard)."""
    from rewardprism.embed import ShardWriter
    from rewardprism.embed_ray import embed_pairs_ray

    drawn, ahead = [0], []

    def stream():
        for pair in pairs:
            drawn[0] += 1
            yield pair

    write = ShardWriter.write

    def counting_write(self, number, *args):
        ahead.append(drawn[0] - 8 * number)  # pairs drawn beyond the shards before this one
        return write(self, number, *args)

    monkeypatch.setattr(ShardWriter, "write", counting_write)
    embed_pairs_ray(stream(), FeatureSpec.of(tiny), tmp_path, dim=tiny.dim, num_actors=1, shards_per_actor=1,
                    shard_size=8, progress=False)
    assert len(ahead) == 5 and max(ahead) <= 8, ahead  # a window is one shard of 8 pairs


def test_cli_embed_reports_and_names_bad_input(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["embed", "--backbone", "tiny-llama", "--out", str(tmp_path / "e"),
                                 "--synthetic-per-user", "3"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["pairs"] == 12 and set(summary["groups"]) == {"majority", "concise", "playful", "cautious"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": 1}\n')
    result = runner.invoke(app, ["embed", "--backbone", "tiny-llama", "--dataset", str(bad),
                                 "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "row 0, field 'rejected'" in result.output


def test_progress_moves_per_forward_batch_toward_a_known_total(tmp_path, tiny, pairs, monkeypatch):
    """The bar has a total and moves after every forward batch, not once per shard (a 2,000-pair shard on a busy
    machine sat at 0 for 13 minutes), with tokens/s beside it."""
    seen = []
    real = EmbedProgress.batch

    def spy(self, texts, tokens):
        real(self, texts, tokens)
        seen.append((self.bar.n, self.bar.total, self.bar.postfix))
    monkeypatch.setattr(EmbedProgress, "batch", spy)
    embed_pairs(pairs, tiny, tmp_path / "e", shard_size=40, max_batch=8, total=40)
    assert len(seen) == 10  # 80 texts, 8 a batch, one shard
    done = [n for n, _, _ in seen]
    assert done == sorted(done) and 0 < done[0] < done[-1] <= 40 and {t for _, t, _ in seen} == {40}
    assert all("tokens/s" in postfix for _, _, postfix in seen)
    assert size_hint("synthetic", synthetic_per_user=10) == 40 and size_hint("synthetic", limit=7) == 7


def test_cli_embed_checks_its_data_before_loading_a_backbone_and_leaves_nothing_behind(tmp_path, monkeypatch):
    import rewardprism.backbone

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was loaded before the data was checked")
    monkeypatch.setattr(rewardprism.backbone, "load_backbone", no_backbone)
    runner = CliRunner()
    for dataset, message in ((tmp_path / "missing.jsonl", "no such file"), (tmp_path / "empty.jsonl", "no pairs")):
        (tmp_path / "empty.jsonl").write_text("")
        result = runner.invoke(app, ["embed", "--dataset", str(dataset), "--out", str(tmp_path / "out")])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "out").exists()
    monkeypatch.undo()

    # a bad row after the first shard: the shards written stay (a rerun reuses them), no temporary files do;
    # a bad row inside the first shard: the folder this run made is removed
    rows = [json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) for i in range(6)]
    for bad_at, keeps_folder in ((4, True), (1, False)):
        data = tmp_path / f"bad{bad_at}.jsonl"
        data.write_text("\n".join(rows[:bad_at] + ['{"prompt": "p", "chosen": "a", "rejected": 1}'] + rows[bad_at:]))
        out = tmp_path / f"out{bad_at}"
        result = runner.invoke(app, ["embed", "--backbone", "tiny-bert", "--dataset", str(data), "--out", str(out),
                                     "--shard-size", "2"])
        assert result.exit_code == 2 and f"row {bad_at}, field 'rejected'" in result.output, result.output
        assert out.exists() == keeps_folder and not list(tmp_path.rglob(".*.tmp"))
        if keeps_folder:
            assert len(list(out.glob("shard-*.safetensors"))) == 2
