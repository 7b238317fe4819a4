"""ember.parallel: turn a built model into a parallel one (DDP, FSDP2, activation checkpointing, compile).

    dims = init_distributed()                       # reads torchrun's env; 1 process -> all degrees 1
    with torch.device("meta"):
        model = Transformer(model_cfg)
    model = parallelize(model, dims, ParallelConfig(data_parallel="fsdp"))
    materialize(model, dims, seed=0)                # == single-process init_weights(0) on every rank
    ...
    with no_sync(model, micro < accum - 1), autocast(dims, pcfg):
        loss = ...; loss.backward()
    norm = clip_grad_norm_(model.parameters(), 1.0)
"""

from ember.parallel.ac import apply_activation_checkpointing
from ember.parallel.config import ParallelConfig
from ember.parallel.dims import (ParallelDims, all_reduce_mean, barrier, destroy_distributed,
                                 init_distributed, launched_by_torchrun, resolve_device)
from ember.parallel.grads import clip_grad_norm_, grad_norm, no_sync
from ember.parallel.parallelize import (is_sharded, materialize, parallelize, resolve_data_parallel,
                                        unwrap)
from ember.parallel.precision import autocast, make_grad_scaler

__all__ = [
    "ParallelConfig", "ParallelDims", "init_distributed", "destroy_distributed", "barrier", "all_reduce_mean",
    "launched_by_torchrun", "resolve_device",
    "parallelize", "materialize", "unwrap", "is_sharded", "resolve_data_parallel",
    "apply_activation_checkpointing", "clip_grad_norm_", "grad_norm", "no_sync", "autocast", "make_grad_scaler",
]
