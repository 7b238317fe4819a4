"""Hugging Face model directories: config.json and the weights (safetensors, sharded, or pytorch_model.bin).

Reading never runs code: safetensors, JSON, and `torch.load(weights_only=True)` for .bin files. The
name maps between HF and ember live with the models (`ember.models.hf`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ember.errors import EmberError
from ember.io.checkpoint import CheckpointError


def read_hf_config(hf_dir: Path) -> dict:
    if not hf_dir.is_dir():
        raise EmberError(f"{hf_dir}: Hugging Face model directory not found. HINT: check the path")
    path = hf_dir / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EmberError(f"{path}: missing. HINT: a Hugging Face model directory holds config.json "
                         "(save it with model.save_pretrained(dir))") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EmberError(f"{path}: not valid JSON ({e}). HINT: re-download or re-save the model") from None
    if not isinstance(data, dict):
        raise EmberError(f"{path}: expected a JSON object. HINT: re-download or re-save the model")
    return data


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory: safetensors (single or sharded) or pytorch_model.bin (weights_only)."""
    for name, loader in (("model.safetensors", _load_safetensors), ("pytorch_model.bin", _load_bin)):
        if (hf_dir / name).is_file():
            return loader(hf_dir / name)
        index = hf_dir / f"{name}.index.json"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({e}). HINT: re-download the model") from None
            out = {}
            for f in files:
                out.update(loader(hf_dir / f))
            return out
    raise CheckpointError(f"{hf_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin. "
                          "HINT: save the model with model.save_pretrained(dir)")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: shard missing. HINT: re-download the model") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e}). "
                              "HINT: re-download the model") from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    from ember.io.safe import load_pt

    return load_pt(path)  # weights_only=True: never unpickles code; one-line errors naming the file
