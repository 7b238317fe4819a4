"""ember.train.loss against plain-PyTorch references."""

import math

import torch
import torch.nn.functional as F

from ember.train.loss import chunked_cross_entropy, cross_entropy, z_loss


def _data(seed=0, B=3, T=7, V=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 3
    targets = torch.randint(0, V, (B, T), generator=g)
    return logits, targets


def test_cross_entropy_matches_torch():
    logits, targets = _data()
    ref = F.cross_entropy(logits.view(-1, 11), targets.view(-1))
    assert torch.allclose(cross_entropy(logits, targets), ref, atol=1e-6)


def test_cross_entropy_ignores_masked_tokens():
    logits, targets = _data()
    masked = targets.clone()
    masked[:, :3] = -100
    keep = masked.view(-1) != -100
    ref = F.cross_entropy(logits.view(-1, 11)[keep], targets.view(-1)[keep])
    assert torch.allclose(cross_entropy(logits, masked), ref, atol=1e-6)


def test_cross_entropy_upcasts_bf16_to_fp32():
    logits, targets = _data()
    out = cross_entropy(logits.bfloat16(), targets)
    assert out.dtype == torch.float32
    ref = F.cross_entropy(logits.bfloat16().float().view(-1, 11), targets.view(-1))
    assert torch.allclose(out, ref, atol=1e-6)


def test_uniform_logits_give_log_vocab():
    logits = torch.zeros(2, 5, 64)
    targets = torch.randint(0, 64, (2, 5))
    assert abs(cross_entropy(logits, targets).item() - math.log(64)) < 1e-6


def test_chunked_equals_plain():
    logits, targets = _data(B=4, T=9)
    targets[0, :4] = -100
    a = cross_entropy(logits, targets)
    b = chunked_cross_entropy(logits, targets, chunk_size=5)
    assert torch.allclose(a, b, atol=1e-6)


def test_chunked_gradients_equal_plain():
    logits, targets = _data()
    l1 = logits.clone().requires_grad_()
    l2 = logits.clone().requires_grad_()
    cross_entropy(l1, targets).backward()
    chunked_cross_entropy(l2, targets, chunk_size=4).backward()
    assert torch.allclose(l1.grad, l2.grad, atol=1e-7)


def test_z_loss():
    logits, targets = _data()
    ref = torch.logsumexp(logits.view(-1, 11), -1).square().mean()
    assert torch.allclose(z_loss(logits), ref, atol=1e-5)
    assert torch.allclose(z_loss(torch.zeros(1, 2, 8)), torch.tensor(math.log(8) ** 2))
    masked = targets.clone()
    masked[1:] = -100
    ref_masked = torch.logsumexp(logits[0], -1).square().mean()
    assert torch.allclose(z_loss(logits, masked), ref_masked, atol=1e-5)
