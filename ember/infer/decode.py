"""CPU decode kernels of the inference engine: weight layouts, split GEMV, and the batch-1 block step.

The model classes (ember/models) stay plain PyTorch; this module reaches them only from outside:
`pack_for_decode` re-lays weights in place, and the engine (infer/engine.py) runs its steps through
the products defined here and, for one sequence decoding one token, through each block's `BlockDecoder`.

Weight layouts for fast decoding on CPU: `pack_for_decode(model)`, in place, with no extra memory.

At batch 1 a decode step is a chain of matrix-vector products, bound by how fast the weights stream
from memory, and on CPU (MKL sgemv) the layout of each weight decides that speed: wide weights
(out > in: q|k|v, fc/up, the head) stream faster column-major, narrow ones (proj, down) row-major
(bench/decode.py prints the rates it reaches). So `pack_for_decode` stores every WIDE weight column-major: the Parameter keeps its shape
(out, in) and becomes a transposed view of an (in, out) buffer, and `F.linear` then runs x @ buffer.
Weights that share an input are packed side by side into one buffer, q | k | v and a SwiGLU's
gate | up, so a single GEMV reads them (`fused_weight` returns the (N, C) view over the group):

    buffer (C, Nq + Nk + Nv):   [ wq^T | wk^T | wv^T ]      wq.weight = buffer[:, :Nq].t()  ...

Everything that reads parameters keeps working (they are views with the usual shapes): loading a
state dict copies into the views, checkpoints save contiguous copies, and training still computes
correct gradients (the fused view is used only with autograd off). A tied head is the embedding, so
the embedding becomes column-major too: a row lookup is then a strided gather (small next to the
prefill itself). `unpack(model)` restores contiguous row-major
weights (training is faster with them). Only plain `nn.Linear`s on CPU are touched; LoRA-wrapped,
quantized, hooked or DTensor (sharded) weights are left alone.

`split_linear` / `decode_linear` then run each of these few-row products as a bmm over slices of the
weight, so every core streams its own part (see `split_linear`). The engine packs when it runs at
most PACK_MAX_SEQS sequences and is not batch-invariant (`ember generate` with one prompt, `ember
chat`), and keeps the row-major layout otherwise (the column-major head is slower for larger
batches); it prepares the packed views, the weight slices (`row_product`) and each block's
`BlockDecoder` once. bench/decode.py measures what each of these buys.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ember.models.layers import Attention, Block, GeluMLP, RMSNorm, SwiGLU, apply_rope, plain_linear, rms_norm

PACK_MAX_SEQS = 2  # the packed layout pays for this many rows per product at most


def _is_column_major(w: torch.Tensor) -> bool:
    return w.dim() == 2 and w.shape[0] > 1 and w.stride() == (1, w.shape[0])


def _owned_groups(model: nn.Module) -> list[tuple[nn.Module, list[nn.Linear]]]:
    """(owner, linears to pack together): q|k|v of each Attention, gate|up (w1|w3) of each SwiGLU."""
    out = []
    for mod in model.modules():
        if isinstance(mod, Attention):
            out.append((mod, [mod.wq, mod.wk, mod.wv]))
        elif isinstance(mod, SwiGLU):
            out.append((mod, [mod.w1, mod.w3]))
    return out


def _groups(model: nn.Module) -> list[list[nn.Linear]]:
    return [group for _, group in _owned_groups(model)]


def _side_by_side(tensors: Sequence[torch.Tensor], widths: Sequence[int], compiling: bool) -> bool:
    """Whether each tensor starts where the previous one's `width` columns end, in one storage."""
    t0, col = tensors[0], 0
    for t, width in zip(tensors, widths):
        if t.storage_offset() != t0.storage_offset() + col:
            return False
        if not compiling and t.data_ptr() != t0.data_ptr() + col * t.element_size():  # data_ptr: untraceable
            return False
        col += width
    return True


def fused_weight(linears: Sequence[nn.Module]) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """The (N, C) weight and (N,) bias of the concatenated outputs of `linears` as views of their
    shared buffer, if `pack_for_decode` laid them out side by side (and nothing has moved them since:
    a `.to()`, a new Parameter or a swapped module makes this None). Costs a few microseconds."""
    if not all(plain_linear(m) for m in linears):
        return None
    widths = [m.out_features for m in linears]
    n, compiling = sum(widths), torch.compiler.is_compiling()
    weights = [m.weight for m in linears]
    w0 = weights[0]
    if (w0.device.type != "cpu" or any(w.stride() != (1, n) for w in weights)
            or not _side_by_side(weights, widths, compiling)):
        return None
    weight = torch.as_strided(w0, (n, w0.shape[1]), (1, n), w0.storage_offset())
    biases = [m.bias for m in linears]
    if biases[0] is None:
        return weight, None
    if any(b is None for b in biases) or not _side_by_side(biases, widths, compiling):
        return None
    return weight, torch.as_strided(biases[0], (n,), (1,), biases[0].storage_offset())


@torch.no_grad()
def _pack_group(linears: list[nn.Linear]) -> bool:
    if fused_weight(linears) is not None:
        return False
    ws = [m.weight for m in linears]
    C = ws[0].shape[1]
    if any(w.shape[1] != C or w.dtype != ws[0].dtype for w in ws):
        return False
    n = sum(w.shape[0] for w in ws)
    buf = torch.empty(C, n, dtype=ws[0].dtype, device=ws[0].device)  # (C, N): column-major (N, C)
    col = 0
    for m in linears:
        k = m.out_features
        buf[:, col: col + k].copy_(m.weight.t())
        m.weight.data = buf[:, col: col + k].t()
        col += k
    if all(m.bias is not None for m in linears):
        bbuf = torch.cat([m.bias for m in linears])
        col = 0
        for m in linears:
            m.bias.data = bbuf[col: col + m.out_features]
            col += m.out_features
    return True


def pack_for_decode(model: nn.Module) -> int:
    """Lay `model`'s CPU weights out for batch-1 decoding (see the module docstring); idempotent.

    Returns how many weights were re-laid (0 when already packed, or nothing applies). Runs outside
    inference mode so the model stays trainable afterwards.
    """
    changed = 0
    with torch.inference_mode(False), torch.no_grad():
        grouped = set()
        for group in _groups(model):
            if all(plain_linear(m) and m.weight.device.type == "cpu" for m in group):
                changed += len(group) if _pack_group(group) else 0
                grouped.update(id(m) for m in group)
        for m in model.modules():
            if id(m) in grouped or not plain_linear(m) or m.weight.device.type != "cpu":
                continue
            w = m.weight
            if m.out_features > m.in_features and not _is_column_major(w):
                w.data = w.t().contiguous().t()  # a tied head re-lays the embedding it shares: once
                changed += 1
    return changed


def unpack(model: nn.Module) -> int:
    """Give every non-contiguous parameter its own contiguous row-major storage again; returns how many."""
    changed = 0
    with torch.inference_mode(False), torch.no_grad():
        for p in model.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
                changed += 1
    return changed


class BlockDecoder:
    """`Block.forward` for ONE token of ONE sequence with a KV cache, written for the fewest ops.

    A batch-1 decode step on CPU is memory-bound GEMVs plus ~50 small ops per layer, each costing a
    few microseconds of dispatch and Python; on a 30-layer model the small ops took as long as the
    weight reads. This is the same arithmetic as the modules (same kernels, same order: results
    match them to float rounding, tests/test_infer_decode.py) with everything that does not
    change between steps done once, in `build`: weight slices for the split GEMV (`one_row`), the
    packed q|k|v and gate|up views, head counts, norm parameters. No module calls, no transposes:
    a one-token query is already laid out as (1, H, 1, D).

    Built by the engine for blocks whose weights are packed and plain; used only with autograd off, in
    eval mode, for x of shape (1, 1, C).
    """

    def __init__(self, block: Block, qkv: tuple, wo: tuple, up: tuple, down: tuple, swiglu: bool):
        att = block.attention
        self.norms = [(n.weight, getattr(n, "bias", None), n.eps, isinstance(n, RMSNorm))
                      for n in (block.attention_norm, block.ffn_norm)]
        self.qkv, self.wo, self.up, self.down, self.swiglu = qkv, wo, up, down, swiglu
        self.H = att.wq.out_features // att.head_dim
        self.K = att.wk.out_features // att.head_dim
        self.D, self.rope = att.head_dim, att.rope
        self.nqk = att.wq.out_features + att.wk.out_features

    @classmethod
    def build(cls, block: Block, parts: int, fused: Optional[dict] = None) -> Optional["BlockDecoder"]:
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
        fused = fused or {}
        qkv = fused.get(id(att)) or fused_weight([att.wq, att.wk, att.wv])
        up = (fused.get(id(mlp)) or fused_weight([mlp.w1, mlp.w3])) if swiglu else (mlp.w1.weight, mlp.w1.bias)
        if qkv is None or up is None:
            return None
        return cls(block, row_product(*qkv, parts), row_product(att.wo.weight, att.wo.bias, parts),
                   row_product(*up, parts), row_product(mlp.w2.weight, mlp.w2.bias, parts), swiglu)

    def _row(self, x: torch.Tensor, rp: RowProduct) -> torch.Tensor:
        return one_row(x, rp)

    def _norm(self, x: torch.Tensor, i: int) -> torch.Tensor:
        weight, bias, eps, rms = self.norms[i]
        return rms_norm(x, weight, eps) if rms else F.layer_norm(x, weight.shape, weight, bias, eps)

    def __call__(self, x: torch.Tensor, rope: Optional[torch.Tensor],
                 kv: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """x (1, 1, C) -> (1, 1, C). `kv(k, v)` stores this token's k, v (1, K, 1, D) and returns every key
        and value the token attends to, (1, K, S, D) each (the engine's paged cache)."""
        H, K, D, nqk = self.H, self.K, self.D, self.nqk
        qkv = self._row(self._norm(x, 0), self.qkv).view(-1)  # [q | k | v]
        qk = qkv[:nqk].view(1, H + K, D)
        if self.rope:
            qk = apply_rope(qk, rope.view(1, 1, -1))  # one position: (1, 1, 2D)
        k, v = kv(qk[0, H:].view(1, K, 1, D), qkv[nqk:].view(1, K, 1, D))
        y = F.scaled_dot_product_attention(qk[0, :H].view(1, H, 1, D), k, v, enable_gqa=H != K)  # (1, H, 1, D)
        x = x + self._row(y.view(1, 1, H * D), self.wo)
        h = self._row(self._norm(x, 1), self.up)
        if self.swiglu:
            gate, up = h.view(-1).chunk(2)
            h = F.silu(gate, inplace=True).mul_(up).view(1, 1, -1)
        else:
            h = F.gelu(h, approximate="tanh")
        return x + self._row(h, self.down)


class QuantBlockDecoder(BlockDecoder):
    """`BlockDecoder` for a block whose Linears are ember.quant `QuantLinear`s (a quantized checkpoint): the
    same step, with q|k|v and gate|up each ONE kernel call over codes laid side by side (`fuse_quant`:
    the modules' own buffers become row views of the fused ones, so nothing is copied twice)."""

    def _row(self, x: torch.Tensor, m) -> torch.Tensor:  # m: a QuantLinear (the kernels at one row)
        return m(x)

    @classmethod
    def build(cls, block: Block, parts: int = 0, fused: Optional[dict] = None) -> Optional["QuantBlockDecoder"]:
        from ember.quant import QuantLinear, kernels

        att, mlp = block.attention, block.feed_forward
        swiglu = type(mlp) is SwiGLU
        if type(mlp) not in (SwiGLU, GeluMLP) or type(att) is not Attention or not kernels.available():
            return None
        if not all(type(n) in (RMSNorm, nn.LayerNorm) and n.weight is not None
                   for n in (block.attention_norm, block.ffn_norm)):
            return None
        grouped = [att.wq, att.wk, att.wv] + ([mlp.w1, mlp.w3] if swiglu else [mlp.w1])
        if not all(isinstance(m, QuantLinear) and m.qweight.device.type == "cpu" for m in grouped):
            return None
        if not all(isinstance(m, QuantLinear) or plain_linear(m) for m in (att.wo, mlp.w2)):
            return None  # (int4 leaves a Linear whose width its groups do not divide in float: that is fine)
        qkv = fuse_quant([att.wq, att.wk, att.wv])
        up = fuse_quant([mlp.w1, mlp.w3]) if swiglu else mlp.w1
        if qkv is None or up is None:
            return None
        return cls(block, qkv, att.wo, up, mlp.w2, swiglu)


def fuse_quant(linears: Sequence[nn.Module]):
    """One QuantLinear computing the concatenated outputs of `linears` (same input, method and groups), whose
    buffers the originals then view; None when they do not match."""
    from ember.quant import QuantLinear

    m0 = linears[0]
    if any(m.method != m0.method or m.group_size != m0.group_size or m.in_features != m0.in_features
           or (m.bias is None) != (m0.bias is None) for m in linears):
        return None
    fused = QuantLinear(m0.in_features, sum(m.out_features for m in linears), m0.method, m0.group_size,
                        bias=m0.bias is not None)
    with torch.no_grad():
        names = ["qweight", "scale"] + (["zero"] if m0.zero is not None else [])
        for name in names:
            setattr(fused, name, torch.cat([getattr(m, name) for m in linears]).contiguous())
        if m0.bias is not None:
            fused.bias = nn.Parameter(torch.cat([m.bias for m in linears]), requires_grad=False)
        row = 0
        for m in linears:
            n = m.out_features
            for name in names:
                setattr(m, name, getattr(fused, name)[row: row + n])
            if m.bias is not None:
                m.bias = nn.Parameter(fused.bias[row: row + n], requires_grad=False)
            row += n
    return fused


def is_packed(model: nn.Module) -> bool:
    """Whether `pack_for_decode` has laid out (at least) the first attention's q|k|v."""
    groups = _groups(model)
    return bool(groups) and fused_weight(groups[0]) is not None


# ------------------------------------------------------------------ split GEMV for small batches
SPLIT_MAX_ROWS = 16  # inputs with more rows (prefill, training) are GEMMs: MKL threads those well


def split_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 parts: Optional[int] = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for a few rows of x on CPU, as `parts` independent GEMVs in one bmm.

    MKL's sgemv runs a (1, C) x (C, N) product on one core at a time, while bmm hands each of its
    batch items to its own thread. Splitting the N outputs into `parts` (default: the intra-op thread
    count) slices of the weight, each a view (row slices of a row-major weight, column slices of a
    column-major one), streams the weight with every core. No weight is copied; a remainder of
    N % parts outputs takes one more small product.
    """
    P = parts or torch.get_num_threads()
    N, C = weight.shape
    n = _split_width(N, P)
    if not n:
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    M = x.numel() // C
    slices = _slices(weight, P, n)
    xs = x.reshape(1, M, C).expand(P, M, C)
    if N == P * n:  # no remainder: one (bias-fused) bmm, its (P, M, n) output is already in order for M = 1
        out = (torch.bmm(xs, slices) if bias is None
               else torch.baddbmm(bias.view(P, 1, n), xs, slices))
        if M > 1:
            out = out.permute(1, 0, 2).reshape(M, N)
        return out.view(*lead, N)
    x2 = x.reshape(M, C)
    if M == 1:
        out = torch.empty(1, N, dtype=x.dtype, device=x.device)
        torch.bmm(xs, slices, out=out[:, : P * n].view(P, 1, n))
        torch.mm(x2, weight[P * n:].t(), out=out[:, P * n:])
    else:
        out = torch.bmm(xs, slices).permute(1, 0, 2).reshape(M, P * n)
        out = torch.cat([out, x2 @ weight[P * n:].t()], dim=1)
    if bias is not None:
        out += bias
    return out.view(*lead, N)


def _split_width(N: int, P: int) -> int:
    """Outputs per slice when N outputs split over P threads, or 0 where a split does not pay (slices < 64 wide)."""
    n = N // P
    return n if P >= 2 and n >= 64 else 0


def _slices(weight: torch.Tensor, P: int, n: int) -> torch.Tensor:
    """(P, C, n) view: slices[p] = weight[p*n : (p+1)*n].t(); one as_strided whatever the layout
    (column-major: row-major (C, n) blocks with leading dimension N; row-major: transposed blocks)."""
    s0, s1 = weight.stride()
    return weight.as_strided((P, weight.shape[1], n), (n * s0, s1, s0))


RowProduct = tuple  # (slices (P, C, n) or None, weight (N, C), bias (N,) or None, bias as (P, 1, n) or None)


def row_product(weight: torch.Tensor, bias: Optional[torch.Tensor], parts: int) -> RowProduct:
    """What `one_row` needs to run F.linear(x, weight, bias) for ONE row x with the least work per call:
    the weight slices and the bias view precomputed (when the outputs divide evenly over `parts`)."""
    N, _ = weight.shape
    n = _split_width(N, parts)
    if not n or N != parts * n:
        return None, weight, bias, None
    return _slices(weight, parts, n), weight, bias, None if bias is None else bias.view(parts, 1, n)


def one_row(x: torch.Tensor, rp: RowProduct) -> torch.Tensor:
    """x (1, 1, C) through a `row_product`: one (bias-fused) bmm, output (1, 1, N)."""
    slices, weight, bias, bias3 = rp
    if slices is None:  # nothing precomputed: what the modules run (a split with a remainder, or F.linear)
        return decode_fused(x, weight, bias)
    xs = x.view(1, 1, -1).expand(slices.shape[0], 1, slices.shape[1])
    out = torch.bmm(xs, slices) if bias3 is None else torch.baddbmm(bias3, xs, slices)
    return out.view(1, 1, -1)


def decode_linear(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """m(x), through `split_linear` when that is faster: a plain Linear on CPU, autograd off, few rows."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or not plain_linear(m):
        return m(x)
    return decode_fused(x, m.weight, m.bias)


def decode_fused(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear(x, weight, bias) on CPU, through `split_linear` when x has at most SPLIT_MAX_ROWS rows."""
    if x.numel() > SPLIT_MAX_ROWS * x.shape[-1] or torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    return split_linear(x, weight, bias)
