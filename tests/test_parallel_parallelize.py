"""parallelize / materialize on one process, and the FSDP2 policies built from a ParallelConfig."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from ember.models import Transformer, preset
from ember.parallel import ParallelConfig, ParallelDims, materialize, parallelize, unwrap
from ember.parallel.fsdp import fsdp_kwargs


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


def test_materialized_model_is_moved_and_kept():
    model = Transformer(preset("tiny"))
    model.init_weights(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = parallelize(model, ParallelDims(), ParallelConfig(data_parallel="fsdp"))  # 1 process: none
    assert out is model and unwrap(out) is model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_fsdp_policies_from_config():
    dims = ParallelDims()
    assert set(fsdp_kwargs(dims, ParallelConfig())) == {"mesh"}
    kw = fsdp_kwargs(dims, ParallelConfig(mixed_precision="bf16", cpu_offload=True))
    assert kw["mp_policy"].param_dtype == torch.bfloat16 and kw["mp_policy"].reduce_dtype == torch.float32
    assert kw["offload_policy"].pin_memory == torch.accelerator.is_available()
    assert "mp_policy" not in fsdp_kwargs(dims, ParallelConfig(mixed_precision="fp16"))  # autocast + scaler


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("EMBER_TEST_COMPILE"),
                    reason="compiling takes minutes on 2 CPU cores; set EMBER_TEST_COMPILE=1")
def test_compile_in_place_keeps_names_and_numerics():
    ref = Transformer(preset("tiny-llama"))
    ref.init_weights(0)
    model = Transformer(preset("tiny-llama"))
    model.init_weights(0)
    keys = list(model.state_dict())
    model = parallelize(model, ParallelDims(), ParallelConfig(compile=True, activation_checkpointing="selective"))
    assert list(model.state_dict()) == keys
    x = torch.randint(0, 512, (2, 16))
    for m in (ref, model):
        F.cross_entropy(m(x).flatten(0, 1), x.flatten()).backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)
