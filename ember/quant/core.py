"""Weight-only quantization: the integer codes, the quantized modules, and swapping them into a model.

Schemes (codes equal torchao's `quant_primitives.choose_qparams_affine` + `quantize_affine` for the same
mapping, block size and range; tests/test_quant.py checks it):

    int8  symmetric, one scale per output channel (block (1, K)), codes in [-128, 127]:
              scale = max|w_row| / 127.5 (clamped at fp32's smallest normal), q = clamp(round(w * (1/scale)), -128, 127)
              w ~ q * scale
    int4  asymmetric with a float zero (torchao's "tinygemm" variant, gpt-fast's int4; the grid of llama.cpp's
          Q4_1), one scale and zero per group of G inputs (block (1, G)), codes in [0, 15], scale and zero fp16:
              scale = fp16((max(w_g) - min(w_g)) / 15), zero = fp16(min(w_g) + 8 * scale),
              q = clamp(round((w - fp16(zero - 8 * scale)) / scale), 0, 15)
              w ~ (q - 8) * scale + zero
          (the zero-preserving integer-zero variant wastes range on one-sided groups and, on a model
          imported from a Q4_1 GGUF, rounds twice: see docs/compression.md)

Storage (what a quantized checkpoint holds per quantized module `name`):

    name.qweight  int8 (N, K)  |  uint8 (N, K/2), two codes per byte (layout in qkernels.c)
    name.scale    float32 (N,) |  float16 (N, K/G)
    name.zero     -            |  float16 (N, K/G)
    name.bias     as the original Linear's (float)

so an int8 file is ~1/4 of fp32 and int4 ~(4 + 32/G)/32 of it (5 bits a weight at G = 32, as Q4_1). The token embedding is quantized the
same way (rows = vocabulary entries); a tied head and embedding share one set of codes.

`QuantLinear` computes F.linear(x, dequantized weight, bias): with the compiled kernels
(kernels.py) for up to KERNEL_MAX_ROWS input rows (decoding), and by dequantizing the weight and one
GEMM for more rows (prefill), unless `rowwise=True` (the batch-invariant engine) asks for the kernels
at every size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ember.quant import kernels

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
KERNEL_MAX_ROWS = 16
_EPS = torch.finfo(torch.float32).smallest_normal


# ------------------------------------------------------------------------------------------- codes
def int8_qparams(w: torch.Tensor) -> torch.Tensor:
    """Per-row scales (N,) of the symmetric int8 scheme."""
    amax = torch.maximum(-w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0))
    return (amax / 127.5).clamp(min=_EPS).float()


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (N, K), scale (N,)) of a float (N, K) weight."""
    w = w.detach().float()
    scale = int8_qparams(w)
    q = torch.clamp(torch.round(w * (1.0 / scale[:, None])), -128, 127).to(torch.int8)
    return q, scale


def int4_qparams(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), (N, K/G) float16 each, of the int4 scheme."""
    N, K = w.shape
    g = w.view(N, K // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=_EPS)
    zero = lo + scale * 8
    return scale.to(torch.float16), zero.to(torch.float16)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 (N, K) in [0, 15] (unpacked), scale (N, K/G) fp16, zero (N, K/G) fp16)."""
    w = w.detach().float()
    N, K = w.shape
    check_group(K, group_size)
    scale, zero = int4_qparams(w, group_size)
    g = w.view(N, K // group_size, group_size)
    lo = (zero - scale * 8).float()[..., None]  # the group's minimum as the fp16 scale and zero give it
    q = torch.clamp(torch.round((g - lo) / scale.float()[..., None]), 0, 15)
    return q.view(N, K).to(torch.uint8), scale, zero


def check_group(K: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size {group_size}: expected one of {list(GROUP_SIZES)}")
    if K % group_size:
        raise ValueError(f"in_features {K} is not a multiple of the group size {group_size}")


def pack_int4(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) codes -> (N, K/2) bytes: in each group, byte j = code j | code (j + G/2) << 4."""
    N, K = q.shape
    g = q.view(N, K // group_size, 2, group_size // 2).to(torch.uint8)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """The inverse of `pack_int4`: (N, K/2) bytes -> (N, K) codes (uint8)."""
    N, half_k = packed.shape
    g = packed.view(N, half_k * 2 // group_size, group_size // 2)
    return torch.stack([g & 0x0F, g >> 4], dim=2).reshape(N, half_k * 2)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    q = unpack_int4(packed, group_size).float()
    N, K = q.shape
    g = q.view(N, K // group_size, group_size)
    return ((g - 8) * scale.float()[..., None] + zero.float()[..., None]).view(N, K)


# ----------------------------------------------------------------------------------------- modules
class QuantLinear(nn.Module):
    """A Linear whose weight is stored quantized (int8 per channel or int4 per group); see the module
    docstring. `weight` is not a parameter: `dequantized()` rebuilds it. Inference only."""

    def __init__(self, in_features: int, out_features: int, method: str, group_size: Optional[int] = None,
                 bias: bool = False, device=None):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"quantization method {method!r}: expected one of {list(METHODS)}")
        self.in_features, self.out_features, self.method = in_features, out_features, method
        self.group_size = group_size if method == "int4" else None
        self.rowwise = False
        N, K = out_features, in_features
        if method == "int8":
            self.register_buffer("qweight", torch.empty(N, K, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.empty(N, dtype=torch.float32, device=device))
            self.zero = None
        else:
            check_group(K, group_size)
            self.register_buffer("qweight", torch.empty(N, K // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scale", torch.empty(N, K // group_size, dtype=torch.float16, device=device))
            self.register_buffer("zero", torch.empty(N, K // group_size, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.empty(N, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Module, method: str, group_size: Optional[int] = None) -> "QuantLinear":
        w = lin.weight
        m = cls(w.shape[1], w.shape[0], method, group_size, bias=getattr(lin, "bias", None) is not None,
                device=w.device)
        m.set_weight(w)
        if m.bias is not None:
            m.bias.data = lin.bias.detach().clone().float()
        return m

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        if self.method == "int8":
            q, s = quantize_int8(w)
            self.qweight, self.scale = q.contiguous(), s.contiguous()
        else:
            q, s, z = quantize_int4(w, self.group_size)
            self.qweight = pack_int4(q, self.group_size).contiguous()
            self.scale, self.zero = s.contiguous(), z.contiguous()

    def dequantized(self) -> torch.Tensor:
        """The (N, K) float32 weight the codes stand for."""
        if self.method == "int8":
            return dequantize_int8(self.qweight, self.scale)
        return dequantize_int4(self.qweight, self.scale, self.zero, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, K = x.shape[:-1], x.shape[-1]
        rows = x.numel() // K
        use_kernel = (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
                      and (rows <= KERNEL_MAX_ROWS or self.rowwise) and kernels.available())
        if not use_kernel:
            if (self.method == "int8" and x.device.type == "cpu" and rows <= KERNEL_MAX_ROWS
                    and x.dtype == torch.float32 and self.bias is None and not torch.is_grad_enabled()):
                return torch._weight_int8pack_mm(x.reshape(rows, K), self.qweight, self.scale).view(*lead, -1)
            return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        x2 = x.reshape(rows, K).contiguous()
        if self.method == "int8":
            y = kernels.q8_linear(x2, self.qweight, self.scale, self.bias)
        else:
            y = kernels.q4_linear(x2, self.qweight, self.scale, self.zero, self.bias, self.group_size)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}{g}"


class QuantEmbedding(nn.Module):
    """An embedding whose table is quantized per row, or that reads the rows of a tied head's codes."""

    def __init__(self, table: QuantLinear):
        super().__init__()
        self.table = table  # a submodule: this embedding owns (and saves) its codes; `tied` builds the other kind
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    @classmethod
    def tied(cls, head: QuantLinear) -> "QuantEmbedding":
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        object.__setattr__(m, "table", head)  # not a submodule: the head owns (and saves) the codes
        m.num_embeddings, m.embedding_dim = head.out_features, head.in_features
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t, flat = self.table, ids.reshape(-1)
        if t.method == "int8":
            rows = t.qweight[flat].float() * t.scale[flat, None]
        else:
            rows = dequantize_int4(t.qweight[flat], t.scale[flat], t.zero[flat], t.group_size)
        return rows.view(*ids.shape, -1)


# ------------------------------------------------------------------------------------ the model swap
@dataclass
class QuantSpec:
    """What a quantized checkpoint records in ember.json ("quant"): enough to rebuild its modules."""

    method: str
    group_size: Optional[int] = None
    modules: list[str] = field(default_factory=list)  # Linear names swapped for QuantLinear
    embedding: bool = True  # tok_embeddings quantized (tied: it reads output's codes)
    tied: bool = False

    def to_dict(self) -> dict:
        return {"method": self.method, "group_size": self.group_size, "modules": list(self.modules),
                "embedding": self.embedding, "tied": self.tied}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        spec = cls(method=d["method"], group_size=d.get("group_size"), modules=list(d.get("modules", [])),
                   embedding=bool(d.get("embedding", True)), tied=bool(d.get("tied", False)))
        if spec.method not in METHODS:
            raise ValueError(f"quant.method {spec.method!r}: expected one of {list(METHODS)}")
        if spec.method == "int4" and spec.group_size not in GROUP_SIZES:
            raise ValueError(f"quant.group_size {spec.group_size!r}: int4 needs one of {list(GROUP_SIZES)}")
        return spec


def linear_names(model: nn.Module, skip: Iterable[str] = ()) -> list[str]:
    """Names of the model's nn.Linear modules (the head included), minus those matching `skip` suffixes."""
    skip = tuple(skip)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not (skip and n.endswith(skip))]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, group_size: Optional[int] = None,
                   skip: Iterable[str] = (), embedding: bool = True) -> QuantSpec:
    """Swap `model`'s Linears (and its token embedding) for quantized ones, in place; returns the spec.

    int4 leaves a Linear whose in_features is not a multiple of `group_size` in float (listed out of
    `spec.modules`). A tied embedding is quantized only with its head (they share the codes). The model is left in eval mode (quantized modules are inference only)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {list(METHODS)}")
    if method == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"int4 needs --group-size in {list(GROUP_SIZES)}, got {group_size}")
    tied = (getattr(model, "tok_embeddings", None) is not None and getattr(model, "output", None) is not None
            and model.output.weight is model.tok_embeddings.weight)
    names = []
    for name in linear_names(model, skip):
        lin = model.get_submodule(name)
        if method == "int4" and lin.in_features % group_size:
            continue
        _set(model, name, QuantLinear.from_linear(lin, method, group_size))
        names.append(name)
    emb = getattr(model, "tok_embeddings", None)
    do_emb = (embedding and emb is not None and not (method == "int4" and emb.embedding_dim % group_size)
              and not (tied and "output" not in names))  # a float tied head keeps its float embedding
    if do_emb:
        if tied:
            model.tok_embeddings = QuantEmbedding.tied(model.output)
        else:
            table = QuantLinear(emb.embedding_dim, emb.num_embeddings, method, group_size, device=emb.weight.device)
            table.set_weight(emb.weight)
            model.tok_embeddings = QuantEmbedding(table)
    return QuantSpec(method, group_size if method == "int4" else None, names, do_emb, bool(tied and do_emb))


def prepare_quantized(model: nn.Module, spec: QuantSpec) -> None:
    """Give a freshly built (e.g. meta) model the empty quantized modules `spec` describes, so that a
    quantized state dict loads into it (`load_state_dict(assign=True)`)."""
    device = next(model.parameters()).device
    for name in spec.modules:
        lin = model.get_submodule(name)
        _set(model, name, QuantLinear(lin.in_features, lin.out_features, spec.method, spec.group_size,
                                      bias=lin.bias is not None, device=device))
    if spec.embedding:
        emb = model.tok_embeddings
        if spec.tied:
            model.tok_embeddings = QuantEmbedding.tied(model.output)
        else:
            model.tok_embeddings = QuantEmbedding(QuantLinear(emb.embedding_dim, emb.num_embeddings, spec.method,
                                                              spec.group_size, device=device))


def set_rowwise(model: nn.Module, on: bool = True) -> int:
    """Make every QuantLinear use the (batch-invariant) kernels at every row count; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.rowwise, n = on, n + 1
    return n


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer (shared tensors once): the weights a checkpoint stores."""
    seen, total = set(), 0
    for t in list(model.state_dict(keep_vars=True).values()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
