"""The feature spec: recorded where features are made, carried and hashed by the head set, enforced where they
are used. That the service scores with it is tested over HTTP in test_serve.py."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from head_sets_for_tests import made_up_features
from rewardprism.backbone import load_backbone
from rewardprism.cli import app
from rewardprism.data import PreferencePair
from rewardprism.embed import INDEX, EmbeddingSet, embed_pairs
from rewardprism.features import FeatureMismatch, FeatureSpec
from rewardprism.heads import META, HeadSet
from rewardprism.vrm import RewardModel, RewardModelConfig
from typer.testing import CliRunner


def pairs(n: int = 24) -> list[PreferencePair]:
    return [PreferencePair(f"prompt {i}", f"good answer {i} " * 10 + "fine", f"bad answer {i} " * 10 + "poor",
                           group=f"g{i % 2}") for i in range(n)]


def head_set(features: FeatureSpec | None) -> HeadSet:
    rng = np.random.default_rng(0)
    return HeadSet(rng.normal(size=(3, 8)), np.zeros(3), ["a", "b", "c"], "drm", "tiny-bert", np.ones(3),
                   features=features)


def test_the_spec_is_covered_by_the_content_hash_and_saved_with_the_head_set(tmp_path):
    spec = made_up_features("tiny-bert", 16)
    heads = head_set(spec)
    assert heads.content_hash != head_set(replace(spec, max_length=17)).content_hash
    assert heads.content_hash != head_set(replace(spec, truncation_side="left")).content_hash
    loaded = HeadSet.load(heads.save(tmp_path / "h"))
    assert loaded.features == spec and loaded.feature_spec() == spec and loaded.content_hash == heads.content_hash
    with pytest.raises(ValueError, match="feature spec is over 'minilm'"):
        head_set(replace(spec, backbone="minilm"))
    with pytest.raises(ValueError, match="invalid truncation_side"):
        replace(spec, truncation_side="middle")
    with pytest.raises(ValueError, match="exactly the fields"):
        FeatureSpec.from_dict({**spec.to_dict(), "extra": 1})


def test_a_head_set_saved_before_specs_keeps_its_hash_and_is_refused_where_it_scores(tmp_path):
    folder = head_set(None).save(tmp_path / "old")
    meta = json.loads((folder / META).read_text())
    del meta["features"]  # as written before specs existed
    (folder / META).write_text(json.dumps(meta))
    old = HeadSet.load(folder)  # its recorded hash still verifies
    assert old.features is None and old.content_hash == meta["content_hash"]
    with pytest.raises(FeatureMismatch, match="rewardprism decompose"):
        old.feature_spec()


def test_an_old_vrm_export_takes_its_recorded_values_from_the_model_folder(tmp_path):
    config = RewardModelConfig(kind="vrm", backbone="tiny-bert", max_length=24, num_objectives=2, latent_dim=3)
    folder = RewardModel(config, load_backbone("tiny-bert", device="cpu", max_length=24)).save_pretrained(
        tmp_path / "m")
    exported = RewardModel.from_pretrained(folder, device="cpu").to_head_set(str(folder))
    old = replace(exported, features=None)  # what an export made before specs holds
    assert old.feature_spec() == exported.feature_spec() == FeatureSpec(str(folder), 24, "left", "mean", "joiner")


def test_embedding_folders_record_the_spec_and_the_cli_refuses_other_features(tmp_path):
    data = pairs()
    for length in (16, 32):
        embed_pairs(data, load_backbone("tiny-bert", device="cpu", max_length=length), tmp_path / f"e{length}",
                    shard_size=10, progress=False)
    assert EmbeddingSet(tmp_path / "e16").features == FeatureSpec("tiny-bert", 16, "right", "mean", "joiner")
    runner = CliRunner()
    made = runner.invoke(app, ["decompose", "--embeddings", str(tmp_path / "e16"), "--out", str(tmp_path / "h"),
                               "--components", "2", "--split", "all", "--no-calibrate"])
    assert made.exit_code == 0, made.output
    assert HeadSet.load(tmp_path / "h").feature_spec() == EmbeddingSet(tmp_path / "e16").features
    refused = runner.invoke(app, ["evaluate", "--embeddings", str(tmp_path / "e32"), "--heads", str(tmp_path / "h")])
    assert refused.exit_code == 2 and "--embeddings" in refused.output and "16 tokens" in refused.output
    # a folder written before specs were recorded is refused saying what to do; embedding again reuses its shards
    index = json.loads((tmp_path / "e16" / INDEX).read_text())
    del index["features"]
    (tmp_path / "e16" / INDEX).write_text(json.dumps(index))
    with pytest.raises(FeatureMismatch, match="rewardprism embed"):
        assert EmbeddingSet(tmp_path / "e16").features is None  # never reached: refused
    again = embed_pairs(data, load_backbone("tiny-bert", device="cpu", max_length=16), tmp_path / "e16",
                        shard_size=10, progress=False)
    assert again.shards_reused == 3 and EmbeddingSet(tmp_path / "e16").features.max_length == 16


def test_a_backbone_built_from_a_spec_makes_its_features_or_is_refused():
    spec = FeatureSpec("tiny-llama", 12, "left", "last", "joiner")
    backbone = spec.load_backbone(device="cpu")
    assert FeatureSpec.of(backbone) == spec and backbone.tokenizer.truncation_side == "left"
    ids = backbone.tokenize(["one two three " * 20])["input_ids"][0]
    assert len(ids) == 12 and ids[-1] == backbone.tokenizer.sep_token_id  # the end kept
    with pytest.raises(FeatureMismatch, match="chat_template"):
        replace(spec, rendering="chat_template").load_backbone(device="cpu")
