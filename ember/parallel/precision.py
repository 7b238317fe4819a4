"""Mixed precision: the autocast context and GradScaler matching a ParallelConfig.

    fp32   nothing
    bf16   FSDP2: MixedPrecisionPolicy (set by parallelize; no autocast). none/DDP: torch.autocast(bf16)
    fp16   torch.autocast(fp16) with fp32 parameters + torch.amp.GradScaler (DDP, none and FSDP2: the
           scaler's inf check on DTensor gradients is all-reduced across ranks by DTensor)

Under the bf16 MixedPrecisionPolicy the logits come out in bf16: compute the loss in fp32
(`logits.float()`).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch

from ember.parallel.config import ParallelConfig
from ember.parallel.dims import ParallelDims
from ember.parallel.parallelize import resolve_data_parallel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(dims: ParallelDims, cfg: ParallelConfig) -> ContextManager:
    """torch.autocast for the forward pass (and loss), or a no-op context when none is needed."""
    if cfg.mixed_precision == "fp32":
        return contextlib.nullcontext()
    if cfg.mixed_precision == "bf16" and resolve_data_parallel(cfg, dims) == "fsdp":
        return contextlib.nullcontext()  # FSDP2's MixedPrecisionPolicy casts the parameters instead
    return torch.autocast(device_type=dims.device.type, dtype=DTYPES[cfg.mixed_precision])


def make_grad_scaler(dims: ParallelDims, cfg: ParallelConfig) -> Optional["torch.amp.GradScaler"]:
    """A GradScaler for fp16 (scale the loss, `scaler.unscale_(opt)` before clipping, `scaler.step(opt)`,
    `scaler.update()`); None otherwise."""
    if cfg.mixed_precision != "fp16":
        return None
    return torch.amp.GradScaler(dims.device.type)
