"""QLoRA: the frozen base's block linears stored as NF4 (4-bit NormalFloat, arXiv:2305.14314) via torchao.

    quantize_base_nf4(model)     every Linear inside the blocks (adapted or not) gets an NF4 weight:
                                 0.5 byte per weight + a double-quantized scale per 64 (~0.52 B/param);
                                 embeddings, norms and the head stay as they are. Adapters stay fp32.

The NF4 codes are torchao's own (`torchao.quantization.to_nf4`, block 64, scales double-quantized in
blocks of 256), and products go through its `linear_nf4` (dequantize in the kernel, gradients flow
to the input, none to the frozen weight). `dequantized_copy(weight)` is the weight the adapter was
trained against: merging a QLoRA adapter adds to that, not to the original full-precision weight.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

BLOCK, SCALER_BLOCK = 64, 256


def _nf4():
    try:
        with warnings.catch_warnings():  # torchao's import warns about CUDA extensions on CPU machines
            warnings.simplefilter("ignore")
            from torchao.quantization import to_nf4
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, linear_nf4
    except ImportError as e:
        from ember.errors import EmberError

        raise EmberError(f"--quant nf4 needs torchao ({e}). HINT: pip install 'torchao>=0.16'") from None
    return to_nf4, NF4Tensor, linear_nf4


def is_nf4(t: torch.Tensor) -> bool:
    return type(t).__name__ == "NF4Tensor"


class NF4Linear(nn.Linear):
    """A frozen Linear whose weight is an NF4Tensor (a base linear QLoRA did not adapt)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight, self.bias)


def nf4_linear(x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    if not is_nf4(weight):
        return F.linear(x, weight, bias)
    y = _nf4()[2](x, weight)
    return y + bias if bias is not None else y


def quantize_base_nf4(model: nn.Module) -> int:
    """Store every block Linear's weight as NF4 (frozen); returns how many. Call after apply_lora."""
    to_nf4 = _nf4()[0]
    n = 0
    for name, mod in list(model.named_modules()):
        if not name.startswith("layers.") or not isinstance(mod, nn.Linear) or is_nf4(mod.weight):
            continue
        if mod.weight.numel() % BLOCK:
            raise ValueError(f"quantize_base_nf4: {name} has shape {tuple(mod.weight.shape)}; NF4 blocks need a "
                             f"weight size divisible by {BLOCK}")
        q = to_nf4(mod.weight.detach().float(), block_size=BLOCK, scaler_block_size=scaler_block(mod.weight))
        mod.weight = nn.Parameter(q, requires_grad=False)
        if mod.bias is not None:
            mod.bias.requires_grad_(False)
        if type(mod) is nn.Linear:
            mod.__class__ = NF4Linear
        n += 1
    return n


def scaler_block(w: torch.Tensor) -> int:
    """Scales double-quantized in blocks of 256 (QLoRA's choice), or the largest power-of-two divisor of the
    scale count below it (torchao needs the count divisible: 576 x 576 has 5184 scales -> blocks of 64)."""
    return math.gcd(w.numel() // BLOCK, SCALER_BLOCK)


def dequantized_copy(weight: torch.Tensor) -> torch.Tensor:
    """The full-precision weight an NF4 weight stands for (what the adapter was trained against)."""
    return weight.get_original_weight() if is_nf4(weight) else weight.detach().clone()


def nf4_round_trip(w: torch.Tensor) -> torch.Tensor:
    """w quantized to NF4 and back: the base a QLoRA run sees, in full precision."""
    to_nf4 = _nf4()[0]
    return to_nf4(w.detach().float(), block_size=BLOCK, scaler_block_size=scaler_block(w)).get_original_weight()


def nf4_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes, parameters) of the NF4 weights in the model (codes, scales and their scales)."""
    total = params = 0
    for p in model.parameters():
        if is_nf4(p):
            inner, _ = p.__tensor_flatten__()
            total += sum(getattr(p, k).numel() * getattr(p, k).element_size() for k in inner if k != "nf4")
            params += p.numel()
    return total, params


def dequantized_base(state_dict: dict) -> dict:
    """A full-precision state dict as a QLoRA run sees it: every block linear's weight (the 2-D `layers.*`
    weights, what `quantize_base_nf4` quantizes) NF4 round-tripped, everything else as it is."""
    return {k: nf4_round_trip(v).to(v.dtype) if k.startswith("layers.") and k.endswith(".weight") and v.dim() == 2
            else v for k, v in state_dict.items()}
