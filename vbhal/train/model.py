"""The reference model of `vbhal train`: a decoder-only GPT you can read in one sitting.

Modelled on nanoGPT (Karpathy): a config dataclass, a `Block` repeated `num_layers` times, learned
position embeddings, pre-LayerNorm, GELU MLP, an `lm_head` optionally tied to the token embedding.

It is written so that `vbhal.optimize` can transform it without knowing it:

* every projection is a plain `nn.Linear` (the FP4 swap replaces them);
* the attention module carries ``vbhal_attention_slot = True`` and calls
  ``self.attn_fn(q, k, v, causal=True)`` with q (B, H, S, D) and k/v (B, H_kv, S, D); the default
  `attn_fn` is PyTorch's SDPA, the attention swap binds a vbhal kernel in its place;
* the blocks live in ``model.blocks`` (an `nn.ModuleList` of `Block`), so gradient checkpointing can
  wrap them; ``model.gradient_checkpointing_enable()`` turns on the built-in per-block checkpointing.

Example::

    from vbhal.train.model import GPT, GPTConfig
    model = GPT(GPTConfig.from_preset("tiny"))
    logits, loss = model(idx, targets)         # idx, targets: (B, S) int64
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["GPTConfig", "PRESETS", "GPT", "Block", "CausalSelfAttention", "MLP", "sdpa_attention",
           "DEFAULT_VOCAB_SIZE"]

# Byte-level tokens (256 byte values) + end-of-document (id 256), rounded up to a multiple of 64 so
# the output projection has tensor-core-friendly shapes (nanoGPT pads GPT-2's 50257 to 50304 the
# same way). The ids 257..319 are never produced by the tokenizer.
DEFAULT_VOCAB_SIZE = 320


@dataclass
class GPTConfig:
    """Shape of a GPT. `num_kv_heads` < `num_heads` gives grouped-query attention (None = MHA)."""

    vocab_size: int = DEFAULT_VOCAB_SIZE
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    seq_length: int = 128
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    bias: bool = False
    tie_embeddings: bool = True
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def intermediate_size(self) -> int:
        return int(round(self.hidden_size * self.mlp_ratio))

    def validate(self) -> None:
        """Raise `ConfigError` naming the bad field (before any tensor is allocated)."""
        from vbhal.train._errors import config_error

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "seq_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise config_error(f"GPTConfig.{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_heads:
            raise config_error(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}); "
                f"pick num_heads among the divisors of hidden_size.")
        if self.num_kv_heads is not None:
            if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
                raise config_error(
                    f"num_kv_heads ({self.num_kv_heads}) must be a positive divisor of num_heads "
                    f"({self.num_heads}) for grouped-query attention.")
        if not 0.0 <= self.dropout < 1.0:
            raise config_error(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.mlp_ratio <= 0:
            raise config_error(f"mlp_ratio must be positive, got {self.mlp_ratio}.")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        """The preset `name` (see `PRESETS`) with some fields replaced; None values are ignored."""
        from vbhal.train._errors import config_error

        if name not in PRESETS:
            raise config_error(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - fields
        if unknown:
            raise config_error(f"unknown GPTConfig field(s) {sorted(unknown)}; known: {sorted(fields)}.")
        return dataclasses.replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# name -> GPTConfig. Head dimension 32 for tiny, 64 for small and large.
# medium (the H100 throughput target, hidden 768 x 12 layers fixed by the issue) is our choice otherwise:
# 6 heads of 128 (as modded-nanogpt's 768-wide GPT; Hopper attention kernels run causal hd128 about 1.2x
# (S 1024) to 1.3x (S 2048) faster per FLOP than hd64, measured in benchmarks/bench_attention.py) and a
# 2048-byte window: byte-level tokens carry ~1/4 of a BPE token's text, so 2048 bytes is about GPT-2's
# 512-token context. The micro-batch (config.TRAIN_PRESETS) keeps 32 k tokens per step.
PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(hidden_size=128, num_layers=2, num_heads=4, seq_length=128),
    "small": GPTConfig(hidden_size=256, num_layers=4, num_heads=4, seq_length=256),
    "medium": GPTConfig(hidden_size=768, num_layers=12, num_heads=6, seq_length=2048),
    "large": GPTConfig(hidden_size=1024, num_layers=24, num_heads=16, seq_length=1024),
}


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                   scale: float | None = None) -> torch.Tensor:
    """Default `attn_fn`: PyTorch SDPA, q (B, H, S, D), k/v (B, H_kv, S, D), GQA without repeat."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


class CausalSelfAttention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention with one fused qkv projection."""

    # Marker the attention swap looks for: it replaces `attn_fn` with the device's kernel.
    vbhal_attention_slot = True

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv = nn.Linear(config.hidden_size, qkv_out, bias=config.bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.attn_fn = sdpa_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, C = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, S, H, D).transpose(1, 2)      # (B, H, S, D)
        k = k.view(B, S, Hkv, D).transpose(1, 2)
        v = v.view(B, S, Hkv, D).transpose(1, 2)
        y = self.attn_fn(q, k, v, causal=True)      # (B, H, S, D)
        y = y.transpose(1, 2).reshape(B, S, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer language model. ``forward(idx, targets=None) -> (logits, loss)``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.seq_length, config.hidden_size)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * num_layers) (two per block).
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # -- gradient checkpointing (the Hugging Face method names, so generic tools find them) --
    def gradient_checkpointing_enable(self, **_ignored) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, S) token ids -> (logits (B, S, V), mean cross-entropy or None).

        Targets equal to -1 are ignored by the loss. The loss is computed in float32 even under
        autocast, so bf16 training reports the same loss scale as fp32.
        """
        B, S = idx.shape
        if S > self.config.seq_length:
            from vbhal.train._errors import config_error
            raise config_error(f"input has {S} tokens but the model's seq_length is "
                               f"{self.config.seq_length}; crop the input or raise seq_length.")
        pos = torch.arange(S, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.ln_f(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    # -- accounting ---------------------------------------------------------------------------
    def num_parameters(self, non_embedding: bool = False) -> int:
        """Distinct parameters (a tied lm_head counts once); `non_embedding` drops wte and wpe."""
        seen, n = set(), 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        if non_embedding:
            # Token and position tables; a tied lm_head shares wte, so it goes with it (nanoGPT).
            n -= self.wpe.weight.numel() + self.wte.weight.numel()
        return n

    def flops_per_token(self, seq_length: int | None = None) -> float:
        """Training FLOPs per token: 6 * N (forward + backward of every matmul weight, lm_head
        included, position embedding excluded) + 12 * L * C * S for attention scores and values.

        This is the PaLM paper's formula (Chowdhery et al. 2022, appendix B), used by nanoGPT's
        `estimate_mfu`; causal masking is not discounted, as there.
        """
        c = self.config
        s = c.seq_length if seq_length is None else seq_length
        # Tied or not, the (V, C) matrix is one matmul in lm_head; the lookups cost no FLOPs.
        n = self.num_parameters() - self.wpe.weight.numel()
        if not c.tie_embeddings:
            n -= self.wte.weight.numel()
        return 6.0 * n + 12.0 * c.num_layers * c.hidden_size * s

    # -- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 stop_token: int | None = None) -> torch.Tensor:
        """Append `max_new_tokens` sampled tokens to idx (B, S); temperature 0 means greedy."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.seq_length:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float()
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
            if stop_token is not None and bool((nxt == stop_token).all()):
                break
        return idx
