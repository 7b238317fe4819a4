"""parallelize(model, dims, cfg) and materialize(model, dims, seed): a built model -> a parallel one.

The order is fixed (torchtitan's): TP (parallel/tp.py) -> activation checkpointing -> compile -> FSDP or DDP.
A model built on the meta device stays on meta through `parallelize` (FSDP shards meta tensors, which
costs no memory); `materialize` then allocates and initialises it. `materialize` gives every rank,
sharded or not, exactly the weights a single process gets from `init_weights(seed)`, so the losses of
a 1-process and an N-process run can be compared bit for bit.

    with torch.device("meta"):
        model = Transformer(cfg)
    model = parallelize(model, dims, pcfg)   # may return a wrapper (DDP); use unwrap(model) for the module
    materialize(model, dims, seed=0)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ember.errors import EmberError
from ember.log import log, warn
from ember.parallel.ac import apply_activation_checkpointing
from ember.parallel.config import FLOAT8_RECIPES, PP_SCHEDULES, ParallelConfig
from ember.parallel.dims import ParallelDims
from ember.parallel.fsdp import apply_ddp, apply_fsdp, reshard_after_forward

# above this many parameters `materialize` of a sharded model does not build a full CPU copy to
# initialise from: each rank initialises its own shards (valid, but not equal to a 1-process init)
FULL_INIT_MAX_PARAMS = 2_000_000_000


_CHOICES = {"data_parallel": ("auto", "none", "ddp", "fsdp"), "mixed_precision": ("fp32", "bf16", "fp16"),
            "pp_schedule": PP_SCHEDULES, "float8": FLOAT8_RECIPES,
            "activation_checkpointing": ("none", "full", "selective")}


def check_config(cfg: ParallelConfig) -> None:
    """Raise EmberError for a value outside a field's choices (YAML files are not checked by tyro)."""
    for name, choices in _CHOICES.items():
        value = getattr(cfg, name)
        if value not in choices:
            raise EmberError(f"parallel.{name}={value!r}: expected one of {', '.join(choices)}. "
                             f"HINT: --parallel.{name.replace('_', '-')} {choices[0]}")


def resolve_data_parallel(cfg: ParallelConfig, dims: ParallelDims) -> str:
    """The data-parallel mode actually used: "none", "ddp" or "fsdp" (FSDP2 over dims.fsdp_mesh, which is
    HSDP when dp_replicate > 1; plain replicas with tensor parallelism are FSDP2 over the replicate
    dimension with shard degree 1, as DDP does not take DTensor parameters). Without tensor parallelism
    "ddp" is DDP over every data-parallel process."""
    check_config(cfg)
    if dims.dp_size == 1 or cfg.data_parallel == "none":
        return "none"
    if dims.tp > 1 or dims.pp > 1:
        return "fsdp"  # replicas of tensor-parallel DTensors / pipeline parts: FSDP2 on the (dp_replicate, dp_shard) mesh
    return "ddp" if cfg.data_parallel == "ddp" else "fsdp"


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself: strips DDP's `.module` and torch.compile's `_orig_mod` (FSDP2 adds no wrapper)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def is_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def is_sharded(model: nn.Module) -> bool:
    """True when the parameters are DTensors (FSDP2 / TP)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place (`Module.compile`: names and state-dict keys unchanged)."""
    for block in model.layers.values():
        block.compile()


def parallelize(model: nn.Module, dims: ParallelDims, cfg: ParallelConfig, loss_parallel: bool = True) -> nn.Module:
    """Apply TP, AC, compile and FSDP/DDP to a built model (on meta or materialized); returns the model to train.

    loss_parallel=False keeps a tensor-parallel LM head's logits gathered (objectives other than
    next-token cross-entropy read whole logits).
    With DDP the result is a DistributedDataParallel wrapper (`unwrap` gives the Transformer); with FSDP2
    and none it is `model` itself, changed in place.
    """
    mode = resolve_data_parallel(cfg, dims)
    if cfg.mixed_precision != "fp32" and dims.device.type == "cpu":
        warn(f"mixed_precision={cfg.mixed_precision} on CPU: bf16/fp16 matmuls are ~30x slower than fp32 "
             "on CPUs without AMX; use fp32 there")
    if mode != "fsdp" and (cfg.cpu_offload or cfg.reshard_after_forward is False):
        warn(f"parallel: cpu_offload / reshard_after_forward apply to FSDP2 only; ignored with {mode!r} "
             f"(world size {dims.world_size})")
    meta = is_meta(model)
    # 0. float8 linears (torchao), before the layers are split or sharded
    if cfg.float8 != "none":
        from ember.parallel.float8 import apply_float8, float8_supported

        n = apply_float8(model, cfg.float8, dims.device, fsdp=mode == "fsdp")
        log(f"float8 ({cfg.float8}): {n} linear layers" + ("" if float8_supported(dims.device)
                                                           else ", emulated (no float8 GEMMs on this device)"))
    # 1. tensor (and sequence) parallelism
    if dims.tp > 1:
        from ember.parallel.tp import apply_tp

        apply_tp(model, dims.tp_mesh, cfg.sequence_parallel, cfg.loss_parallel and loss_parallel)
    # 2. activation checkpointing (per block; before compile so the recompute is compiled too)
    apply_activation_checkpointing(model, cfg.activation_checkpointing)
    # 3. compile (per block, in place)
    if cfg.compile:
        apply_compile(model)
    # 4. data parallelism
    offload = mode == "fsdp" and cfg.cpu_offload
    model._ember_init_device = torch.device("cpu") if offload else dims.device
    if mode == "fsdp":
        apply_fsdp(model, dims, cfg)
    elif meta and mode == "ddp":
        # DDP needs real tensors at construction (it broadcasts them); values come from materialize,
        # which initialises these same tensors in place on every rank
        model.to_empty(device=dims.device)
        model.tie_weights()
    elif not meta:
        model.to(dims.device)
    if mode == "ddp":
        model = apply_ddp(model, dims)
    log(f"parallel: {mode}, world {dims.world_size} ({dims.describe()}), device {dims.device}, precision {cfg.mixed_precision}, "
        f"AC {cfg.activation_checkpointing}, compile {cfg.compile}"
        + (f", reshard_after_forward {reshard_after_forward(cfg, dims)}, cpu_offload {cfg.cpu_offload}"
           if mode == "fsdp" else "")
        + (f", sequence_parallel {cfg.sequence_parallel}, loss_parallel {getattr(model, '_ember_loss_parallel', False)}"
           if dims.tp > 1 else ""))
    return model


@torch.no_grad()
def materialize(model: nn.Module, dims: ParallelDims, seed: int, init_device: Optional[torch.device] = None) -> None:
    """Allocate (if on meta) and initialise the weights exactly as a single process's `init_weights(seed)`.

    Works on plain, DDP-wrapped and FSDP2-sharded models; re-ties tied embeddings (to_empty unties).
    A sharded model is initialised from a full copy built on dims.device with the same seed (one
    model's worth of memory per rank for a moment); above FULL_INIT_MAX_PARAMS each rank initialises its shards
    directly instead (not equal to the 1-process init).
    """
    inner = unwrap(model)
    device = init_device or getattr(inner, "_ember_init_device", None) or dims.device
    if is_meta(inner):
        inner.to_empty(device=device)
    inner.tie_weights()
    if not is_sharded(inner) and not getattr(inner, "_ember_pp_part", False):
        inner.init_weights(seed)
        return
    cfg = inner.cfg
    if cfg.num_params() > FULL_INIT_MAX_PARAMS:
        log(f"materialize: {cfg.num_params() / 1e9:.1f}B parameters: initialising shards in place "
            "(weights differ from a 1-process init with the same seed)")
        inner.init_weights(seed)
        return
    _init_from_full_copy(inner, seed, dims.device if is_sharded(inner) else device)
    _check_tied(inner)


def _init_from_full_copy(model: nn.Module, seed: int, device: torch.device) -> None:
    """Copy each rank's shard of a full `init_weights(seed)` model into the (sharded) model.

    The full copy is built on `device` (the compute device) so its random stream is the one a
    single-process run on that device uses (CPU and CUDA generators differ).
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    from ember.models import Transformer

    with torch.device("meta"):
        ref = Transformer(model.cfg)
    ref.to_empty(device=device)
    ref.init_weights(seed)
    full = dict(ref.named_buffers())
    full.update(ref.state_dict(keep_vars=True))  # a tied head's key too (a pipeline part's own copy)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        src = full[name]
        if isinstance(t, DTensor):
            src = distribute_tensor(src.detach(), t.device_mesh, t.placements, src_data_rank=None).to_local()
            t.to_local().copy_(src)
        else:
            t.copy_(src)
    del ref, full


def _check_tied(model: nn.Module) -> None:
    cfg = getattr(model, "cfg", None)
    if cfg is None or not cfg.tie_embeddings or model.output is None or model.tok_embeddings is None:
        return
    if model.output.weight is not model.tok_embeddings.weight:
        raise RuntimeError("materialize: output.weight is no longer tok_embeddings.weight after sharding")
