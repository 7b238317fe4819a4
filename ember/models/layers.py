"""Building blocks of the decoder: norms, rotary embeddings, attention, MLPs, the block.

Shapes (legend in models/config.py): x is (B, T, C); q is (B, H, T, D); k, v are (B, K, S, D).

Grouped-query attention, H=8 query heads sharing K=2 key/value heads:

    q heads:  0 1 2 3 | 4 5 6 7
                 \\|/   |   \\|/
    kv heads:     0    |    1          (SDPA enable_gqa broadcasts each kv head over H/K q heads)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ember.models.config import ModelConfig, RopeScaling


class RMSNorm(nn.RMSNorm):
    """Llama's RMSNorm, computed as Hugging Face's LlamaRMSNorm does: in fp32, then the weight.

    nn.RMSNorm's own CPU kernel is slower and rounds differently from the reference implementation
    (so converted models would not match Hugging Face's logits bit for bit).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: Optional[float]) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps), in fp32 (HF LlamaRMSNorm's arithmetic); eps None: fp32's epsilon."""
    eps = eps if eps is not None else torch.finfo(torch.float32).eps
    if x.dtype == torch.float32:  # the same arithmetic without two no-op casts (a decode step has 2 per layer)
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


# ------------------------------------------------------------------------------------------ RoPE
def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[RopeScaling] = None,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    """Inverse frequencies (D/2,), with Llama-3 scaling of long wavelengths if given."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    if scaling is None:
        return inv
    lo_wl = scaling.original_max_position_embeddings / scaling.low_freq_factor
    hi_wl = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    scaled = torch.where(wavelen > lo_wl, inv / scaling.factor, inv)
    mid = (wavelen <= lo_wl) & (wavelen >= hi_wl)
    return torch.where(mid, (1 - smooth) * inv / scaling.factor + smooth * inv, scaled)


def rope_cache(cfg: ModelConfig, device: Optional[torch.device] = None) -> torch.Tensor:
    """(block_size, 2 D) table: [cos | cos] in the first D columns, [-sin | sin] in the last D.

    Laid out so that `apply_rope` is two multiplies, a roll and an add (no split, no concatenation).
    The model indexes it by position and adds a head axis once per forward: (T, 1, 2D) or (B, T, 1, 2D).
    """
    inv = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, device)
    t = torch.arange(cfg.block_size, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv)  # (T, D/2)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos, -sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, h, D) by rope (T, 1, 2D) or (B, T, 1, 2D); HF "rotate_half" layout (pairs i, i + D/2).

    With x = [x1 | x2]: [x1 cos - x2 sin | x2 cos + x1 sin] = x * [cos | cos] + roll(x, D/2) * [-sin | sin],
    bit for bit (a product with a negated factor is the negated product). Heads sit after T so that q
    and k, adjacent in one projection output, rotate in one call (see Attention._heads).
    """
    cos, sin = rope.chunk(2, dim=-1)  # (..., T, 1, D) each
    if x.dtype == torch.float32:  # skip two no-op casts
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
    xf = x.float()
    out = xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin
    return out.type_as(x)


# ------------------------------------------------------------------------------------- attention
class Attention(nn.Module):
    """Multi-head attention with MHA/GQA/MQA, optional RoPE, optional KV cache, via SDPA."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, K, D, C = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_embd
        self.head_dim, self.rope = D, cfg.pos_emb == "rope"
        self.dropout = cfg.dropout
        self.wq = nn.Linear(C, H * D, bias=cfg.bias)
        self.wk = nn.Linear(C, K * D, bias=cfg.bias)
        self.wv = nn.Linear(C, K * D, bias=cfg.bias)
        self.wo = nn.Linear(H * D, C, bias=cfg.bias)
        self.kv_cache: Optional[nn.Module] = None  # set by models.kv_cache.setup_caches

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                is_causal: bool, input_pos: Optional[torch.Tensor] = None, kv_len: Optional[int] = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). With a KV cache, k/v are written at slots `input_pos` and the
        queries attend over the first `kv_len` slots (all of them when None: static shapes for compile)."""
        B, T, _ = x.shape
        q, k, v = self._heads(x, rope)  # (B, H, T, D), (B, K, T, D), (B, K, T, D)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, K, S, D)
            if kv_len is not None and kv_len < k.shape[2]:
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=q.shape[1] != k.shape[1])
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def _heads(self, x: torch.Tensor, rope: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, H, T, D), k and v (B, K, T, D), RoPE applied; q and k rotate in one call when one
        projection produced them side by side."""
        B, T, _ = x.shape
        D = self.head_dim
        qkv = self._project_qkv(x)
        if isinstance(qkv, torch.Tensor):  # (B, T, H*D + 2*K*D); view(B, T, -1, D): head counts are local under TP
            nq, nk = self.wq.out_features, self.wk.out_features
            v = qkv[..., nq + nk:].view(B, T, -1, D)
            qk = qkv[..., : nq + nk].view(B, T, -1, D)  # (B, T, H + K, D)
            if self.rope:
                qk = apply_rope(qk, rope)
            H = nq // D
            q, k = qk[:, :, :H], qk[:, :, H:]
        else:
            q, k, v = (t.view(B, T, -1, D) for t in qkv)
            if self.rope:
                q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _project_qkv(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[wq(x) | wk(x) | wv(x)] as ONE matmul over the concatenated weights where that is cheaper
        (one (B, T, H*D + 2*K*D) tensor), else the three outputs.

        For large inputs (training, prefill): one (C, H*D + 2*K*D) GEMM over a concatenation, faster
        than three narrow ones on CPU (bench/forward_backward.py); the concatenation copies only 3*C*C
        floats. Small inputs take three calls (the copy would triple the bytes a memory-bound GEMV
        reads), and so do swapped modules (LoRA, quantized), hooked ones and DTensor (TP) weights.
        The inference engine swaps in its own projection for decoding (ember/infer/decode.py).
        """
        lins = (self.wq, self.wk, self.wv)
        rows = x.numel() // x.shape[-1]
        if rows < _FUSE_QKV_MIN_ROWS or not all(plain_linear(m) for m in lins):
            return self.wq(x), self.wk(x), self.wv(x)
        w = torch.cat([m.weight for m in lins])  # (H*D + 2*K*D, C)
        b = torch.cat([m.bias for m in lins]) if self.wq.bias is not None else None
        return F.linear(x, w, b)


_FUSE_QKV_MIN_ROWS = 128  # B*T below this: three GEMVs read the weights once; the concatenation reads them twice more


# ------------------------------------------------------------------------------------------ MLPs
class GeluMLP(nn.Module):
    """GPT-2 MLP: w2(gelu_tanh(w1 x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """Llama MLP: w2(silu(w1 x) * w3 x)  (w1 = gate, w3 = up, w2 = down)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=cfg.bias)
        self.w3 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# ----------------------------------------------------------------------------------------- block
class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = make_norm(cfg)
        self.attention = Attention(cfg)
        self.ffn_norm = make_norm(cfg)
        self.feed_forward = SwiGLU(cfg) if cfg.mlp == "swiglu" else GeluMLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                is_causal: bool, input_pos: Optional[torch.Tensor] = None, kv_len: Optional[int] = None) -> torch.Tensor:
        x = x + self._drop(self.attention(self.attention_norm(x), rope, mask, is_causal, input_pos, kv_len))
        return x + self._drop(self.feed_forward(self.ffn_norm(x)))

    def _drop(self, y: torch.Tensor) -> torch.Tensor:
        return self.resid_dropout(y) if self.training else y  # eval: skip the no-op module call


def plain_linear(m: nn.Module) -> bool:
    """An nn.Linear (not a subclass) without hooks whose weight is a plain tensor (not a DTensor)."""
    return (type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks
            and type(m.weight) in (nn.Parameter, torch.Tensor))
