"""Fused head + cross-entropy (ember/train/fused_loss.py) against the plain logits path."""

from __future__ import annotations

import pytest
import torch

from ember.models import Transformer, preset
from ember.train.fused_loss import can_fuse, fused_linear_cross_entropy
from ember.train.loss import IGNORE_INDEX, LMLoss, LossConfig, cross_entropy, model_loss


def _grads(params):
    return [p.grad.detach().clone() for p in params]


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_linear_ce_matches_plain(chunk, reduction):
    torch.manual_seed(0)
    N, C, V = 50, 16, 97
    h = torch.randn(N, C, dtype=torch.float64).float().requires_grad_()
    w = (0.3 * torch.randn(V, C)).requires_grad_()
    t = torch.randint(0, V, (N,))
    t[::5] = IGNORE_INDEX  # ignored rows count neither in the loss nor in the mean
    ref = cross_entropy(h @ w.t(), t, reduction=reduction)
    ref.backward()
    g_ref = _grads([h, w])
    h.grad = w.grad = None
    out = fused_linear_cross_entropy(h, w, t, reduction=reduction, chunk_size=chunk)
    (2.5 * out).backward()  # a non-unit incoming gradient is scaled through
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.grad, 2.5 * g_ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, 2.5 * g_ref[1], rtol=1e-5, atol=1e-6)  # summation order
    assert torch.all(h.grad[::5] == 0)


def test_fused_linear_ce_3d_input_and_no_weight_grad():
    torch.manual_seed(1)
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(11, 8)  # frozen head
    t = torch.randint(0, 11, (2, 5))
    ref = cross_entropy(h @ w.t(), t)
    (g_ref,) = torch.autograd.grad(ref, h)
    out = fused_linear_cross_entropy(h, w, t, chunk_size=3)
    (g,) = torch.autograd.grad(out, h)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_model_loss_matches_forward_and_cross_entropy(name):
    torch.manual_seed(2)
    model = Transformer(preset(name))
    model.init_weights(seed=3)
    x = torch.randint(0, model.cfg.vocab_size, (2, 24))
    y = torch.randint(0, model.cfg.vocab_size, (2, 24))
    assert can_fuse(model)
    torch.testing.assert_close(model.output(model.hidden_states(x)), model(x), rtol=0, atol=0)
    y[0, :5] = IGNORE_INDEX
    plain = LMLoss(LossConfig(fused=False))(model, (x, y))
    ref = plain.loss
    ref.backward()
    g_ref = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    fused = LMLoss(LossConfig(fused=True))(model, (x, y))
    loss = fused.loss
    loss.backward()
    assert fused.weight == plain.weight == 2 * 24 - 5  # ignored targets are not counted
    torch.testing.assert_close(ref, cross_entropy(model(x), y, reduction="sum"))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_ref[k], rtol=1e-4, atol=1e-6, msg=k)


def test_model_loss_falls_back_for_wrapped_models():
    model = Transformer(preset("tiny"))
    model.init_weights(seed=0)
    x = torch.randint(0, 512, (1, 8))
    hook = model.register_forward_hook(lambda m, a, out: out)  # a root hook (DDP/FSDP-like): must run
    assert not can_fuse(model)
    torch.testing.assert_close(model_loss(model, x, x), cross_entropy(model(x), x))
    hook.remove()
    assert can_fuse(model)
