"""ParallelConfig: how a built model is made parallel (data parallelism, precision, memory, compile).

One dataclass for one concern; a recipe config nests it as `parallel` (`--parallel.data-parallel fsdp`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

PP_SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zbv")
"""Pipeline schedules (`--parallel.pp-schedule`); see parallel/pp.py."""
FLOAT8_RECIPES = ("none", "tensorwise", "rowwise")
"""float8 scalings (`--parallel.float8`); see parallel/float8.py."""


@dataclass
class ParallelConfig:
    """The layout (data and tensor parallel degrees), mixed precision, activation checkpointing, compile."""

    dp_replicate: int = 1
    """Data-parallel replicas. With dp_shard > 1 too this is HSDP: parameters sharded within a group of
    dp_shard processes, replicated across dp_replicate groups (gradients all-reduced between them)."""
    dp_shard: int = -1
    """FSDP2 shard degree; -1 = what is left of the world after dp_replicate x tp. The product
    dp_replicate x dp_shard x tp must equal the number of processes."""
    tp: int = 1
    """Tensor-parallel degree: every block's q/k/v and gate/up projections split by output column,
    the output projections by input row (Megatron-LM); n_head and n_kv_head must divide by it. Peers
    of one tensor-parallel group read the same batch."""
    pp: int = 1
    """Pipeline-parallel degree: the model is cut by layer into stages on pp processes (the embedding
    and the head count as layers). Language-model objectives (pretrain) only."""
    pp_schedule: Literal["gpipe", "1f1b", "interleaved-1f1b", "zbv"] = "1f1b"
    """gpipe: all forwards, then all backwards; 1f1b: one forward one backward (less activation
    memory); interleaved-1f1b: pp_virtual_stages stages per rank (a smaller bubble); zbv: zero-bubble
    V schedule, two stages per rank, backward split into input and weight parts."""
    pp_microbatches: int = 0
    """Microbatches each batch is cut into for the pipeline (0 = pp x stages per rank); must divide
    --train.batch-size."""
    pp_virtual_stages: int = 2
    """Stages per rank for interleaved-1f1b."""
    float8: Literal["none", "tensorwise", "rowwise"] = "none"
    """float8 training of the blocks' linear layers via torchao (scales per tensor or per row; the head
    stays high precision). Native on H100-class GPUs, emulated (slow, for checking) elsewhere. With
    FSDP2 and tensorwise the parameters are all-gathered in float8."""
    sequence_parallel: bool = True
    """With tp > 1: norms and the residual stream between blocks are split along the sequence
    (activation memory / tp); the projections gather it. Off: replicated, all-reduce after each block half."""
    loss_parallel: bool = True
    """With tp > 1: the head's logits stay split over the vocabulary and the cross-entropy is computed
    on the shards (the full (B, T, V) logits are never gathered on one process). Language-model
    objectives only; others get gathered logits."""

    data_parallel: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    """auto: none on 1 process, fsdp on more; ddp: DistributedDataParallel (full replicas: every
    data-parallel process in dp_replicate); fsdp: FSDP2 fully_shard (parameters, gradients and optimizer
    state sharded over dp_shard; HSDP when dp_replicate > 1 too). With tp > 1 replicas are FSDP2 over
    the replicate dimension (DDP does not take DTensor parameters). With one data-parallel process every
    mode is 'none'."""
    reshard_after_forward: Optional[bool] = None
    """FSDP2 only. True: free the gathered parameters after each block's forward and gather them
    again for backward (ZeRO-3-like, least memory). False: keep them until backward (ZeRO-2-like,
    one all-gather per step less, more memory). None: True, but False under pipeline parallelism
    (every microbatch would gather the stage's parameters again)."""
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
