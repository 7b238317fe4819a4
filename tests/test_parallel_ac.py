"""Activation checkpointing (full / selective): same gradients as none, same names, deepcopy-safe."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ember.models import Transformer, preset
from ember.parallel import apply_activation_checkpointing
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


def test_deepcopy_of_checkpointed_model_runs_its_own_weights():
    model = Transformer(preset("tiny"))
    model.init_weights(0)
    apply_activation_checkpointing(model, "selective")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.layers["0"].parameters():
            p.zero_()
    x = torch.randint(0, 512, (1, 8))
    assert not torch.allclose(model(x), twin(x))
    assert twin.layers["0"].forward.__self__ is twin.layers["0"]
