"""The VRM / BT model: loss terms against direct formulas, KL closed forms, special cases, export round trips."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from rewardprism.backbone import load_backbone
from rewardprism.config import ConfigError
from rewardprism.heads import HeadSet
from rewardprism.synthetic import ATTRIBUTES, SyntheticGenerator
from rewardprism.train_data import PairCollator
from rewardprism.vrm import (
    RewardModel,
    RewardModelConfig,
    bt_loss,
    center_loss,
    dirichlet_kl,
    gaussian_kl,
    supervision_loss,
)
from torch.distributions import Dirichlet, Normal, kl_divergence


def make_model(kind: str = "vrm", spec: str = "tiny-bert", padding_side: str = "right", **overrides) -> RewardModel:
    torch.manual_seed(0)
    config = RewardModelConfig(kind=kind, backbone=spec, max_length=64, num_objectives=len(ATTRIBUTES),
                               objective_names=list(ATTRIBUTES), latent_dim=4, **overrides)
    return RewardModel(config, load_backbone(spec, device="cpu", max_length=64, padding_side=padding_side))


def make_batch(model: RewardModel, n: int = 6) -> dict[str, torch.Tensor]:
    pairs = SyntheticGenerator(3).dataset(2)[:n]
    targets = np.array([[[p.attributes[s][a] for a in ATTRIBUTES] for s in ("chosen", "rejected")] for p in pairs],
                       dtype=np.float32)
    rows = {"pair": np.array([json.dumps(p.to_row()) for p in pairs], dtype=object), "targets": targets}
    return PairCollator(model.backbone, model.is_vrm, model.config.prompt_max_length)(rows)


# ----------------------------------------------------------------------------------------------- loss terms

def test_bt_loss_is_the_bradley_terry_negative_log_likelihood():
    rc, rr = torch.tensor([2.0, -1.0, 0.3]), torch.tensor([0.5, 1.0, 0.3])
    direct = [-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in zip(rc.tolist(), rr.tolist())]
    assert bt_loss(rc, rr).item() == pytest.approx(np.mean(direct), rel=1e-6)
    w = torch.tensor([1.0, 0.5, 2.0])
    assert bt_loss(rc, rr, w).item() == pytest.approx(np.dot(w.numpy(), direct) / 3.5, rel=1e-6)


def test_center_loss_is_trl_mean_squared_sum():
    rc, rr = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 3.0])
    assert center_loss(rc, rr).item() == pytest.approx(((2.5 ** 2) + (2.0 ** 2)) / 2)


def test_dirichlet_kl_matches_torch_and_monte_carlo():
    torch.manual_seed(0)
    alpha = torch.rand(5, 4) * 3 + 0.2
    prior = torch.full((4,), 1.3)
    closed = dirichlet_kl(alpha, prior)
    torch.testing.assert_close(closed, kl_divergence(Dirichlet(alpha), Dirichlet(prior.expand(5, 4))))
    q, p = Dirichlet(alpha[0]), Dirichlet(prior)
    w = q.sample((200_000,))
    mc = (q.log_prob(w) - p.log_prob(w)).mean()
    assert closed[0].item() == pytest.approx(mc.item(), abs=0.02)
    assert dirichlet_kl(prior[None], prior).item() == pytest.approx(0.0, abs=1e-6)


def test_gaussian_kl_matches_torch_and_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(3, 5), torch.randn(3, 5)
    closed = gaussian_kl(mu, logvar)
    q = Normal(mu, (0.5 * logvar).exp())
    torch.testing.assert_close(closed, kl_divergence(q, Normal(0.0, 1.0)).sum(-1))
    z = q.sample((100_000,))  # (S, 3, 5)
    mc = (q.log_prob(z) - Normal(0.0, 1.0).log_prob(z)).sum(-1).mean(0)
    torch.testing.assert_close(closed, mc, atol=0.05, rtol=0.02)
    assert gaussian_kl(torch.zeros(1, 5), torch.zeros(1, 5)).item() == 0.0


def test_supervision_losses_match_direct_formulas():
    s, t = torch.tensor([[0.5, -1.0], [2.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.25, 0.5]])
    assert supervision_loss(s, t, "mse").item() == pytest.approx(((s - t) ** 2).mean().item())
    p = torch.sigmoid(s)
    ce = -(t * p.log() + (1 - t) * (1 - p).log()).mean()
    assert supervision_loss(s, t, "ce").item() == pytest.approx(ce.item(), rel=1e-6)
    with pytest.raises(ValueError, match="mse"):
        supervision_loss(s, t, "hinge")


# ----------------------------------------------------------------------------------------------- the model

def test_vrm_loss_is_the_sum_of_its_terms():
    model = make_model(beta_w=0.3, beta_z=0.2, lam=0.7, center_coef=0.1).train()
    out = model(**make_batch(model))
    expected = out["bt"] + 0.1 * out["center"] + 0.3 * out["kl_w"] + 0.2 * out["kl_z"] + 0.7 * out["sup"]
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(out["bt"], bt_loss(out["rewards_chosen"], out["rewards_rejected"]))


def test_vrm_eval_uses_posterior_means_and_one_weight_per_pair():
    """Direct formula: r = E[w | x] · (A (W_μ h + b_μ) + b), the same E[w] for both responses of a pair."""
    model = make_model().eval()
    batch = make_batch(model)
    with torch.no_grad():
        out = model(**batch)
        h = model.backbone(batch["input_ids"], batch["attention_mask"])  # (2B, d)
        hx = model.backbone(batch["prompt_ids"], batch["prompt_mask"])  # (B, d)
        alpha = torch.nn.functional.softplus(hx @ model.heads["weight"].weight.T + model.heads["weight"].bias) + 1e-3
        w = alpha / alpha.sum(-1, keepdim=True)
        mu = h @ model.heads["mu"].weight.T + model.heads["mu"].bias
        s = mu @ model.heads["score"].weight.T + model.heads["score"].bias  # (2B, K)
        r = (s * torch.cat([w, w])).sum(-1)
    torch.testing.assert_close(torch.cat([out["rewards_chosen"], out["rewards_rejected"]]), r)


def test_lambda_zero_ignores_targets():
    model = make_model(lam=0.0).train()
    batch = make_batch(model)
    no_targets = {k: v for k, v in batch.items() if k != "targets"}
    losses, grads = [], []
    for inputs in (batch, no_targets):
        torch.manual_seed(1)
        model.zero_grad()
        out = model(**inputs)
        out["loss"].backward()
        assert "sup" not in out
        losses.append(out["loss"].detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.heads.parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])


def test_supervision_pulls_scores_toward_targets():
    """λ > 0: a few head-only steps lower the supervision loss; λ = 0 leaves it where it was."""
    results = {}
    for lam in (0.0, 5.0):
        model = make_model(lam=lam, freeze_backbone=True).train()
        batch = make_batch(model)
        optimizer = torch.optim.Adam(model.heads.parameters(), lr=3e-2)
        torch.manual_seed(0)
        first = None
        for _ in range(30):
            optimizer.zero_grad()
            out = model(**batch)
            out["loss"].backward()
            optimizer.step()
            model.eval()
            with torch.no_grad():
                s = model.objective_scores(model.backbone(batch["input_ids"], batch["attention_mask"]))
            model.train()
            sup = supervision_loss(s, batch["targets"], "mse").item()
            first = sup if first is None else first
        results[lam] = (first, sup)
    assert results[5.0][1] < 0.5 * results[5.0][0]
    assert results[0.0][1] > results[5.0][1]


def test_beta_zero_leaves_bt_alone():
    """β_w = β_z = λ = 0: the loss is exactly the BT term, KL terms are reported but not added."""
    model = make_model(beta_w=0.0, beta_z=0.0).train()
    out = model(**make_batch(model))
    assert out["kl_w"].item() > 0 and out["kl_z"].item() > 0
    torch.testing.assert_close(out["loss"], out["bt"])


def test_bt_model_is_a_scalar_head_with_trl_loss():
    model = make_model("bt", center_coef=0.01).eval()  # no dropout: the direct pass below sees the same net
    batch = make_batch(model)
    assert "prompt_ids" not in batch
    out = model(**batch)
    with torch.no_grad():
        h = model.backbone(batch["input_ids"], batch["attention_mask"])
    r = (h @ model.heads["score"].weight.T + model.heads["score"].bias).squeeze(-1)
    rc, rr = r.chunk(2)
    torch.testing.assert_close(out["loss"], bt_loss(rc, rr) + 0.01 * center_loss(rc, rr), rtol=1e-5, atol=1e-6)


def test_vrm_without_prompts_says_what_it_needs():
    model = make_model()
    batch = {k: v for k, v in make_batch(model).items() if not k.startswith("prompt")}
    with pytest.raises(ValueError, match="prompt_ids"):
        model(**batch)


# ----------------------------------------------------------------------------------------------- export

@pytest.mark.parametrize("kind,spec,padding_side", [("vrm", "tiny-bert", "right"), ("vrm", "tiny-llama", "left"),
                                                    ("bt", "tiny-llama", "right")])
def test_export_reload_gives_identical_scores(tmp_path, kind, spec, padding_side):
    model = make_model(kind, spec, padding_side).eval()
    model.default_weights.copy_(torch.linspace(1, 2, len(model.default_weights)) / 10)
    batch = make_batch(model)
    with torch.no_grad():
        before = model(**batch)
    model.save_pretrained(tmp_path / "m")
    again = RewardModel.from_pretrained(tmp_path / "m", device="cpu")
    assert again.config == model.config and again.backbone.pooling == model.backbone.pooling
    batch_again = make_batch(again)  # the saved tokenizer produces the same tensors
    for key in batch:
        torch.testing.assert_close(batch_again[key], batch[key])
    with torch.no_grad():
        after = again(**batch_again)
    for key in ("rewards_chosen", "rewards_rejected", "loss"):
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    torch.testing.assert_close(again.default_weights, model.default_weights)


def test_a_bf16_model_scores_pairs_as_its_float32_self(tmp_path):
    """bf16 is what `from_pretrained` gives on CUDA; the extractor's features are float32 whatever the model."""
    from rewardprism.train_eval import score_pairs

    make_model().save_pretrained(tmp_path / "m")
    pairs = SyntheticGenerator(0).dataset(2)
    full = score_pairs(RewardModel.from_pretrained(tmp_path / "m", device="cpu"), pairs)
    half = score_pairs(RewardModel.from_pretrained(tmp_path / "m", device="cpu", dtype=torch.bfloat16), pairs)
    assert half.chosen.dtype == np.float32 and half.margins.shape == (len(pairs),)
    np.testing.assert_allclose(half.margins, full.margins, atol=0.05 * np.abs(full.margins).max())


@pytest.mark.parametrize("kind", ["vrm", "bt"])
def test_head_set_scores_equal_model_scores(tmp_path, kind):
    model = make_model(kind).eval()
    folder = model.save_pretrained(tmp_path / "m")
    heads = model.to_head_set(str(folder), name="t", dataset="synthetic")
    assert heads.kind == kind and heads.backbone == str(folder)
    assert heads.head_names == (list(ATTRIBUTES) if kind == "vrm" else ["reward"])
    np.testing.assert_allclose(heads.default_weights, model.default_weights.numpy())
    heads = HeadSet.load(heads.save(tmp_path / "heads"))
    # The exported folder's backbone, loaded as serving loads it, gives the same features and scores.
    served = heads.feature_spec().load_backbone(device="cpu")
    texts = ["Any tips for brewing coffee at home?\n\nCertainly. Start with good timing.", "short"]
    features = served.encode(texts)
    with torch.no_grad():
        expected = model.objective_scores(model.backbone.encode(texts)).numpy()
    np.testing.assert_allclose(heads.scores(features.numpy()), expected, rtol=1e-5, atol=1e-5)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="^kind: must be 'vrm' or 'bt'"):
        RewardModelConfig(kind="drm")
    with pytest.raises(ConfigError, match="^lam: a BT model has no objectives"):
        RewardModelConfig(kind="bt", lam=1.0)
    with pytest.raises(ConfigError, match="^objective_names: has 2 names for num_objectives=3"):
        RewardModelConfig(num_objectives=3, objective_names=["a", "b"])
    with pytest.raises(ConfigError, match="^beta_z: must be >= 0"):
        RewardModelConfig(beta_z=-1.0)
    with pytest.raises(FileNotFoundError, match="not a reward model folder"):
        RewardModel.from_pretrained("/nonexistent")


def test_frozen_backbone_is_a_fixed_feature_map():
    model = make_model(freeze_backbone=True).train()
    assert model.training and model.heads.training and not model.backbone.training  # no dropout on features
    out = model(**make_batch(model))
    out["loss"].backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.heads.parameters())
