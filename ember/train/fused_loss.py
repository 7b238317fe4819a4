"""Fused output head + cross-entropy: the loss of `hidden @ W^T` without materialising the logits.

With a 50k vocabulary the logits dominate a small model's memory traffic: B=8, T=256, V=50304 is
412 MB of fp32 logits, then as much again for log-softmax, its gradient and the logits' gradient.
On a memory-bound CPU that traffic (and the page faults of allocating it afresh each step) costs
more than the attention. Here the rows are processed in chunks, reusing one buffer:

    for each chunk of N_c rows:                         (N_c, C) hidden, (V, C) weight
        z  = h_c @ W^T                                   (N_c, V)  one reused buffer
        loss_c = logsumexp(z) - z[target]
        z  <- (softmax(z) - onehot(target)) * scale      in place: the gradient of the loss wrt z
        dh_c = z @ W ;  dW += z^T @ h_c                  gradients, computed in the forward pass

The backward pass only scales the stored gradients by the incoming grad (a scalar). Same value
and gradients as `train.loss.cross_entropy(model.output(h), targets)` (to fp32 rounding); the
matmul FLOPs are the same, the logits are never whole. (The idea of Liger-Kernel's fused linear
cross-entropy, arXiv:2410.10989, done with plain torch ops.)

Use through `train.loss.model_loss(model, tokens, targets)` (or the `LMLoss` objective), which runs
the model up to its final norm (`Transformer.hidden_states`) and applies this to `model.output.weight`.
This file holds the kernel only and imports nothing from the rest of ember.train.
"""

from __future__ import annotations

from typing import Optional

import torch

IGNORE_INDEX = -100  # the same as train.loss.IGNORE_INDEX (torch's default ignore_index)

CHUNK_BYTES = 128 * 2 ** 20
"""Default fp32 logits buffer per chunk: 128 MiB of logits. Much smaller chunks are slower because each
chunk re-reads and re-writes the (V, C) weight gradient; bench/train_throughput.py measures it."""


def default_chunk(vocab_size: int) -> int:
    """Rows per chunk for a vocabulary: CHUNK_BYTES of fp32 logits, at least 1."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


class _FusedLinearCE(torch.autograd.Function):
    """loss = CE(h @ W^T, targets); gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                reduction: str, chunk_size: int) -> torch.Tensor:
        N = h.shape[0]
        valid = targets != ignore_index  # (N,)
        denom = valid.sum().clamp(min=1).to(torch.float32) if reduction == "mean" else torch.ones(())
        # per-row gradient scale: 1/denom on counted rows, 0 on ignored ones (log: -inf -> exp 0)
        log_scale = torch.where(valid, -denom.log(), float("-inf"))  # (N,)
        safe_t = torch.where(valid, targets, 0)  # (N,)
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(h) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        losses = torch.empty(N, dtype=torch.float32, device=h.device)
        fp32 = h.dtype == torch.float32 and weight.dtype == torch.float32
        buf = torch.empty(min(chunk_size, N), weight.shape[0], dtype=torch.float32, device=h.device) if fp32 else None
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            h_c, t_c = h[s:e], safe_t[s:e]  # (n, C), (n,)
            if fp32:
                z = torch.mm(h_c, weight.t(), out=buf[: e - s])  # (n, V)
            else:
                z = torch.mm(h_c, weight.t()).float()
            # in place, 2 reads + 3 read-writes of z (torch.logsumexp would allocate a temporary)
            m = z.amax(dim=1, keepdim=True)  # (n, 1)
            z_t = z.gather(1, t_c[:, None])  # (n, 1) target logits
            sumexp = z.sub_(m).exp_().sum(dim=1, keepdim=True)  # (n, 1); z = exp(z - m)
            losses[s:e] = (m + sumexp.log() - z_t).squeeze(1) * valid[s:e]  # logsumexp - z_t
            # z <- (softmax(z) - onehot) * scale: the gradient of the (mean) loss wrt z
            scale = log_scale[s:e].exp()[:, None]  # (n, 1)
            z.mul_(scale / sumexp)
            z.scatter_add_(1, t_c[:, None], -scale)
            zg = z if fp32 else z.to(h.dtype)
            if need_dh:
                torch.mm(zg, weight, out=dh[s:e]) if fp32 else dh[s:e].copy_(zg @ weight)
            if need_dw:
                dw.addmm_(zg.t().float(), h_c.float()) if not fp32 else dw.addmm_(zg.t(), h_c)
        ctx.save_for_backward(dh, dw)
        total = losses.sum()
        return total / denom if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        dh, dw = ctx.saved_tensors
        gh = dh * grad_out.to(dh.dtype) if dh is not None else None
        gw = dw * grad_out if dw is not None else None
        return gh, gw, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                               chunk_size: Optional[int] = None) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `targets`, computed in row chunks.

    hidden: (B, T, C) or (N, C); weight: (V, C) (e.g. `model.output.weight`);
    targets: (B, T) or (N,) int64, `ignore_index` positions do not count.
    reduction: "mean" over counted tokens, or "sum". chunk_size: rows per chunk (None: default_chunk(V)).
    Returns a scalar fp32 tensor.
    Differentiable wrt hidden and weight (gradients are computed in the forward pass, so call
    `.backward()` on the result once, as with any loss).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    C = hidden.shape[-1]
    h = hidden.reshape(-1, C)
    if not h.is_contiguous():
        h = h.contiguous()
    chunk_size = chunk_size or default_chunk(weight.shape[0])
    return _FusedLinearCE.apply(h, weight, targets.reshape(-1), ignore_index, reduction, chunk_size)


def can_fuse(model: torch.nn.Module) -> bool:
    """True when `model_loss` can bypass `model.__call__`: a plain Transformer with a head.

    DDP/FSDP2 roots and `torch.compile(model)` wrappers do work in `__call__` (hooks, the compiled
    graph), so they keep the plain logits path; so does a tensor-parallel head, whose logits stay split
    over the vocabulary (loss_parallel), never whole on one rank. Compile such a model per block instead
    (`for b in model.layers.values(): b.compile()`), which keeps the fused head.
    """
    from torch.distributed.fsdp import FSDPModule

    from ember.models import Transformer

    from torch.distributed.tensor import DTensor

    return (type(model).__name__ != "OptimizedModule" and isinstance(model, Transformer)
            and not isinstance(model, FSDPModule) and getattr(model, "output", None) is not None
            and not model._forward_pre_hooks and not model._forward_hooks
            and not isinstance(model.output.weight, DTensor))  # tensor parallel: the vocab-sharded logits path
