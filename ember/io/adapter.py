"""LoRA adapters on disk, in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

The tensor names are those PEFT gives the Hugging Face export of the same model
(`ember convert --to-hf`), so `peft.PeftModel.from_pretrained(hf_model, DIR)` loads an ember adapter
and computes the same logits, and an adapter PEFT trained on that HF model loads here:

    ember  layers.3.attention.wq.lora_A            (r, in)
    PEFT   base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight     (Llama)
           base_model.model.transformer.h.3.attn.c_proj.lora_A.weight         (GPT-2; Conv1D: fan_in_fan_out)

GPT-2 fuses q, k and v into one `c_attn`, which has no separate q/k/v adapters: GPT-2-style models
export adapters on o, up and down only (merge the others with `ember finetune --merge`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ember.errors import EmberError
from ember.fileio import atomic_dir
from ember.models import ModelConfig
from ember.models.hf import hf_model_type
from ember.peft.lora import ROLES, LoRAConfig, apply_lora, lora_modules

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"

_LLAMA = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
          "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_GPT2 = {"o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"}
_EMBER = {"q": "attention.wq", "k": "attention.wk", "v": "attention.wv", "o": "attention.wo"}


def _ember_attr(role: str, swiglu: bool) -> str:
    if role in _EMBER:
        return _EMBER[role]
    names = {"gate": "w1", "up": "w3", "down": "w2"} if swiglu else {"up": "w1", "down": "w2"}
    return f"feed_forward.{names[role]}"


def _hf_prefix(model_type: str, layer: int, role: str) -> str:
    if model_type == "llama":
        return f"base_model.model.model.layers.{layer}.{_LLAMA[role]}"
    if role not in _GPT2:
        raise EmberError(f"adapter export: GPT-2 fuses q, k and v into c_attn, so a '{role}' adapter has no PEFT "
                         "name. HINT: target o/up/down only, or merge the adapter (ember finetune --merge)")
    return f"base_model.model.transformer.h.{layer}.{_GPT2[role]}"


def save_adapter(model: nn.Module, model_cfg: ModelConfig, lora: LoRAConfig, out_dir: str | Path,
                 base: Optional[str] = None) -> Path:
    """Write the model's adapters (PEFT format) to out_dir, atomically."""
    from safetensors.torch import save_file

    model_type = hf_model_type(model_cfg)
    swiglu = model_cfg.mlp == "swiglu"
    tensors, modules = {}, set()
    for layer in range(model_cfg.n_layer):
        for role in lora.roles():
            path = f"layers.{layer}.{_ember_attr(role, swiglu)}"
            mod = model.get_submodule(path)
            prefix = _hf_prefix(model_type, layer, role)
            tensors[f"{prefix}.lora_A.weight"] = mod.lora_A.detach().cpu().contiguous()
            tensors[f"{prefix}.lora_B.weight"] = mod.lora_B.detach().cpu().contiguous()
            modules.add((_LLAMA if model_type == "llama" else _GPT2)[role])
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.r, "lora_alpha": lora.alpha,
              "lora_dropout": lora.dropout, "use_rslora": lora.rslora, "bias": "none",
              "target_modules": sorted(modules), "fan_in_fan_out": model_type == "gpt2",
              "base_model_name_or_path": base, "inference_mode": True, "init_lora_weights": True,
              "ember": {"targets": list(lora.roles()), "model": model_cfg.to_dict()}}
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_adapter_config(adapter_dir: str | Path) -> tuple[LoRAConfig, dict]:
    """The LoRAConfig an adapter directory describes (PEFT's adapter_config.json), and the raw dict."""
    path = Path(adapter_dir) / CONFIG
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise EmberError(f"{path}: missing, so {adapter_dir} is not an adapter directory. HINT: pass the "
                         "directory ember finetune (or PEFT's save_pretrained) wrote") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EmberError(f"{path}: not valid JSON ({e}). HINT: re-save the adapter") from None
    if raw.get("peft_type") != "LORA":
        raise EmberError(f"{path}: peft_type {raw.get('peft_type')!r}, expected 'LORA'")
    if raw.get("rank_pattern") or raw.get("alpha_pattern") or raw.get("use_dora"):
        raise EmberError(f"{path}: per-module ranks/alphas and DoRA are not supported. HINT: a plain LoRA adapter")
    roles = raw.get("ember", {}).get("targets") or _roles_from_modules(raw.get("target_modules") or [], path)
    try:
        cfg = LoRAConfig(r=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout", 0.0)),
                         targets=list(roles), rslora=bool(raw.get("use_rslora", False)))
    except (KeyError, ValueError) as e:
        raise EmberError(f"{path}: not a usable LoRA config ({e})") from None
    return cfg, raw


def _roles_from_modules(modules: list[str] | str, where: Path) -> list[str]:
    if isinstance(modules, str):
        modules = [modules]
    names = [(v, k) for table in (_GPT2, _LLAMA) for k, v in table.items()]  # (HF module name, role)
    roles = []
    for m in modules:  # PEFT matches a target by name suffix: "attn.c_proj", "q_proj", "self_attn.q_proj"
        roles += [role for name, role in names if name == m or name.endswith("." + m) or m.endswith("." + name)]
    roles = [r for r in ROLES if r in roles]
    if not roles:
        raise EmberError(f"{where}: target_modules {modules} name no linear ember knows")
    return roles


def load_adapter(model: nn.Module, model_cfg: ModelConfig, adapter_dir: str | Path, seed: int = 0) -> LoRAConfig:
    """Give `model` the adapters of `adapter_dir` (apply_lora, then copy the tensors in); returns the config."""
    from safetensors.torch import load_file

    cfg, raw = read_adapter_config(adapter_dir)
    path = Path(adapter_dir) / WEIGHTS
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise EmberError(f"{path}: missing. HINT: the adapter directory is incomplete") from None
    except Exception as e:  # safetensors raises its own error type for a corrupt file
        raise EmberError(f"{path}: not a readable safetensors file ({e})") from None
    if not any(True for _ in lora_modules(model)):
        apply_lora(model, cfg, seed)
    model_type = hf_model_type(model_cfg)
    swiglu = model_cfg.mlp == "swiglu"
    used = set()
    with torch.no_grad():
        for layer in range(model_cfg.n_layer):
            for role in cfg.roles():
                mod = model.get_submodule(f"layers.{layer}.{_ember_attr(role, swiglu)}")
                prefix = _hf_prefix(model_type, layer, role)
                for part in ("A", "B"):
                    key = f"{prefix}.lora_{part}.weight"
                    key = key if key in tensors else key.replace(".weight", ".default.weight")
                    if key not in tensors:
                        raise EmberError(f"{path}: no tensor {prefix}.lora_{part}.weight. HINT: the adapter was "
                                         "made for another model")
                    dst = getattr(mod, f"lora_{part}")
                    if tuple(tensors[key].shape) != tuple(dst.shape):
                        raise EmberError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, the model needs "
                                         f"{tuple(dst.shape)}. HINT: the adapter was made for another model")
                    dst.copy_(tensors[key])
                    used.add(key)
    extra = sorted(set(tensors) - used)
    if extra:
        raise EmberError(f"{path}: {len(extra)} tensors this model has no place for (e.g. {extra[0]}). "
                         "HINT: the adapter was made for another model")
    return cfg
