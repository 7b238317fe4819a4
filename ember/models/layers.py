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
from ember.models.packing import decode_linear, fused_weight, one_row, packed_linear, plain_linear, row_product


class RMSNorm(nn.RMSNorm):
    """Llama's RMSNorm, computed as Hugging Face's LlamaRMSNorm does: in fp32, then the weight.

    nn.RMSNorm's own CPU kernel is slower (21 vs 17 us for one 576-wide row, 6.1 vs 4.1 ms for
    (8, 256, 576)) and rounds differently from the reference implementation.
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

    fused = None  # the packed q|k|v views while models.packing.fused_views is active

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
        return decode_linear(self.wo, y.transpose(1, 2).reshape(B, T, -1))

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

        Packed for decoding (models/packing.py) and with autograd off: one GEMV over the shared
        buffer, no copy. Otherwise, for large inputs (training, prefill): one (C, H*D + 2*K*D) GEMM
        over a concatenation, faster than three narrow ones on CPU (bench/forward_backward.py); the
        concatenation copies only 3*C*C floats. Small unpacked inputs take three calls (the copy would
        triple the bytes a memory-bound GEMV reads), and so do swapped modules (LoRA, quantized), hooked
        ones and DTensor (TP) weights.
        """
        lins = (self.wq, self.wk, self.wv)
        packed = packed_linear(lins, x, self.fused)
        if packed is not None:
            return packed
        rows = x.numel() // x.shape[-1]
        if rows < _FUSE_QKV_MIN_ROWS or not all(plain_linear(m) for m in lins):
            return decode_linear(self.wq, x), decode_linear(self.wk, x), decode_linear(self.wv, x)
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
        return decode_linear(self.w2, F.gelu(decode_linear(self.w1, x), approximate="tanh"))


class SwiGLU(nn.Module):
    """Llama MLP: w2(silu(w1 x) * w3 x)  (w1 = gate, w3 = up, w2 = down)."""

    fused = None  # the packed gate|up views while models.packing.fused_views is active

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=cfg.bias)
        self.w3 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = packed_linear((self.w1, self.w3), x, self.fused)  # packed for decoding (models/packing.py): one GEMV
        if packed is not None:
            gate, up = packed.chunk(2, dim=-1)
            return decode_linear(self.w2, F.silu(gate, inplace=True).mul_(up))  # packed is ours: in place
        return decode_linear(self.w2, F.silu(decode_linear(self.w1, x)) * decode_linear(self.w3, x))


# ----------------------------------------------------------------------------------------- block
class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    decoder = None  # a BlockDecoder while models.packing.fused_views is active (batch-1 decode steps)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = make_norm(cfg)
        self.attention = Attention(cfg)
        self.ffn_norm = make_norm(cfg)
        self.feed_forward = SwiGLU(cfg) if cfg.mlp == "swiglu" else GeluMLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                is_causal: bool, input_pos: Optional[torch.Tensor] = None, kv_len: Optional[int] = None) -> torch.Tensor:
        if (self.decoder is not None and kv_len is not None and mask is None and x.shape[0] == 1
                and x.shape[1] == 1 and not self.training and not torch.is_grad_enabled()):
            return self.decoder(x, rope, input_pos, kv_len)
        x = x + self._drop(self.attention(self.attention_norm(x), rope, mask, is_causal, input_pos, kv_len))
        return x + self._drop(self.feed_forward(self.ffn_norm(x)))

    def _drop(self, y: torch.Tensor) -> torch.Tensor:
        return self.resid_dropout(y) if self.training else y  # eval: skip the no-op call (~7 us, twice a layer)


class BlockDecoder:
    """`Block.forward` for ONE token of ONE sequence with a KV cache, written for the fewest ops.

    A batch-1 decode step on CPU is memory-bound GEMVs plus ~50 small ops per layer, each costing a
    few microseconds of dispatch and Python; on a 30-layer model the small ops took as long as the
    weight reads. This is the same arithmetic as the modules (same kernels, same order: results
    match them to float rounding, tests/test_models_packing.py) with everything that does not
    change between steps done once, in `build`: weight slices for the split GEMV (`one_row`), the
    packed q|k|v and gate|up views, head counts, norm parameters. No module calls, no transposes:
    a one-token query is already laid out as (1, H, 1, D).

    Built by `models.packing.fused_views` for blocks whose weights are packed and plain; used by
    `Block.forward` only with autograd off, in eval mode, for x of shape (1, 1, C) without a mask.
    """

    def __init__(self, block: Block, qkv: tuple, wo: tuple, up: tuple, down: tuple, swiglu: bool):
        att = block.attention
        self.attention = att  # its kv_cache is read at each step (caches are set up per generation)
        self.norms = [(n.weight, getattr(n, "bias", None), n.eps, isinstance(n, RMSNorm))
                      for n in (block.attention_norm, block.ffn_norm)]
        self.qkv, self.wo, self.up, self.down, self.swiglu = qkv, wo, up, down, swiglu
        self.H = att.wq.out_features // att.head_dim
        self.K = att.wk.out_features // att.head_dim
        self.D, self.rope = att.head_dim, att.rope
        self.nqk = att.wq.out_features + att.wk.out_features

    @classmethod
    def build(cls, block: Block, parts: int) -> Optional["BlockDecoder"]:
        """A decoder for `block`, or None when its weights are not packed plain CPU float32 Linears."""
        att, mlp = block.attention, block.feed_forward
        swiglu = isinstance(mlp, SwiGLU)
        if type(mlp) not in (SwiGLU, GeluMLP) or type(att) is not Attention:
            return None
        if not all(type(n) in (RMSNorm, nn.LayerNorm) and n.weight is not None
                   for n in (block.attention_norm, block.ffn_norm)):
            return None
        linears = [att.wq, att.wk, att.wv, att.wo, mlp.w1, mlp.w2] + ([mlp.w3] if swiglu else [])
        if not all(plain_linear(m) and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
                   for m in linears):
            return None
        qkv = att.fused or fused_weight([att.wq, att.wk, att.wv])  # fused_views sets .fused first
        up = (mlp.fused or fused_weight([mlp.w1, mlp.w3])) if swiglu else (mlp.w1.weight, mlp.w1.bias)
        if qkv is None or up is None:
            return None
        return cls(block, row_product(*qkv, parts), row_product(att.wo.weight, att.wo.bias, parts),
                   row_product(*up, parts), row_product(mlp.w2.weight, mlp.w2.bias, parts), swiglu)

    def _norm(self, x: torch.Tensor, i: int) -> torch.Tensor:
        weight, bias, eps, rms = self.norms[i]
        return rms_norm(x, weight, eps) if rms else F.layer_norm(x, weight.shape, weight, bias, eps)

    def __call__(self, x: torch.Tensor, rope: Optional[torch.Tensor], input_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        H, K, D, nqk = self.H, self.K, self.D, self.nqk
        qkv = one_row(self._norm(x, 0), self.qkv).view(-1)  # [q | k | v]
        qk = qkv[:nqk].view(1, H + K, D)
        if self.rope:
            qk = apply_rope(qk, rope.view(1, 1, -1))  # one position: (1, 1, 2D) whether positions were per sample or not
        k, v = self.attention.kv_cache.update(input_pos, qk[0, H:].view(1, K, 1, D), qkv[nqk:].view(1, K, 1, D))
        y = F.scaled_dot_product_attention(qk[0, :H].view(1, H, 1, D), k[:, :, :kv_len], v[:, :, :kv_len],
                                           enable_gqa=H != K)  # (1, H, 1, D)
        x = x + one_row(y.view(1, 1, H * D), self.wo)
        h = one_row(self._norm(x, 1), self.up)
        if self.swiglu:
            gate, up = h.view(-1).chunk(2)
            h = F.silu(gate, inplace=True).mul_(up).view(1, 1, -1)
        else:
            h = F.gelu(h, approximate="tanh")
        return x + one_row(h, self.down)
