"""A static, preallocated KV cache (compile-friendly: fixed shapes, in-place index_copy_).

One `KVCache` per attention layer holds k, v of shape (B, K, S_max, D). `setup_caches` attaches them
to a model; the model's forward then writes new keys/values at `input_pos`. Compiled, it attends over
all S_max slots with a mask that hides slots after each query (see models/transformer.attention_mask);
eager, over the filled slots only (up to the last one written: the rest are empty and invisible).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, batch_size: int, n_kv_head: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None):
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, T, D) at slots input_pos (T,); return the whole cache (B, K, S_max, D)."""
        if k.dtype != self.k.dtype:
            k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


def setup_caches(model: nn.Module, batch_size: int, max_seq_len: int, dtype: Optional[torch.dtype] = None) -> None:
    """Attach a fresh KVCache of (batch_size, max_seq_len) to every attention layer of `model`."""
    cfg = model.cfg
    if max_seq_len > cfg.block_size:
        raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's block_size {cfg.block_size}")
    ref = next(model.parameters())
    for layer in model.layers.values():
        layer.attention.kv_cache = KVCache(batch_size, cfg.n_kv_head, max_seq_len, cfg.head_dim,
                                           dtype or ref.dtype, ref.device)


def clear_caches(model: nn.Module) -> None:
    for layer in model.layers.values():
        layer.attention.kv_cache = None
