"""infer/decode: the decode layout, the split GEMV and the batch-1 block step give the same results as the plain model."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from ember.infer.generate import generate
from ember.infer.sample import SamplingParams
from ember.models import Transformer, preset
from ember.infer.decode import fused_views, fused_weight, is_packed, pack_for_decode, split_linear, unpack

GREEDY = SamplingParams(temperature=0)


def _model(name: str) -> Transformer:
    m = Transformer(preset(name))
    m.init_weights(0)
    return m.eval()


@pytest.fixture
def two_threads(set_threads):
    set_threads(2)


@pytest.mark.parametrize("shape", [(300, 64), (64, 300), (257, 96), (7, 5)])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("parts", [2, 3])
def test_split_linear_equals_linear_for_both_layouts(shape, rows, parts):
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(shape, generator=g), torch.randn(shape[0], generator=g), torch.randn(rows, shape[1], generator=g)
    col_major = w.t().contiguous().t()
    ref = F.linear(x, w, b)
    for weight in (w, col_major):
        for bias in (b, None):
            out = split_linear(x, weight, bias, parts)
            torch.testing.assert_close(out, ref if bias is not None else F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert split_linear(x.view(1, rows, -1), w, b, parts).shape == (1, rows, shape[0])  # leading dims kept


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_packed_model_keeps_values_and_logits(name, two_threads):
    m = _model(name)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    tokens = torch.randint(0, m.cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(tokens)
    assert pack_for_decode(m) > 0 and is_packed(m)
    assert pack_for_decode(m) == 0  # idempotent
    for k, v in m.state_dict().items():  # same names, shapes and values; only the strides changed
        assert torch.equal(v, before[k]), k
    attn = m.layers["0"].attention
    assert attn.wq.weight.stride() == (1, attn.wq.out_features + 2 * attn.wk.out_features)
    assert (m.output.weight is m.tok_embeddings.weight) == m.cfg.tie_embeddings  # tied stays tied
    with torch.no_grad():
        torch.testing.assert_close(m(tokens), ref, rtol=1e-5, atol=1e-5)  # prefill-sized: fused GEMM
        torch.testing.assert_close(m(tokens[:1, :1]), ref[:1, :1], rtol=1e-5, atol=1e-5)  # one row: split GEMV
    assert unpack(m) > 0 and not is_packed(m)
    assert all(p.is_contiguous() for p in m.parameters())


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_generation_packed_and_split_equals_plain(name, two_threads):
    plain, packed = _model(name), _model(name)
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 12)]
    want = generate(plain, prompts, 12, GREEDY, pack=False)
    torch.set_num_threads(1)  # reference without the split GEMV as well
    assert generate(plain, prompts, 12, GREEDY, pack=False) == want
    torch.set_num_threads(2)
    assert generate(packed, prompts, 12, GREEDY) == want
    assert is_packed(packed)


def test_packed_model_trains_with_the_same_gradients():
    ref, m = _model("tiny-llama"), _model("tiny-llama")
    pack_for_decode(m)
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    for model in (ref, m):
        model.train()
        F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    for (name, p), q in zip(ref.named_parameters(), m.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_loading_weights_into_a_packed_model_updates_the_fused_path():
    src, m = _model("tiny-llama"), _model("tiny-llama")
    src.init_weights(7)
    pack_for_decode(m)
    m.load_state_dict(src.state_dict())  # copies into the views: the shared buffers follow
    assert is_packed(m)
    tokens = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(m(tokens), src(tokens), rtol=1e-5, atol=1e-5)
    # a replaced parameter breaks the packing: the fused path is no longer taken, results stay right
    attn = m.layers["0"].attention
    attn.wk.weight = torch.nn.Parameter(src.layers["0"].attention.wk.weight.detach().clone())
    assert fused_weight([attn.wq, attn.wk, attn.wv]) is None
    with torch.no_grad():
        torch.testing.assert_close(m(tokens), src(tokens), rtol=1e-5, atol=1e-5)


def test_generate_packs_small_batches_and_unpacks_larger_ones(two_threads):
    plain, m = _model("tiny-llama"), _model("tiny-llama")
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    assert generate(m, prompts[:1], 5, GREEDY) == generate(plain, prompts[:1], 5, GREEDY, pack=False)
    assert is_packed(m)
    assert generate(m, prompts, 5, GREEDY) == generate(plain, prompts, 5, GREEDY, pack=False)
    assert not is_packed(m) and all(p.is_contiguous() for p in m.parameters())


def test_fused_views_hold_the_group_views_only_inside_the_block(two_threads):
    m = _model("tiny-llama")
    attn, ffn = m.layers["0"].attention, m.layers["0"].feed_forward
    from ember.models.layers import Attention, SwiGLU

    with fused_views(m) as n:
        assert n == 0 and attn._fused is None  # not packed: nothing to hold
    pack_for_decode(m)
    tokens = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = m(tokens[:, -1:])
        with fused_views(m) as n:
            assert n == 2 * m.cfg.n_layer
            weight, _ = attn._fused
            assert weight.shape == (attn.wq.out_features + 2 * attn.wk.out_features, m.cfg.n_embd)
            assert weight.data_ptr() == attn.wq.weight.data_ptr() and ffn._fused is not None
            torch.testing.assert_close(m(tokens[:, -1:]), ref, rtol=1e-5, atol=1e-5)
    # dropped on exit: the model's own plain classes again
    assert type(attn) is Attention and type(ffn) is SwiGLU and "_fused" not in vars(attn)
    assert all(type(mod) is torch.nn.Linear for mod in m.modules() if isinstance(mod, torch.nn.Linear))


@pytest.mark.parametrize("name,over", [("tiny", {}), ("tiny-llama", {}), ("tiny-llama", dict(n_kv_head=1, bias=True))])
def test_block_decoder_steps_match_the_modules(name, over, two_threads, monkeypatch):
    """Batch-1 decode steps through layers.BlockDecoder (inside fused_views) == through the modules."""
    from ember.models import preset
    from ember.models.kv_cache import clear_caches, setup_caches
    from ember.infer.decode import BlockDecoder
    from ember.infer.generate import decode_step
    from ember.models.layers import Block

    m = Transformer(preset(name, **over))
    m.init_weights(0)
    m.eval()
    pack_for_decode(m)
    x = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(5))
    calls = []
    original = BlockDecoder.__call__
    monkeypatch.setattr(BlockDecoder, "__call__", lambda self, *a: calls.append(1) or original(self, *a))

    def steps(views: bool, per_sample: bool = False) -> torch.Tensor:
        setup_caches(m, 1, 16)
        with torch.inference_mode(), (fused_views(m) if views else contextlib.nullcontext()):
            outs = [decode_step(m, x[:, :5], torch.arange(5), None, None)]
            outs += [decode_step(m, x[:, t:t + 1], torch.tensor([t]), torch.tensor([[t]]) if per_sample else None, None)
                     for t in range(5, 12)]
        clear_caches(m)
        return torch.cat(outs)

    ref = steps(False)
    assert not calls
    out = steps(True)
    assert len(calls) == 7 * m.cfg.n_layer  # every one-token step of every layer went through the decoder
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(steps(True, per_sample=True), ref, rtol=1e-5, atol=1e-5)  # (B, T) positions
    with fused_views(m):
        assert all(b._decoder is not None for b in m.layers.values())
    assert all(type(b) is Block and "_decoder" not in vars(b) for b in m.layers.values())
    unpack(m)
    with fused_views(m):  # not packed: no decoder, the modules run
        assert all(type(b) is Block for b in m.layers.values())
