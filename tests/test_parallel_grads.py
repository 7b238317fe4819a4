"""clip_grad_norm_ / grad_norm against torch's, non-finite handling, no_sync on a plain model."""

from __future__ import annotations

import pytest
import torch

from ember.models import Transformer, preset
from ember.parallel import clip_grad_norm_, grad_norm, no_sync


def test_clip_grad_norm_matches_torch():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p) * 3
        q.grad = p.grad.clone()
    ours = clip_grad_norm_(a, 1.0)
    theirs = torch.nn.utils.clip_grad_norm_(b, 1.0)
    torch.testing.assert_close(ours, theirs)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)
    assert grad_norm(a).item() == pytest.approx(1.0, rel=1e-5)
    assert clip_grad_norm_(a, 0.0).item() == pytest.approx(1.0, rel=1e-5)  # measure only


def test_clip_leaves_nonfinite_grads_for_the_caller():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, float("inf"), 1.0])
    assert not torch.isfinite(clip_grad_norm_([p], 1.0))
    assert p.grad[0] == 1.0


def test_no_sync_on_plain_model_is_noop():
    """On a plain (unwrapped) model no_sync changes nothing: gradients accumulate exactly as without it."""
    model = Transformer(preset("tiny"))
    model.init_weights(0)
    x = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    model(x).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with no_sync(model, True):
        model(x).sum().backward()
    with no_sync(model, False):
        model(x).sum().backward()
    for p, g in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, 2 * g)
    assert not hasattr(model, "require_backward_grad_sync") or model.require_backward_grad_sync
