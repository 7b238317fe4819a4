"""ModelConfig and PRESETS: one decoder Transformer family, GPT-2 and Llama styles.

Notation used across ember/models:
    B batch, T query length, S key length (cache), C n_embd,
    H n_head, K n_kv_head (GQA: H % K == 0; MQA: K == 1), D head_dim, F ffn_hidden, V vocab_size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional


MAX_BLOCK_SIZE = 1 << 20
"""Longest context a config may ask for (the RoPE / learned position tables are allocated whole)."""


@dataclass
class RopeScaling:
    """Llama-3 RoPE frequency scaling (https://arxiv.org/abs/2407.21783, `rope_type: llama3`)."""

    factor: float = 8.0
    """Long wavelengths are divided by this factor."""
    low_freq_factor: float = 1.0
    """Wavelengths above original_max_position_embeddings / low_freq_factor are fully scaled."""
    high_freq_factor: float = 4.0
    """Wavelengths below original_max_position_embeddings / high_freq_factor are left unchanged."""
    original_max_position_embeddings: int = 8192
    """The context length the base model was trained with."""


@dataclass
class ModelConfig:
    """Architecture of one decoder-only Transformer."""

    vocab_size: int = 512
    """Rows of the token embedding (V); may exceed the tokenizer's vocabulary (padding)."""
    n_layer: int = 2
    """Number of Transformer blocks."""
    n_embd: int = 64
    """Width of the residual stream (C)."""
    n_head: int = 4
    """Query heads (H)."""
    n_kv_head: Optional[int] = None
    """Key/value heads (K): None = n_head (MHA); 1 = MQA; else GQA."""
    head_dim: Optional[int] = None
    """Per-head width (D); None = n_embd // n_head."""
    ffn_hidden: Optional[int] = None
    """MLP hidden width (F); None = 4 * n_embd for GELU, or Llama's rounded 8/3 * n_embd for SwiGLU."""
    block_size: int = 128
    """Maximum sequence length (positions / RoPE table size)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalisation layer."""
    norm_eps: float = 1e-5
    """Epsilon of the normalisation layers."""
    pos_emb: Literal["learned", "rope"] = "learned"
    """Learned absolute positions (GPT-2) or rotary embeddings (Llama)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: Optional[RopeScaling] = None
    """Llama-3 frequency scaling; None = plain RoPE."""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """GELU MLP (GPT-2, tanh approximation) or SwiGLU (Llama)."""
    bias: bool = True
    """Biases in attention and MLP linears (and LayerNorm)."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and residual branches (training only)."""
    mask: Literal["causal", "prefix", "bidirectional"] = "causal"
    """Attention mask: causal; prefix-LM (bidirectional over a per-sample prefix, causal after); bidirectional."""
    init_std: float = 0.02
    """Std of the normal weight init; residual output projections get init_std / sqrt(2 * n_layer)."""

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        for name in ("vocab_size", "n_layer", "n_embd", "n_head", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected at least 1")
        if self.block_size > MAX_BLOCK_SIZE:
            raise ValueError(f"block_size={self.block_size}: expected at most {MAX_BLOCK_SIZE:,} positions "
                             "(the position tables are allocated whole)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}: expected a probability in [0, 1)")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps={self.norm_eps}: expected > 0")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.n_embd if self.mlp == "gelu" else _llama_ffn(self.n_embd)
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")

    # --- derived sizes -------------------------------------------------------------------------
    def num_params(self, embedding: bool = True) -> int:
        """Parameter count (tied embeddings counted once); embedding=False leaves out token/pos embeddings."""
        C, F, L, V = self.n_embd, self.ffn_hidden, self.n_layer, self.vocab_size
        q, kv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        b = 1 if self.bias else 0
        attn = C * (q + 2 * kv) + q * C + b * (q + 2 * kv + C)
        mlp = (3 if self.mlp == "swiglu" else 2) * C * F + b * (F * (2 if self.mlp == "swiglu" else 1) + C)
        norm = C * (2 if self.norm == "layernorm" and self.bias else 1)
        blocks = L * (attn + mlp + 2 * norm) + norm
        head = 0 if self.tie_embeddings else V * C
        if not embedding:
            return blocks + head
        pos = self.block_size * C if self.pos_emb == "learned" else 0
        return blocks + head + V * C + pos

    def flops_per_token(self, seq_len: Optional[int] = None) -> int:
        """Training FLOPs per token: 6 * N (non-embedding matmul params incl. the head) + attention.

        Attention: 12 * n_layer * H * D * T (QK^T and AV, forward + backward, PaLM appendix B).
        """
        T = seq_len or self.block_size
        n_matmul = self.num_params(embedding=False) + (self.vocab_size * self.n_embd if self.tie_embeddings else 0)
        return 6 * n_matmul + 12 * self.n_layer * self.n_head * self.head_dim * T

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {unknown}")
        return cls(**data)


def _llama_ffn(n_embd: int, multiple_of: int = 256) -> int:
    hidden = int(2 * 4 * n_embd / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


_GPT2 = dict(vocab_size=50304, block_size=1024, norm="layernorm", pos_emb="learned", mlp="gelu",
             bias=True, tie_embeddings=True)
_LLAMA3 = dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False, rope_theta=500000.0)

PRESETS: dict[str, dict] = {
    # tests and docs: instant on CPU
    "tiny": dict(vocab_size=512, n_layer=2, n_embd=64, n_head=4, block_size=128),
    "tiny-llama": dict(vocab_size=512, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, block_size=128,
                       norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False, tie_embeddings=False,
                       ffn_hidden=172),
    # the default `ember pretrain` model: about 10 minutes on 2 CPU cores
    "small": dict(vocab_size=4096, n_layer=4, n_embd=256, n_head=4, block_size=256),
    # GPT-2 family (vocab padded 50257 -> 50304, a multiple of 64)
    "gpt2": dict(_GPT2, n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(_GPT2, n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": dict(_GPT2, n_layer=48, n_embd=1600, n_head=25),
    # GPT-3 175B as Megatron-LM benchmarked it (Narayanan et al. 2021; vocab 51,200, seq 2048): for `ember plan`
    "gpt3-175b": dict(_GPT2, vocab_size=51200, block_size=2048, n_layer=96, n_embd=12288, n_head=96),
    # Llama 3 family
    "smollm2-135m": dict(_LLAMA3, vocab_size=49152, n_layer=30, n_embd=576, n_head=9, n_kv_head=3,
                         ffn_hidden=1536, block_size=8192, rope_theta=100000.0, tie_embeddings=True),
    "llama-3.2-1b": dict(_LLAMA3, vocab_size=128256, n_layer=16, n_embd=2048, n_head=32, n_kv_head=8,
                         ffn_hidden=8192, block_size=131072, tie_embeddings=True,
                         rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "llama-3.2-3b": dict(_LLAMA3, vocab_size=128256, n_layer=28, n_embd=3072, n_head=24, n_kv_head=8,
                         ffn_hidden=8192, block_size=131072, tie_embeddings=True,
                         rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "llama-3-8b": dict(_LLAMA3, vocab_size=128256, n_layer=32, n_embd=4096, n_head=32, n_kv_head=8,
                       ffn_hidden=14336, block_size=8192, tie_embeddings=False),
    "llama-3-70b": dict(_LLAMA3, vocab_size=128256, n_layer=80, n_embd=8192, n_head=64, n_kv_head=8,
                        ffn_hidden=28672, block_size=8192, tie_embeddings=False),
    "llama-3.1-405b": dict(_LLAMA3, vocab_size=128256, n_layer=126, n_embd=16384, n_head=128, n_kv_head=8,
                           ffn_hidden=53248, block_size=131072, tie_embeddings=False,
                           rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position_embeddings=8192)),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A ModelConfig from PRESETS, with field overrides."""
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise KeyError(f"unknown model preset '{name}'{hint}; presets: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Embedding rows for a tokenizer of n tokens: rounded up to a multiple (GEMM-friendly shapes)."""
    return multiple * -(-n // multiple)
