"""Variational reward model (VRM) and its Bradley-Terry (BT) baseline, in one code path.

A backbone reads the prompt x alone, h(x), and the prompt with a response, h(x, y). The VRM adds
- a weight head      q(w | x)    = Dirichlet(α(x)),  α = softplus(linear(h(x))) + ε,  prior Dirichlet(α₀·1);
- a feature head     q(z | x, y) = Normal(μ(h), diag σ²(h)),  μ and log σ² linear in h,  prior Normal(0, I);
- objective scores   s(x, y) = A z + b ∈ ℝᴷ,  and the reward r(x, y) = w · s(x, y),
one w sample shared by the chosen and rejected response of a pair (reparameterized samples in training,
posterior means at inference). Its loss is
    BT(r_chosen − r_rejected) + β_w KL_w + β_z (KL_z,chosen + KL_z,rejected) + λ L_sup.
The BT model is the same module with a scalar head on h(x, y) and the TRL loss (optional reward centering).

Because μ is linear, the K objective scores at the posterior mean are affine in the backbone feature,
s = A(W_μ h + b_μ) + b, so a trained VRM exports as a `HeadSet` like DRM's (`to_head_set`).

References:
- VRM: "Variational Reward Modeling" — latent objective weights (Dirichlet) and semantic features (Gaussian),
  variational inference with reparameterization, a BT contrastive loss and a λ-weighted rating supervision.
  The published paper gives no code; docs/vrm.md says which details are ours.
- TRL `RewardTrainer`: chosen and rejected in one padded batch split with `torch.chunk`;
  `-logsigmoid(r_c - r_r)` plus `center_rewards_coefficient * mean((r_c + r_r)²)` (Eisenstein et al., 2023).
- Kingma & Welling, "Auto-Encoding Variational Bayes" (2014): reparameterization, Gaussian KL.
- Dirichlet KL in closed form: Penny, "KL-Divergences of Normal, Gamma, Dirichlet and Wishart densities" (2001).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from rewardprism.backbone import Backbone, load_backbone
from rewardprism.config import ConfigError
from rewardprism.features import FeatureSpec
from rewardprism.heads import HeadSet

CONFIG_FILE = "reward_config.json"
HEADS_FILE = "reward_heads.safetensors"
LOGVAR_RANGE = (-10.0, 10.0)  # keeps σ² = exp(log σ²) finite in fp32 and bf16


@dataclass
class RewardModelConfig:
    """What a reward model is; saved next to its weights so a folder rebuilds the model alone."""

    kind: Literal["vrm", "bt"] = "vrm"
    backbone: str = "minilm"  # a `load_backbone` spec: where the weights came from
    max_length: int = 512  # tokens per text; longer texts lose their beginning (the response is kept)
    # Tokens of the prompt alone that q(w | x) reads, the end kept (the latest turn): the weights follow what is
    # asked now, and a long multi-turn history would cost a third of a training step for the weight head alone.
    prompt_max_length: int = 64
    num_objectives: int = 4  # K
    objective_names: list[str] = field(default_factory=list)  # K names; empty: objective_0 ...
    latent_dim: int = 16  # D
    alpha0: float = 1.0  # symmetric Dirichlet prior concentration
    alpha_eps: float = 1e-3  # ε in α = softplus(·) + ε, keeps α > 0
    beta_w: float = 0.01
    beta_z: float = 0.01
    lam: float = 0.0  # λ: weight of the supervision loss; 0 is the unsupervised VRM
    sup_loss: Literal["mse", "ce"] = "mse"
    center_coef: float = 0.0  # TRL's center_rewards_coefficient
    freeze_backbone: bool = False  # train the heads only (a linear probe on fixed features)

    def __post_init__(self) -> None:
        if self.kind not in ("vrm", "bt"):
            raise ConfigError("kind", f"must be 'vrm' or 'bt', got {self.kind!r}")
        if self.sup_loss not in ("mse", "ce"):
            raise ConfigError("sup_loss", f"must be 'mse' or 'ce', got {self.sup_loss!r}")
        for name in ("max_length", "prompt_max_length", "num_objectives", "latent_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be a positive integer, got {getattr(self, name)}")
        for name in ("alpha0", "alpha_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        for name in ("beta_w", "beta_z", "lam", "center_coef"):
            if not getattr(self, name) >= 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.kind == "bt" and self.lam > 0:
            raise ConfigError("lam", "a BT model has no objectives to supervise: use kind: vrm or lam: 0")
        if self.objective_names and len(self.objective_names) != self.num_objectives:
            raise ConfigError("objective_names", f"has {len(self.objective_names)} names for num_objectives="
                                                 f"{self.num_objectives}: give one name per objective or none")

    @property
    def head_names(self) -> list[str]:
        """Names of the exported heads: one `reward` for BT, the K objectives for VRM."""
        if self.kind == "bt":
            return ["reward"]
        return list(self.objective_names) or [f"objective_{k}" for k in range(self.num_objectives)]


# ----------------------------------------------------------------------------------------------- loss terms

def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood, −log σ(r_c − r_r), averaged with optional per-pair weights."""
    nll = -F.logsigmoid(r_chosen - r_rejected)  # (B,)
    if weight is None:
        return nll.mean()
    return (weight * nll).sum() / weight.sum()


def center_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """TRL's reward centering: mean (r_c + r_r)², which pins the BT-invariant offset of rewards near 0."""
    return ((r_chosen + r_rejected) ** 2).mean()


def dirichlet_kl(alpha: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """KL(Dir(α) ‖ Dir(β)) per row, closed form; (B, K) and (K,) → (B,)."""
    a0, b0 = alpha.sum(-1), prior.sum(-1)  # (B,), ()
    return (torch.lgamma(a0) - torch.lgamma(alpha).sum(-1) - torch.lgamma(b0) + torch.lgamma(prior).sum(-1)
            + ((alpha - prior) * (torch.digamma(alpha) - torch.digamma(a0).unsqueeze(-1))).sum(-1))


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, diag σ²) ‖ N(0, I)) per row, closed form; (N, D) → (N,)."""
    return 0.5 * (mu ** 2 + logvar.exp() - 1.0 - logvar).sum(-1)


def supervision_loss(scores: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-objective supervision of the scores s (N, K) by targets (N, K).

    mse: squared error against any real targets. ce: Bernoulli cross-entropy with s as the logit and the
    target in [0, 1] as a soft label (ratings on a [0, 1] scale).
    """
    if kind == "mse":
        return F.mse_loss(scores, targets)
    if kind == "ce":
        return F.binary_cross_entropy_with_logits(scores, targets)
    raise ValueError(f"supervision loss must be 'mse' or 'ce', got {kind!r}")


# ----------------------------------------------------------------------------------------------- model

class RewardModel(nn.Module):
    """Backbone + reward heads. `forward` takes one padded batch: chosen rows, then rejected rows."""

    def __init__(self, config: RewardModelConfig, backbone: Backbone):
        super().__init__()
        self.config, self.backbone = config, backbone
        # Keep the end of a long text: the response (and, for prompts, the latest turn) is what is scored.
        backbone.tokenizer.truncation_side = "left"
        if config.freeze_backbone:
            backbone.requires_grad_(False)
        d, k, latent = backbone.dim, config.num_objectives, config.latent_dim
        if config.kind == "bt":
            self.heads = nn.ModuleDict({"score": nn.Linear(d, 1)})
            default = torch.ones(1)
        else:
            self.heads = nn.ModuleDict({
                "weight": nn.Linear(d, k),  # h(x) → α(x)
                "mu": nn.Linear(d, latent),  # h(x, y) → μ, linear so s(μ) is affine in h
                "logvar": nn.Linear(d, latent),  # h(x, y) → log σ²
                "score": nn.Linear(latent, k),  # z → s = A z + b
            })
            default = torch.full((k,), 1.0 / k)
            self.register_buffer("prior_alpha", torch.full((k,), config.alpha0), persistent=False)
        # The population profile exported with the head set: the prior mean until training sets E[w].
        self.register_buffer("default_weights", default)

    def train(self, mode: bool = True) -> RewardModel:
        """A frozen backbone is a fixed feature map: it stays in eval mode (no dropout) while the heads train."""
        super().train(mode)
        if self.config.freeze_backbone:
            self.backbone.eval()
        return self

    @property
    def is_vrm(self) -> bool:
        return self.config.kind == "vrm"

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) tokens → (B, d) pooled backbone features, without a graph when the backbone is frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_backbone):
            return self.backbone(input_ids, attention_mask)

    def concentration(self, prompt_features: torch.Tensor) -> torch.Tensor:
        """α(x) of q(w | x), in fp32 (lgamma and the Dirichlet sampler need the precision); (B, d) → (B, K)."""
        return F.softplus(self.heads["weight"](prompt_features).float()) + self.config.alpha_eps

    def expected_weights(self, prompt_features: torch.Tensor) -> torch.Tensor:
        """E[w | x] = α / Σα; (B, d) → (B, K). BT's single head has weight 1."""
        if not self.is_vrm:
            return torch.ones(len(prompt_features), 1, device=prompt_features.device)
        alpha = self.concentration(prompt_features)
        return alpha / alpha.sum(-1, keepdim=True)

    def objective_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Scores at the posterior mean, s(μ(h)); (N, d) → (N, K), or (N, 1) for BT."""
        if not self.is_vrm:
            return self.heads["score"](features)
        return self.heads["score"](self.heads["mu"](features))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                prompt_ids: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None,
                weight: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Loss terms and rewards for B pairs.

        input_ids, attention_mask: (2B, T), the B chosen texts then the B rejected texts, one forward pass.
        prompt_ids, prompt_mask: (B, Tp), the prompts alone (VRM only: they feed q(w | x)).
        weight: (B,) per-pair weights; targets: (2B, K) supervision targets in the same row order.
        Training mode samples w and z; eval mode uses posterior means.
        """
        h = self.features(input_ids, attention_mask)  # (2B, d)
        out: dict[str, torch.Tensor] = {}
        if self.is_vrm:
            if prompt_ids is None or prompt_mask is None:
                raise ValueError("a VRM needs the prompts alone (prompt_ids, prompt_mask) for q(w | x)")
            # h(x) only feeds the K-way weight head; its backward through the backbone would cost a second
            # backward pass per step for little signal, so the backbone learns from h(x, y) alone.
            with torch.no_grad():
                hx = self.backbone(prompt_ids, prompt_mask)  # (B, d)
            alpha = self.concentration(hx)  # (B, K) fp32
            mu = self.heads["mu"](h)  # (2B, D)
            logvar = self.heads["logvar"](h).clamp(*LOGVAR_RANGE)  # (2B, D)
            if self.training:
                w = torch.distributions.Dirichlet(alpha).rsample()  # (B, K)
                z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)  # (2B, D)
            else:
                w, z = alpha / alpha.sum(-1, keepdim=True), mu
            scores = self.heads["score"](z)  # (2B, K)
            rewards = (scores * w.to(scores.dtype).repeat(2, 1)).sum(-1)  # (2B,) one w per pair
            out["kl_w"] = dirichlet_kl(alpha, self.prior_alpha.float()).mean()
            out["kl_z"] = gaussian_kl(mu.float(), logvar.float()).view(2, -1).sum(0).mean()  # chosen + rejected
            if targets is not None and self.config.lam > 0:
                out["sup"] = supervision_loss(scores.float(), targets.float(), self.config.sup_loss)
        else:
            rewards = self.heads["score"](h).squeeze(-1)  # (2B,)
        r_chosen, r_rejected = rewards.float().chunk(2)  # (B,), (B,)
        out["bt"] = bt_loss(r_chosen, r_rejected, weight)
        loss = out["bt"]
        if self.config.center_coef > 0:
            out["center"] = center_loss(r_chosen, r_rejected)
            loss = loss + self.config.center_coef * out["center"]
        if self.is_vrm:
            loss = loss + self.config.beta_w * out["kl_w"] + self.config.beta_z * out["kl_z"]
            if "sup" in out:
                loss = loss + self.config.lam * out["sup"]
        out.update(loss=loss, rewards_chosen=r_chosen, rewards_rejected=r_rejected)
        return out

    # ------------------------------------------------------------------------------------------- export

    def to_head_set(self, backbone: str, *, name: str = "default", version: str = "1",
                    dataset: str = "") -> HeadSet:
        """The K objective scores at the posterior mean as a `HeadSet` over `backbone`'s features.

        s = A(W_μ h + b_μ) + b, so the head weights are A W_μ (K, d) and the biases A b_μ + b (K,).
        `backbone` is the folder (or spec) whose features the heads read — the exported folder once the
        backbone was fine-tuned. The default weights are the model's population profile: the average
        posterior E[w] that training sets, or the prior mean before it. The feature spec is the model's own: its
        `max_length`, keeping the end of a long text.
        """
        score = self.heads["score"]
        a, b = score.weight.detach().double(), score.bias.detach().double()  # (K, D) or (1, d), (K,)
        if self.is_vrm:
            mu = self.heads["mu"]
            w_mu, b_mu = mu.weight.detach().double(), mu.bias.detach().double()  # (D, d), (D,)
            a, b = a @ w_mu, a @ b_mu + b  # (K, d), (K,)
        return HeadSet(a.float().cpu().numpy(), b.float().cpu().numpy(), self.config.head_names,
                       self.config.kind, backbone, self.default_weights.float().cpu().numpy(), name=name,
                       version=version, dataset=dataset,
                       info={"source": self.config.backbone, "latent_dim": self.config.latent_dim,
                             "alpha0": self.config.alpha0, "lam": self.config.lam},
                       features=replace(FeatureSpec.of(self.backbone), backbone=backbone))

    def save_pretrained(self, folder: str | Path) -> Path:
        """A Hugging Face-style folder: backbone and tokenizer, `reward_heads.safetensors`, `reward_config.json`.

        The backbone files sit at the top of the folder, so `load_backbone(folder)` reads the fine-tuned
        features that exported head sets refer to.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.model.save_pretrained(folder)
        self.backbone.tokenizer.save_pretrained(folder)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.heads.state_dict().items()}
        save_file({**tensors, "default_weights": self.default_weights.detach().cpu()}, folder / HEADS_FILE)
        meta = {"config": asdict(self.config), "pooling": self.backbone.pooling, "dim": self.backbone.dim,
                "padding_side": self.backbone.tokenizer.padding_side}
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> RewardModel:
        """Rebuild a model saved by `save_pretrained`, in eval mode."""
        folder = Path(folder)
        if not (folder / CONFIG_FILE).exists():
            raise FileNotFoundError(f"{folder} is not a reward model folder (no {CONFIG_FILE}); "
                                    "train one with train_vrm.py or RewardModel.save_pretrained")
        meta = json.loads((folder / CONFIG_FILE).read_text())
        config = RewardModelConfig(**meta["config"])
        backbone = load_backbone(str(folder), device=device, dtype=dtype, pooling=meta["pooling"],
                                 max_length=config.max_length, padding_side=meta["padding_side"])
        model = cls(config, backbone)
        tensors = load_file(folder / HEADS_FILE)
        default = tensors.pop("default_weights")
        model.heads.load_state_dict(tensors)
        model.default_weights.copy_(default)
        return model.to(device=backbone.device, dtype=next(backbone.parameters()).dtype).eval()
