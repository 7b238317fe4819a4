"""Activation checkpointing of Transformer blocks, keeping module and parameter names unchanged.

`torch.distributed...checkpoint_wrapper` inserts a `_checkpoint_wrapped_module.` level into every
state-dict key; instead each block's *forward* is replaced (an instance attribute) by one that runs the
original forward under non-reentrant `torch.utils.checkpoint.checkpoint`. Module hooks (FSDP2's
all-gather / reshard) stay outside the checkpointed region, as with checkpoint_wrapper.

    full       save only the block input; recompute the whole block in backward
    selective  save matmul and attention outputs; recompute the cheap ops (norms, activations, adds)
"""

from __future__ import annotations

import types
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective")


def _save_ops() -> set:
    """aten ops whose outputs selective AC keeps: matmuls and every SDPA backend (CPU and CUDA)."""
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention"]
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


def _selective_policy(save: set) -> Callable:
    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE
    return policy


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy(_save_ops()))


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    """The block's class forward, run under non-reentrant checkpointing (bound to the block as `forward`)."""
    context_fn = _selective_context if self._ember_ac == "selective" else None
    kw = {"context_fn": context_fn} if context_fn is not None else {}
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, **kw, **kwargs)


def checkpoint_module(module: nn.Module, mode: str) -> None:
    """Make `module`'s forward recompute in backward (mode "full" or "selective"), in place.

    The replacement is a method bound to the module (not a closure), so `copy.deepcopy` of the model
    gives a copy whose blocks run their own parameters.
    """
    if mode not in ("full", "selective"):
        raise ValueError(f"activation checkpointing mode {mode!r}: expected one of {MODES}")
    if getattr(module, "_ember_ac", None) is not None:
        raise ValueError(f"{type(module).__name__} already has activation checkpointing ({module._ember_ac})")
    module._ember_ac = mode
    module.forward = types.MethodType(_checkpointed_forward, module)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Checkpoint every block in `model.layers` (an nn.ModuleDict); "none" does nothing."""
    if mode == "none":
        return
    for block in model.layers.values():
        checkpoint_module(block, mode)
