"""infer/decode: the decode layout, the split GEMV and the batch-1 block step give the same results as the plain model."""

import pytest
import torch
import torch.nn.functional as F

from ember.infer.generate import generate
from ember.infer.sample import SamplingParams
from ember.models import Transformer, preset
from ember.infer.decode import fused_weight, is_packed, pack_for_decode, split_linear, unpack

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
def test_packed_engine_equals_the_uncached_model(name, two_threads):
    """One prompt: the engine packs the weights and decodes through the BlockDecoders; its logprobs equal
    the plain model's full forward."""
    from ember.infer.engine import Engine, EngineConfig, RequestParams

    m = _model(name)
    prompt = torch.randint(0, 512, (7,), generator=torch.Generator().manual_seed(7)).tolist()
    eng = Engine(m, EngineConfig(block_size=8, num_blocks=8, max_num_seqs=1, batch_invariant=False))
    assert is_packed(m) and eng.runner.decoders is not None
    s = eng.generate([prompt], RequestParams(max_tokens=12, temperature=0, logprobs=0))[0].seqs[0]
    unpack(m)
    with torch.inference_mode():
        logp = F.log_softmax(m(torch.tensor([prompt + s.output]))[0], dim=-1)
    want = logp[len(prompt) - 1: -1].gather(1, torch.tensor(s.output).view(-1, 1)).view(-1)
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in s.logprobs]), want, rtol=0, atol=1e-5)
    assert s.output == [int(r.argmax()) for r in logp[len(prompt) - 1: -1]]


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


def test_generate_packs_one_or_two_prompts_and_unpacks_for_more(two_threads):
    plain, m = _model("tiny-llama"), _model("tiny-llama")
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    from ember.infer.engine import Engine, EngineConfig, RequestParams

    ref = Engine(plain, EngineConfig(block_size=8, num_blocks=16, batch_invariant=False))
    want = [r.seqs[0].output for r in ref.generate(prompts, RequestParams(max_tokens=5, temperature=0))]
    assert not is_packed(plain)
    assert generate(m, prompts[:1], 5, GREEDY) == want[:1]
    assert is_packed(m)
    assert generate(m, prompts, 5, GREEDY) == want
    assert not is_packed(m) and all(p.is_contiguous() for p in m.parameters())


@pytest.mark.parametrize("name,over", [("tiny", {}), ("tiny-llama", {}), ("tiny-llama", dict(n_kv_head=1, bias=True))])
def test_block_decoder_steps_match_the_modules(name, over, two_threads, monkeypatch):
    """Batch-1 decode steps through decode.BlockDecoder (the engine's packed path) == through the modules
    (the same engine, row-major, batch of 4 rows)."""
    from ember.infer.decode import BlockDecoder
    from ember.infer.engine import Engine, EngineConfig, RequestParams

    def run(pack: bool):
        m = Transformer(preset(name, **over))
        m.init_weights(0)
        eng = Engine(m, EngineConfig(block_size=8, num_blocks=8, max_num_seqs=1, batch_invariant=False, pack=pack))
        x = torch.randint(0, 512, (5,), generator=torch.Generator().manual_seed(5)).tolist()
        s = eng.generate([x], RequestParams(max_tokens=7, temperature=0, logprobs=0))[0].seqs[0]
        return s.output, torch.tensor([lp.logprob for lp in s.logprobs])

    calls = []
    original = BlockDecoder.__call__
    monkeypatch.setattr(BlockDecoder, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    ref_ids, ref_lp = run(False)
    assert not calls
    ids, lp = run(True)
    n_layer = preset(name, **over).n_layer
    assert len(calls) == 6 * n_layer  # every one-token step of every layer went through the decoder
    assert ids == ref_ids
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-5)
