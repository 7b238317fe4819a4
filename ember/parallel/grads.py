"""Gradient utilities that work the same for plain, DDP and FSDP2 (DTensor) parameters.

`torch.nn.utils.clip_grad_norm_` fails when a model mixes plain tensors and DTensors, or DTensors on
different meshes (TP + FSDP); `clip_grad_norm_` here groups gradients by mesh and reduces each group's
norm to the full one before combining.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import ContextManager, Iterable, Optional

import torch
from torch import nn


@torch.no_grad()
def grad_norm(params: Iterable[torch.Tensor], pp_group=None) -> torch.Tensor:
    """The total L2 norm of all gradients (full, identical on every rank), as an fp32 0-dim tensor.

    pp_group: under pipeline parallelism each rank holds other parameters; their squared norms are
    summed over this group."""
    from torch.distributed.tensor import DTensor

    groups: dict = defaultdict(list)
    for p in params:
        if p.grad is not None:
            g = p.grad
            key = (g.device_mesh, g.device) if isinstance(g, DTensor) else (None, g.device)
            groups[key].append(g)
    squares = []
    for gs in groups.values():
        n = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs)).float())  # this group's norm
        if isinstance(n, DTensor):
            n = n.full_tensor()  # partial norms -> all-reduced full norm
        squares.append(n.square())
    if pp_group is None and not squares:
        return torch.zeros(())
    device = squares[0].device if squares else _group_device(pp_group)
    total = torch.stack([s.to(device) for s in squares]).sum() if squares else torch.zeros((), device=device)
    if pp_group is not None:
        import torch.distributed as dist

        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


def _group_device(group) -> torch.device:
    import torch.distributed as dist

    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(backend) else torch.device("cpu")


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float, pp_group=None,
                    counted: Optional[Iterable[torch.Tensor]] = None) -> torch.Tensor:
    """Scale gradients in place so their total L2 norm is at most max_norm; returns the norm before.

    Same arithmetic as torch.nn.utils.clip_grad_norm_ (coefficient max_norm / (norm + 1e-6), clamped to
    1); max_norm <= 0 only measures. A non-finite norm leaves the gradients unscaled for the caller to
    detect. pp_group: sum the norm over pipeline stages; counted: the parameters whose gradients enter
    the norm (default all; a pipeline's tied head copy is scaled but not counted twice).
    """
    from torch.distributed.tensor import DTensor

    params = [p for p in params if p.grad is not None]
    total = grad_norm(params if counted is None else counted, pp_group)
    if max_norm <= 0 or not params:
        return total
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    coef = torch.where(torch.isfinite(total), coef, torch.ones_like(coef))
    by_device: dict = defaultdict(list)
    for p in params:
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        by_device[g.device].append(g)
    for device, gs in by_device.items():
        torch._foreach_mul_(gs, coef.to(device))
    return total


def no_sync(model: nn.Module, enabled: bool = True) -> ContextManager:
    """Inside it, backward accumulates local gradients without syncing them (grad-accumulation micro-steps).

    enabled=False (the last micro-step) is a no-op context, so the loop can write
    `with no_sync(model, micro < accum - 1): loss.backward()`.
    DDP: `model.no_sync()`. FSDP2: `set_requires_gradient_sync(False)` (unsharded gradients are kept
    until the syncing backward: more memory). A plain model: no-op.
    """
    if not enabled:
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
