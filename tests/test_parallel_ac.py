"""Single-process parallel transforms: activation checkpointing (full / selective) gives the same
gradients as none and keeps names; parallelize + materialize on meta == init_weights; clip_grad_norm_
== torch's; no_sync on a plain model is a no-op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ember.models import Transformer, preset
from ember.parallel import (ParallelConfig, ParallelDims, apply_activation_checkpointing, clip_grad_norm_,
                            grad_norm, materialize, no_sync, parallelize)
from ember.parallel.ac import _save_ops


def _grads(name: str, mode: str, dropout: float = 0.0) -> tuple[dict, dict]:
    model = Transformer(preset(name, dropout=dropout))
    model.init_weights(0)
    sd_keys = list(model.state_dict())
    apply_activation_checkpointing(model, mode)
    assert list(model.state_dict()) == sd_keys  # no _checkpoint_wrapped_module. prefix
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)  # dropout masks
    loss = F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}, dict(model.named_modules())


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_ac_gradients_equal_no_ac(name, mode):
    ref, _ = _grads(name, "none")
    got, modules = _grads(name, mode)
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=0, msg=n)
    assert all(getattr(modules[f"layers.{i}"], "_ember_ac") == mode for i in range(2))


def test_ac_with_dropout_recomputes_same_masks():
    ref, _ = _grads("tiny", "none", dropout=0.1)
    got, _ = _grads("tiny", "full", dropout=0.1)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=0, msg=n)


def test_selective_policy_knows_cpu_sdpa():
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default in _save_ops()
    assert torch.ops.aten.mm.default in _save_ops()


def test_ac_twice_is_an_error():
    model = Transformer(preset("tiny"))
    apply_activation_checkpointing(model, "full")
    with pytest.raises(ValueError, match="already"):
        apply_activation_checkpointing(model, "selective")


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_parallelize_materialize_on_meta_equals_init_weights(name):
    with torch.device("meta"):
        model = Transformer(preset(name))
    model = parallelize(model, ParallelDims(), ParallelConfig(activation_checkpointing="full"))
    materialize(model, ParallelDims(), seed=3)
    ref = Transformer(preset(name))
    ref.init_weights(3)
    for (n, p), (rn, rp) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert n == rn
        assert torch.equal(p, rp), n
    assert (model.output.weight is model.tok_embeddings.weight) == model.cfg.tie_embeddings


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
    model = Transformer(preset("tiny"))
    with no_sync(model, True), no_sync(model, False):
        pass
