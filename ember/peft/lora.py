"""LoRA as a module transform: `apply_lora(model, cfg)` swaps target nn.Linears for `LoRALinear` in place.

    y = x W^T + b + scale * dropout(x) A^T B^T          W (out, in) frozen; A (r, in), B (out, r) trained
                                                          scale = alpha / r  (rsLoRA: alpha / sqrt(r))

        x ──┬──────────── W ─────────────┐
            └─ dropout ── A (r) ── B ── *scale ─(+)──▶ y

A starts Kaiming-uniform and B at zero (as PEFT does), so the transformed model computes exactly what
the base model did until the first update. `LoRALinear` keeps the base Linear's own `weight` and `bias`
Parameters (the same tensors, frozen), so the model's state-dict names for them do not change; the
adapter adds `<linear>.lora_A` / `<linear>.lora_B`.

    merge_lora(model)        W += scale * B A (in place), then plain nn.Linears again; for export
    adapters_disabled(model) a context in which every LoRALinear computes the base model (the DPO
                             reference without a second copy of the weights)
    lora_state_dict(model)   the adapter tensors only (what training checkpoints and adapter files hold)

Targets are named by role: q, k, v, o (attention), gate, up, down (MLP; a GELU MLP has up = its first
and down = its second linear), or "all-linear" for every one of them. Imports torch and ember.models only.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ember.models.layers import SwiGLU

ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class LoRAConfig:
    """Low-rank adapters (LoRA, arXiv:2106.09685); r = 0 trains every weight instead (full fine-tuning)."""

    r: int = 0
    """Adapter rank; 0 = no adapters (full fine-tuning)."""
    alpha: float = 16.0
    """Scale numerator: the adapter's output is multiplied by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only)."""
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    """Which linears get adapters: q, k, v, o, gate, up, down, or all-linear."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) (arXiv:2312.03732)."""

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ValueError(f"lora.r={self.r}: expected a rank >= 0 (0 = full fine-tuning)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout}: expected a probability in [0, 1)")
        if self.r and not self.alpha > 0:
            raise ValueError(f"lora.alpha={self.alpha}: expected > 0")
        bad = [t for t in self.targets if t not in (*ROLES, "all-linear")]
        if bad or not self.targets:
            raise ValueError(f"lora.targets={self.targets}: expected some of {list(ROLES)} or all-linear")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def roles(self) -> tuple[str, ...]:
        return ROLES if "all-linear" in self.targets else tuple(r for r in ROLES if r in self.targets)


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update (see the module docstring). `weight`/`bias` are the base's own."""

    def __init__(self, base: nn.Linear, r: int, scale: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))  # (out, r)
        self.r, self.scale = r, scale
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.disabled = False
        self.reset_lora()

    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """A ~ Kaiming-uniform(a=sqrt(5)) as nn.Linear and PEFT initialise it, B = 0 (a no-op at start)."""
        with torch.no_grad():
            if self.lora_A.device.type != "meta":
                bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on (r, in)
                self.lora_A.uniform_(-bound, bound, generator=generator)
                self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.weight).__name__ == "NF4Tensor":  # QLoRA: the frozen base stored as NF4 (peft/qlora.py)
            from ember.peft.qlora import nf4_linear

            y = nf4_linear(x, self.weight, self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return y
        return y + (self.lora_dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def delta(self) -> torch.Tensor:
        """scale * B A: what merging adds to the weight (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scale

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, r={self.r}, scale={self.scale:g}"


def target_paths(model: nn.Module, roles: tuple[str, ...]) -> dict[str, str]:
    """{module path: role} of every Linear the roles name, in model order."""
    out = {}
    for name, mod in model.named_modules():
        if name.endswith(".attention"):
            for role, attr in (("q", "wq"), ("k", "wk"), ("v", "wv"), ("o", "wo")):
                if role in roles:
                    out[f"{name}.{attr}"] = role
        elif name.endswith(".feed_forward"):
            names = (("gate", "w1"), ("up", "w3"), ("down", "w2")) if isinstance(mod, SwiGLU) else \
                (("up", "w1"), ("down", "w2"))
            for role, attr in names:
                if role in roles:
                    out[f"{name}.{attr}"] = role
    return out


def apply_lora(model: nn.Module, cfg: LoRAConfig, seed: int = 0) -> dict[str, str]:
    """Freeze every parameter of `model` and give the target linears adapters (in place).

    Returns {module path: role} of the adapted linears. Adapter A matrices are drawn from a generator
    seeded with `seed`, in model order, so the same seed gives the same adapters on every rank."""
    if cfg.r < 1:
        raise ValueError("apply_lora: lora.r must be >= 1 (r = 0 means full fine-tuning: do not call it)")
    paths = target_paths(model, cfg.roles())
    if not paths:
        raise ValueError(f"apply_lora: no linear matches targets {cfg.targets}")
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for path in paths:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        base = getattr(parent, attr)
        if isinstance(base, LoRALinear) or type(base) is not nn.Linear:
            raise ValueError(f"apply_lora: {path} is a {type(base).__name__}, expected a plain nn.Linear")
        lora = LoRALinear(base, cfg.r, cfg.scale, cfg.dropout)
        if lora.lora_A.device.type != "meta":
            lora.reset_lora(gen if lora.lora_A.device.type == "cpu" else None)
        setattr(parent, attr, lora)
    return paths


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            yield name, mod


def has_lora(model: nn.Module) -> bool:
    return next(lora_modules(model), None) is not None


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors: {"<linear path>.lora_A": (r, in), "<linear path>.lora_B": (out, r)}."""
    out = {}
    for name, mod in lora_modules(model):
        out[f"{name}.lora_A"] = mod.lora_A.detach()
        out[f"{name}.lora_B"] = mod.lora_B.detach()
    return out


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its weight (W += scale B A) and put plain nn.Linears back; returns how many."""
    n = 0
    for name, mod in list(lora_modules(model)):
        parent_path, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
        base = mod.weight
        if type(base).__name__ == "NF4Tensor":  # QLoRA: into the dequantized base the adapter was trained on
            base = base.get_original_weight()
        lin.weight = nn.Parameter(base + mod.delta().to(base.dtype), requires_grad=False)
        if mod.bias is not None:
            lin.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
        setattr(parent, attr, lin)
        n += 1
    return n


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Every LoRALinear computes only its base weight inside the block (the frozen reference model)."""
    mods = [m for _, m in lora_modules(model)]
    before = [m.disabled for m in mods]
    try:
        for m in mods:
            m.disabled = True
        yield
    finally:
        for m, b in zip(mods, before):
            m.disabled = b
