"""AdamW with decay / no-decay parameter groups, and learning-rate schedules.

Weight decay applies to the weight matrices of linear layers only: norms, biases and embeddings
(token and position; a tied output head is the embedding, counted once) get none.

Schedules are one pure function, `lr_at(step, cfg)`, wrapped in `LambdaLR` so that the scheduler's
state is a plain, checkpointable dict. `step` is the 0-based optimizer step the lr is used for.

    lr ▲   cosine                       wsd (warmup-stable-decay)        constant
       │   ╱‾‾╲_                        ╱‾‾‾‾‾‾‾‾‾‾╲                    ╱‾‾‾‾‾‾‾‾‾‾‾
       │  ╱     ‾‾─__                  ╱            ╲                  ╱
       │ ╱           ‾‾ min_lr        ╱              ╲ min_lr         ╱
       └──────────────────▶ step     warmup  stable  decay_frac
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from ember.errors import EmberError

SCHEDULES = ("cosine", "wsd", "constant")
_NO_DECAY_MODULES = (nn.LayerNorm, nn.RMSNorm, nn.Embedding, nn.GroupNorm, nn.BatchNorm1d)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: {"params": decayed, "weight_decay": wd, "name": "decay"} and the others (0.0, "no_decay").

    Decided by module type (norms and embeddings never decay) and name (`bias`, and any 0/1-D
    tensor). Shared (tied) parameters are counted once, under their first owner; frozen
    parameters (requires_grad=False) are left out.
    """
    decay, no_decay, seen = [], [], set()
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if p is None or id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            skip = (isinstance(mod, _NO_DECAY_MODULES) or name == "bias" or p.dim() < 2
                    or getattr(p, "_ember_tied_copy", False))  # a pipeline's copy of the tied embedding
            (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def param_group_names(model: nn.Module) -> dict[str, list[str]]:
    """{"decay": [...], "no_decay": [...]} parameter names, for logging and tests."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, weight_decay=1.0)
    out = {"decay": [], "no_decay": []}
    for g in groups:
        key = "decay" if g["weight_decay"] > 0 else "no_decay"
        out[key] = [names[id(p)] for p in g["params"]]
    return out


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over `param_groups(model)`: fused on CUDA, foreach elsewhere.

    The multi-tensor kernels take one kind of tensor at a time: when a group mixes plain tensors and
    DTensors, or DTensors of different meshes (tensor parallel: replicated norms beside split
    projections; TP x FSDP: 1-D and 2-D meshes), the per-parameter loop runs instead (same arithmetic).
    """
    groups = param_groups(model, weight_decay)
    if not groups:
        raise EmberError("optimizer: the model has no trainable parameters. "
                         "HINT: check requires_grad (e.g. after freezing or LoRA).")
    on_cuda = next(iter(groups[0]["params"])).device.type == "cuda"
    kind = {"fused": True} if on_cuda else {"foreach": True}
    if _mixed_layouts(p for g in groups for p in g["params"]):
        kind = {"foreach": False}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kind)


def _mixed_layouts(params) -> bool:
    from torch.distributed.tensor import DTensor

    return len({p.device_mesh if isinstance(p, DTensor) else None for p in params}) > 1


# ------------------------------------------------------------------------------------ schedules
def _warmup_factor(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


def lr_at(step: int, cfg: Any) -> float:
    """The learning rate for 0-based optimizer step `step`.

    `cfg` needs: lr, min_lr, warmup_steps, max_steps, schedule ("cosine" | "wsd" | "constant"),
    and for wsd: decay_frac (fraction of max_steps spent decaying) and decay_shape ("linear" | "cosine").
    Warmup is linear from lr/warmup_steps to lr over warmup_steps steps; then
      cosine:   lr -> min_lr along a half cosine, reaching min_lr at max_steps;
      wsd:      lr until the last decay_frac * max_steps steps, then -> min_lr (linear or cosine);
      constant: lr.
    """
    lr, min_lr, warm, total = cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps
    if cfg.schedule not in SCHEDULES:
        raise EmberError(f"train.schedule: unknown schedule {cfg.schedule!r}, expected one of {SCHEDULES}")
    if step < warm:
        return lr * _warmup_factor(step, warm)
    if cfg.schedule == "constant":
        return lr
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
    decay_steps = max(1, round(cfg.decay_frac * total))
    start = max(warm, total - decay_steps)
    if step < start:
        return lr
    progress = min(1.0, (step - start) / max(1, total - start))
    if getattr(cfg, "decay_shape", "linear") == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
    return lr + progress * (min_lr - lr)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR whose factor is lr_at(step, cfg) / cfg.lr (its state_dict is checkpointable)."""
    base = cfg.lr if cfg.lr > 0 else 1.0
    lr_at(0, cfg)  # validates the schedule name early
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / base)


def schedule_preview(cfg: Any, steps: Iterable[int]) -> list[float]:
    """lr_at over several steps (for tests and plots)."""
    return [lr_at(s, cfg) for s in steps]
