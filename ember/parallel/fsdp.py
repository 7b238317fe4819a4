"""FSDP2 (`fully_shard`) and DDP wrappers for the Transformer.

FSDP2 layout: each block in `model.layers` is one FSDP unit (its parameters are all-gathered together
just before it runs, and freed after it). With untied embeddings, tok_embeddings and output are units
of their own too (large-vocab matrices are then gathered only while used). The root unit owns the
rest (pos_embeddings, norm) and, with tied embeddings, both tok_embeddings and output: the shared
weight lives in one unit and stays one parameter, sharded once.
"""

from __future__ import annotations

import torch
from torch import nn

from ember.parallel.config import ParallelConfig
from ember.parallel.dims import ParallelDims


def fsdp_kwargs(dims: ParallelDims, cfg: ParallelConfig) -> dict:
    """mesh, mixed-precision and offload policies for `fully_shard` from the config."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    kw: dict = {"mesh": dims.fsdp_mesh}
    if cfg.mixed_precision == "bf16":
        # compute in bf16, reduce gradients in fp32, keep fp32 sharded master weights
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cfg.cpu_offload:
        # pin_memory needs an accelerator (it raises on a CPU-only machine)
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.accelerator.is_available())
    return kw


def apply_fsdp(model: nn.Module, dims: ParallelDims, cfg: ParallelConfig, **extra) -> nn.Module:
    """Shard each block, then the root, in place; returns `model` (now also an FSDPModule).

    extra: further `fully_shard` keyword arguments (e.g. a custom `mp_policy`), overriding the config's.
    """
    from torch.distributed.fsdp import fully_shard

    kw = {**fsdp_kwargs(dims, cfg), **extra}
    raf = reshard_after_forward(cfg, dims)
    tied = model.output is not None and model.tok_embeddings is not None and (
        model.output.weight is model.tok_embeddings.weight)
    if model.tok_embeddings is not None and not tied:
        fully_shard(model.tok_embeddings, reshard_after_forward=raf, **kw)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again at once by backward: keep them gathered
        reshard = raf and i < len(blocks) - 1
        fully_shard(block, reshard_after_forward=reshard, **kw)
    if model.output is not None and not tied:
        fully_shard(model.output, reshard_after_forward=False, **kw)  # backward starts here
    fully_shard(model, reshard_after_forward=raf, **kw)
    return model


def reshard_after_forward(cfg: ParallelConfig, dims: ParallelDims) -> bool:
    """The config's choice; unset: True, but False under pipeline parallelism."""
    if cfg.reshard_after_forward is not None:
        return bool(cfg.reshard_after_forward)
    return dims.pp <= 1


def apply_ddp(model: nn.Module, dims: ParallelDims) -> nn.Module:
    """Wrap in DistributedDataParallel (the model must hold real tensors on dims.device)."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [dims.device.index] if dims.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)
