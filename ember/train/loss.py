"""Loss functions (pure): next-token cross-entropy in fp32, a chunked variant, and z-loss.

The model's `forward` returns logits (B, T, V); these functions turn them into a scalar.
Logits are upcast to fp32 before the softmax (bf16 log-sum-exp loses ~2 digits over a 50k vocab).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                  reduction: str = "mean") -> torch.Tensor:
    """Mean cross-entropy over the non-ignored targets (nats).

    logits: (B, T, V) or (N, V), any float dtype (upcast to fp32).
    targets: (B, T) or (N,) int64; positions equal to `ignore_index` do not count.
    reduction: "mean" (over counted tokens) or "sum".
    """
    V = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction)


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 4096,
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """`cross_entropy` computed over row chunks, so the fp32 copy of the logits is never whole.

    Same value as `cross_entropy` (mean over counted tokens); useful for large vocabularies.
    """
    V = logits.shape[-1]
    flat_logits, flat_targets = logits.reshape(-1, V), targets.reshape(-1)  # (N, V), (N,)
    total = flat_logits.new_zeros((), dtype=torch.float32)
    for lg, tg in zip(flat_logits.split(chunk_size), flat_targets.split(chunk_size)):
        total = total + F.cross_entropy(lg.float(), tg, ignore_index=ignore_index, reduction="sum")
    count = (flat_targets != ignore_index).sum().clamp(min=1)
    return total / count


def z_loss(logits: torch.Tensor, targets: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX
           ) -> torch.Tensor:
    """Mean squared log-partition log(sum exp(logits))^2 (PaLM, arXiv:2204.02311 sec. 5).

    Add `coef * z_loss(logits)` (coef ~1e-4) to keep the softmax normaliser near 1. With `targets`,
    ignored positions do not count.
    """
    V = logits.shape[-1]
    lse = torch.logsumexp(logits.reshape(-1, V).float(), dim=-1)  # (N,)
    sq = lse.square()
    if targets is None:
        return sq.mean()
    keep = (targets.reshape(-1) != ignore_index).float()
    return (sq * keep).sum() / keep.sum().clamp(min=1)
