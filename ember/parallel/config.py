"""ParallelConfig: how a built model is made parallel (data parallelism, precision, memory, compile).

One dataclass for one concern; a recipe config nests it as `parallel` (`--parallel.data-parallel fsdp`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ParallelConfig:
    """Data parallelism, mixed precision, activation checkpointing and torch.compile."""

    data_parallel: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    """auto: none on 1 process, fsdp on more; ddp: DistributedDataParallel (full replicas);
    fsdp: FSDP2 fully_shard (parameters, gradients and optimizer state sharded). On 1 process every
    mode is 'none'."""
    reshard_after_forward: bool = True
    """FSDP2 only. True: free the gathered parameters after each block's forward and gather them
    again for backward (ZeRO-3-like, least memory). False: keep them until backward (ZeRO-2-like,
    one all-gather per step less, more memory)."""
    mixed_precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute dtype. fp32: everything fp32 (use this on CPU: bf16/fp16 GEMMs are very slow there).
    bf16: FSDP2 MixedPrecisionPolicy (bf16 params in compute, fp32 gradient reduction, fp32 master
    weights), else torch.autocast(bf16). fp16: torch.autocast(fp16) with fp32 params plus a GradScaler
    (also under FSDP2, whose DTensor gradients the scaler handles)."""
    cpu_offload: bool = False
    """FSDP2 only: keep sharded parameters, gradients and optimizer state in CPU memory
    (CPUOffloadPolicy; the optimizer step runs on CPU). Memory pinning is used only when an
    accelerator exists."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute activations in backward to save memory. full: each block's forward is recomputed;
    selective: recompute everything but matmul and attention outputs (saved). Parameter names are
    unchanged."""
    compile: bool = False
    """torch.compile each Transformer block in place (`block.compile()`; parameter names unchanged).
    The first steps are slow while it compiles (tens of seconds); the loss function is not compiled."""
