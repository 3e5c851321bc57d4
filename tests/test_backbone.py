"""Pooling reads the real tokens whatever the padding side, and a batched forward equals unbatched ones."""
from __future__ import annotations

import pytest
import torch
from rewardprism.backbone import load_backbone, pool
from rewardprism.embed import EmbeddingExtractor

TEXTS = ["a short one", "a considerably longer text that needs many more tokens than the first", "mid size text"]


def test_pool_last_and_mean_on_hand_made_states():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)  # (B, T, d) = value of its position
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool(hidden, right, "last").flatten().tolist() == [1.0, 7.0]
    assert pool(hidden, left, "last").flatten().tolist() == [3.0, 7.0]
    assert pool(hidden, right, "mean").flatten().tolist() == [0.5, 5.5]


@pytest.mark.parametrize("spec, pooling", [("tiny-llama", "last"), ("tiny-bert", "mean"), ("minilm", "mean")])
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_equals_unbatched(spec, pooling, side):
    backbone = load_backbone(spec, device="cpu", padding_side=side)
    assert backbone.pooling == pooling
    single = torch.cat([backbone.encode([t]) for t in TEXTS])
    batched = backbone.encode(TEXTS)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    # the extractor's own padding (length-sorted, manual pad) gives the same features in input order
    feats, tokens = EmbeddingExtractor(backbone, token_budget=64, max_batch=2).embed_texts(TEXTS)
    torch.testing.assert_close(torch.from_numpy(feats), single, atol=1e-5, rtol=1e-4)
    assert tokens == sum(len(ids) for ids in backbone.tokenizer(TEXTS)["input_ids"])


def test_decoder_reads_the_last_real_token_not_padding():
    backbone = load_backbone("tiny-llama", device="cpu", padding_side="right")
    out = backbone.model(**backbone.tokenize(TEXTS)).last_hidden_state
    mask = backbone.tokenize(TEXTS)["attention_mask"]
    features = backbone.encode(TEXTS)
    for i, length in enumerate(mask.sum(1).tolist()):
        torch.testing.assert_close(features[i], out[i, length - 1])
        if length < mask.shape[1]:
            assert not torch.allclose(features[i], out[i, -1])


def test_smollm2_from_gguf_is_a_decoder_with_chat_template():
    backbone = load_backbone("smollm2", device="cpu")
    assert backbone.pooling == "last" and backbone.dim == 576 and backbone.tokenizer.chat_template
    left = load_backbone("smollm2", device="cpu", padding_side="left")
    torch.testing.assert_close(backbone.encode(TEXTS[:2]), left.encode(TEXTS[:2]), atol=1e-4, rtol=1e-3)


def test_unknown_backbone_errors_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_backbone(str(tmp_path / "nope.gguf"))
    with pytest.raises(OSError):
        load_backbone(str(tmp_path / "missing-folder"))
