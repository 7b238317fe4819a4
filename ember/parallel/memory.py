"""Measured memory of a training layout, to check `ember plan`'s arithmetic (parallel/plan.py) against.

    state = local_state_bytes(parameters, optimizer)       # this rank's fp32 params, grads, AdamW state
    with SavedActivations(model) as saved:
        loss = loss_fn(model, batch)                       # one forward
    saved.bytes                                            # what autograd keeps for backward

Both count local tensors: a DTensor (tensor parallel, FSDP2) by its local shard, so every rank reports
its own share. Activations are the tensors autograd saves (`torch.autograd.graph.saved_tensors_hooks`),
each storage once, parameters excluded; under selective activation checkpointing the outputs a block
keeps for backward are saved inside the checkpoint, out of the hooks' sight, so they are counted where
they are made (the outputs of the ops the policy saves, parallel/ac.py).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten


def _inner(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors under a tensor subclass (a DTensor's local shard, a pending collective's
    result, float8 data and scale), or the tensor itself."""
    if is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        return [x for a in attrs if isinstance(getattr(t, a), torch.Tensor) for x in _inner(getattr(t, a))]
    return [t]


def _nbytes(t: torch.Tensor) -> int:
    return sum(x.numel() * x.element_size() for x in _inner(t))


def local_state_bytes(parameters: Iterable[torch.Tensor], optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """{"parameters", "gradients", "optimizer"}: bytes of this rank's local tensors (gradients that are
    None count 0, so call it where they exist: an optimizer step pre-hook)."""
    params = list(parameters)
    out = {"parameters": sum(_nbytes(p) for p in params),
           "gradients": sum(_nbytes(p.grad) for p in params if p.grad is not None), "optimizer": 0}
    if optimizer is not None:
        out["optimizer"] = sum(_nbytes(v) for st in optimizer.state.values() for v in st.values()
                               if isinstance(v, torch.Tensor))
    return out


class _SavedBySelectiveAC(TorchDispatchMode):
    """Bytes of the outputs of the ops selective AC keeps, while a selectively checkpointed block runs."""

    def __init__(self, ops: set):
        super().__init__()
        self.ops, self.depth, self.bytes = ops, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.depth and func in self.ops:
            self.bytes += sum(_nbytes(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out


class SavedActivations:
    """Counts the bytes a forward pass leaves for backward (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._storages: dict[int, int] = {}
        self._sac_bytes = 0

    @property
    def bytes(self) -> int:
        return sum(self._storages.values()) + self._sac_bytes

    def _pack(self, t: torch.Tensor):
        if not isinstance(t, nn.Parameter):
            # the parameters as the modules hold them now: FSDP2 swaps in unsharded ones while a unit runs,
            # and what autograd saves of them (a transposed view) shares their storage
            params = {x.untyped_storage().data_ptr() for p in self.model.parameters() for x in _inner(p)}
            for x in _inner(t):
                st = x.untyped_storage()
                if st.data_ptr() not in params:
                    self._storages[st.data_ptr()] = st.nbytes()
        return t

    def __enter__(self) -> "SavedActivations":
        from ember.parallel.ac import _save_ops

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        sac = [m for m in self.model.modules() if getattr(m, "_ember_ac", None) == "selective"]
        self._mode = _SavedBySelectiveAC(_save_ops()) if sac else None
        self._handles = []
        if self._mode is not None:
            mode = self._mode

            def enter(*_):
                mode.depth += 1

            def leave(*_):
                mode.depth -= 1

            for m in sac:
                self._handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._sac_bytes = self._mode.bytes
        for h in self._handles:
            h.remove()
        self._hooks.__exit__(*exc)
