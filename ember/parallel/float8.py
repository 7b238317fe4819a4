"""float8 training through torchao (`torchao.float8.convert_to_float8_training`).

Every block's linear layers become `Float8Linear`: inputs, weights and gradients are cast to float8
(e4m3 forward, e5m2 gradients) with scales per tensor ("tensorwise") or per row ("rowwise") and
multiplied by float8 GEMMs (H100-class GPUs). The head stays in high precision (its logits feed the
loss), and so does any layer whose dimensions are not multiples of 16 (the float8 GEMM's tile).
Under FSDP2 with tensorwise scales the parameters are all-gathered in float8 (half the bytes of bf16).
On a CPU, or a GPU without float8 GEMMs, torchao emulates the casts and GEMMs: numerically a float8
run, slowly; useful only to check that a configuration works.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ember.errors import EmberError


def float8_supported(device: torch.device) -> bool:
    """True where float8 GEMMs run natively (CUDA compute capability >= 8.9)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def apply_float8(model: nn.Module, recipe: str, device: torch.device, fsdp: bool) -> int:
    """Swap the blocks' nn.Linear layers for torchao Float8Linear in place; returns how many were swapped.
    `recipe` is one of config.FLOAT8_RECIPES (parallelize.check_config validates the config's value)."""
    if recipe == "none":
        return 0
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise EmberError("--parallel.float8 needs torchao. HINT: pip install torchao") from None
    cfg = Float8LinearConfig.from_recipe_name(recipe)
    cfg = dataclasses.replace(cfg, emulate=not float8_supported(device),
                              enable_fsdp_float8_all_gather=fsdp and recipe == "tensorwise")
    swapped = []

    def keep(mod: nn.Module, fqn: str) -> bool:
        ok = (isinstance(mod, nn.Linear) and fqn.startswith("layers.")
              and mod.in_features % 16 == 0 and mod.out_features % 16 == 0)
        if ok:
            swapped.append(fqn)
        return ok

    convert_to_float8_training(model, config=cfg, module_filter_fn=keep)
    return len(swapped)
