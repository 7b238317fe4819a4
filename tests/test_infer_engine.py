"""ember.infer.engine: paged KV + continuous batching against `ember generate` and against itself.

References: the static-cache `generate` (greedy tokens), the uncached full forward (logprobs), and the
engine running one request alone (the batch-invariance contract: bit-identical tokens and logprobs
whatever else is in the batch, prefix-cache hits or preemptions).
"""

import pytest
import torch
import torch.nn.functional as F

from ember.errors import EmberError
from ember.infer.decode import split_linear
from ember.infer.engine import Engine, EngineConfig, RequestParams
from ember.infer.generate import generate
from ember.infer.sample import SamplingParams
from ember.models import Transformer, preset

LENS = [3, 40, 17, 90, 5, 33]


def _model(name, seed=0, **over):
    m = Transformer(preset(name, **over))
    m.init_weights(seed)
    return m.eval()


def _prompts(lens, seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


def _greedy(max_tokens=12, **kw):
    return RequestParams(max_tokens=max_tokens, temperature=0, logprobs=0, **kw)


def _run(model, prompts, params, **cfg):
    eng = Engine(model, EngineConfig(**{"block_size": 8, "max_num_batched_tokens": 32, **cfg}))
    reqs = eng.generate(prompts, params)
    return eng, reqs


def _tokens_and_logprobs(reqs):
    return [(s.output, [lp.logprob for lp in s.logprobs]) for r in reqs for s in r.seqs]


@pytest.fixture(autouse=True)
def one_thread(set_threads):
    set_threads(2)


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("num_blocks", [None, 16])  # 16 blocks of 8 slots: forces preemption
def test_greedy_equals_generate(name, prefix_caching, num_blocks):
    m = _model(name)
    prompts = _prompts(LENS)
    ref = [generate(m, [p], 12, SamplingParams(temperature=0))[0] for p in prompts]
    eng, reqs = _run(m, prompts + prompts[:2], _greedy(), prefix_caching=prefix_caching, num_blocks=num_blocks)
    assert [r.seqs[0].output for r in reqs] == ref + ref[:2]
    if num_blocks:
        assert eng.stats["preemptions"] > 0
    assert eng.pool.num_used == 0  # every block is free (cached blocks count as free)
    assert not eng.requests  # generate() released them


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_logprobs_equal_full_forward(name):
    m = _model(name)
    prompts = _prompts([7, 20])
    _, reqs = _run(m, prompts, RequestParams(max_tokens=6, temperature=0, logprobs=3, prompt_logprobs=2))
    for p, r in zip(prompts, reqs):
        s = r.seqs[0]
        seq = torch.tensor([p + s.output])
        with torch.inference_mode():
            logp = F.log_softmax(m(seq)[0].float(), dim=-1)  # (T, V)
        got = torch.tensor([lp.logprob for lp in s.logprobs])
        want = logp[len(p) - 1: -1].gather(1, torch.tensor(s.output).view(-1, 1)).view(-1)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        top = s.logprobs[0].top
        assert len(top) == 3 and top[0][0] == s.output[0]  # greedy: the chosen token is the top one
        assert r.prompt_logprobs[0] is None  # the first prompt token has no prefix
        plp = torch.tensor([x.logprob for x in r.prompt_logprobs[1:]])
        torch.testing.assert_close(plp, logp[: len(p) - 1].gather(1, torch.tensor(p[1:]).view(-1, 1)).view(-1),
                                   rtol=0, atol=1e-5)
        assert all(len(x.top) == 2 for x in r.prompt_logprobs[1:])


@pytest.mark.parametrize("tile", [0, 16])
def test_batch_invariance_bitwise(tile):
    """The contract: one request's greedy tokens AND logprobs are bit-identical alone, in a mixed batch
    with chunked prefill, after prefix-cache hits, and after preemption (a model wide enough that its
    products take MKL's blocked paths); with one query per attention call and with tiled attention."""
    m = _model("tiny-llama", n_embd=192, n_head=6, n_kv_head=2, n_layer=2, vocab_size=2048, block_size=256)
    prompts = _prompts([9, 70, 33, 120, 4, 51], vocab=2048)
    alone = [_tokens_and_logprobs(_run(m, [p], _greedy(16), prefix_caching=False, attention_tile=tile)[1])[0]
             for p in prompts]
    # all at once, small token budget (chunked prefill interleaved with decodes)
    _, reqs = _run(m, prompts, _greedy(16), max_num_batched_tokens=24, attention_tile=tile)
    assert _tokens_and_logprobs(reqs) == alone
    # the same prompts again behind shared prefixes (prefix-cache hits), and in reverse order
    eng = Engine(m, EngineConfig(block_size=8, max_num_batched_tokens=64, attention_tile=tile))
    eng.generate(prompts, _greedy(16))
    reqs = eng.generate(prompts[::-1], _greedy(16))
    assert eng.stats["cached_tokens"] > 0
    assert _tokens_and_logprobs(reqs) == alone[::-1]
    # a pool too small for all of them: preemption and recompute
    eng, reqs = _run(m, prompts, _greedy(16), num_blocks=20, max_num_batched_tokens=64, attention_tile=tile)
    assert eng.stats["preemptions"] > 0
    assert _tokens_and_logprobs(reqs) == alone


def test_tiled_attention_rows_do_not_depend_on_the_row_count():
    """What tiled attention relies on: SDPA with an explicit mask computes a query row the same way for
    any row count >= 4 and whatever the other rows hold (key length fixed)."""
    g = torch.Generator().manual_seed(0)
    H, K, D, L = 9, 3, 64, 640
    q = torch.randn(1, H, 32, D, generator=g)
    k, v = torch.randn(1, K, L, D, generator=g), torch.randn(1, K, L, D, generator=g)
    mask = torch.ones(1, 1, 32, L, dtype=torch.bool)
    mask[..., 600:] = False
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)[:, :, 3]
    for rows in (4, 5, 8, 16):
        other = torch.randn(1, H, rows, D, generator=g)
        other[:, :, 3] = q[:, :, 3]
        got = F.scaled_dot_product_attention(other, k, v, attn_mask=mask[:, :, :rows], enable_gqa=True)[:, :, 3]
        assert torch.equal(got, ref), rows


def test_tiled_attention_logprobs_equal_full_forward():
    m = _model("tiny-llama")
    prompts = _prompts([7, 40])
    _, reqs = _run(m, prompts, RequestParams(max_tokens=6, temperature=0, logprobs=0, prompt_logprobs=0),
                   attention_tile=8)
    for p, r in zip(prompts, reqs):
        s = r.seqs[0]
        with torch.inference_mode():
            logp = F.log_softmax(m(torch.tensor([p + s.output]))[0].float(), dim=-1)
        got = torch.tensor([x.logprob for x in r.prompt_logprobs[1:]] + [x.logprob for x in s.logprobs])
        ids = torch.tensor(p[1:] + s.output).view(-1, 1)
        torch.testing.assert_close(got, logp[:-1].gather(1, ids).view(-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(192, 576), (576, 192), (64, 2048), (96, 100)])
def test_split_products_are_row_invariant_at_multiples_of_4(shape):
    """What batch invariance rests on: each row of a split product over a row count that is a multiple
    of 4 is computed the same way whatever the other rows are and wherever it sits."""
    C, N = shape
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(N, C, generator=g), torch.randn(300, C, generator=g)
    ref = split_linear(x[:4], w, parts=2)[0]
    for M in (4, 8, 12, 32, 64, 128, 256):
        idx = torch.randperm(299, generator=g)[:M] + 1
        pos = int(torch.randint(0, M, (1,), generator=g))
        idx[pos] = 0
        assert torch.equal(split_linear(x[idx], w, parts=2)[pos], ref), (M, pos)


def test_prefix_cache_reports_cached_tokens():
    m = _model("tiny-llama")
    p = _prompts([41])[0]
    eng = Engine(m, EngineConfig(block_size=8))
    a = eng.add_request(p, _greedy(4))
    while eng.has_unfinished():
        eng.step()
    b = eng.add_request(p + [1, 2, 3], _greedy(4))
    while eng.has_unfinished():
        eng.step()
    assert a.cached_tokens == 0
    assert b.cached_tokens == 40  # 5 full blocks of the first prompt
    assert b.seqs[0].output == eng.generate([p + [1, 2, 3]], _greedy(4))[0].seqs[0].output


def test_n_samples_with_seed_fork_and_match_single_requests():
    m = _model("tiny-llama")
    p = _prompts([21])[0]
    params = dict(max_tokens=10, temperature=1.0, top_k=50, logprobs=0)
    eng = Engine(m, EngineConfig(block_size=8))
    req = eng.generate([p], RequestParams(n=3, seed=7, **params))[0]
    outs = [s.output for s in req.seqs]
    assert len({tuple(o) for o in outs}) > 1  # different samples
    singles = [eng.generate([p], RequestParams(n=1, seed=7 + i, **params))[0].seqs[0].output for i in range(3)]
    assert outs == singles
    again = eng.generate([p], RequestParams(n=3, seed=7, **params))[0]
    assert [s.output for s in again.seqs] == outs  # a seed reproduces
    assert eng.pool.num_used == 0


def test_sampling_options_and_stops():
    m = _model("tiny-llama")
    p = _prompts([12])[0]
    eng = Engine(m, EngineConfig(block_size=8), eos_ids=())
    greedy = eng.generate([p], _greedy(10))[0].seqs[0]
    stop_at = greedy.output[3]
    r = eng.generate([p], _greedy(10, stop_token_ids=(stop_at,)))[0].seqs[0]
    first = greedy.output.index(stop_at)
    assert r.output == greedy.output[: first + 1] and r.finish_reason == "stop"
    assert greedy.finish_reason == "length"
    for k in (1, 3):
        out = eng.generate([p], RequestParams(max_tokens=10, temperature=1.5, top_k=k, seed=0, logprobs=k))[0].seqs[0]
        for tok, lp in zip(out.output, out.logprobs):
            assert tok in [t for t, _ in lp.top]  # only top-k tokens are drawn
    # a strong frequency penalty stops greedy from repeating tokens
    pen = eng.generate([p], _greedy(20, frequency_penalty=2.0))[0].seqs[0].output
    assert len(set(pen)) >= len(set(eng.generate([p], _greedy(20))[0].seqs[0].output))


def test_stop_strings_with_a_tokenizer(tiny_data):
    from ember.tokenizer import Tokenizer

    tok = Tokenizer.load(tiny_data / "tokenizer")
    m = _model("tiny-llama")
    eng = Engine(m, EngineConfig(block_size=8), tokenizer=tok)
    p = tok.encode("First Citizen:")
    s = eng.generate([p], _greedy(24, ignore_eos=True))[0].seqs[0]
    text = tok.decode(s.output)
    assert s.text == text
    stop = text[5:8]
    cut = eng.generate([p], _greedy(24, stop=(stop,), ignore_eos=True))[0].seqs[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]


def test_abort_frees_blocks_at_once():
    m = _model("tiny-llama")
    eng = Engine(m, EngineConfig(block_size=8))
    reqs = [eng.add_request(p, _greedy(50)) for p in _prompts([30, 30, 30])]
    for _ in range(5):
        eng.step()
    used = eng.pool.num_used
    eng.abort(reqs[1].id)
    assert eng.pool.num_used < used and reqs[1].seqs[0].finish_reason == "abort"
    while eng.has_unfinished():
        eng.step()
    assert eng.pool.num_used == 0
    assert len(reqs[0].seqs[0].output) == 50 and len(reqs[1].seqs[0].output) < 50


def test_bad_requests_are_clear_errors():
    m = _model("tiny-llama")
    eng = Engine(m, EngineConfig(block_size=8, num_blocks=4))
    with pytest.raises(EmberError, match="context"):
        eng.add_request([1] * 100, _greedy(100))
    with pytest.raises(EmberError, match="KV pool"):
        eng.add_request([1] * 30, _greedy(10))
    with pytest.raises(EmberError, match="temperature"):
        eng.add_request([1], RequestParams(temperature=-1))
    with pytest.raises(EmberError, match="vocabulary"):
        eng.add_request([100000], _greedy())
    with pytest.raises(EmberError, match="stop strings"):
        eng.add_request([1], _greedy(stop=("x",)))


def test_ngram_proposal_is_prompt_lookup():
    from ember.infer.engine import ngram_proposal

    ids = [5, 6, 7, 8, 9, 1, 2, 5, 6, 7]
    assert ngram_proposal(ids, 3, 1, 4) == [8, 9, 1]  # "5 6 7" occurred before: what followed it
    assert ngram_proposal([1, 2, 3, 4], 2, 1, 3) == []  # no earlier occurrence of any suffix
    assert ngram_proposal([3, 1, 3], 4, 1, 2) == [1, 3]  # shorter suffix, latest occurrence


@pytest.mark.parametrize("invariant", [True, False])
def test_speculative_decoding_equals_plain_greedy(invariant):
    """Greedy speculative decoding (prompt lookup, and a draft model) gives the plain greedy tokens; with
    batch invariance also the same logprobs, bit for bit; acceptance is reported."""
    m = _model("tiny-llama")
    g = torch.Generator().manual_seed(3)
    base = torch.randint(0, 512, (12,), generator=g).tolist()
    prompts = [base * 3, _prompts([9])[0], (base[:5] + [7]) * 4]  # repetitive prompts: lookups hit
    kw = dict(block_size=8, batch_invariant=invariant)
    _, plain = _run(m, prompts, _greedy(24), **kw)
    want = _tokens_and_logprobs(plain)
    eng, spec = _run(m, prompts, _greedy(24), speculative="ngram", num_speculative_tokens=3, **kw)
    got = _tokens_and_logprobs(spec)
    assert [t for t, _ in got] == [t for t, _ in want]
    if invariant:
        assert got == want
    assert eng.stats["spec_proposed"] > 0 and eng.spec_acceptance() is not None
    # a draft model: a smaller one (random: few acceptances), and the model itself (all accepted)
    small = _model("tiny-llama", seed=1, n_layer=1)
    for draft, full in ((small, False), (_model("tiny-llama"), True)):
        eng = Engine(m, EngineConfig(speculative="draft", num_speculative_tokens=4, **kw), draft_model=draft)
        out = _tokens_and_logprobs(eng.generate(prompts, _greedy(24)))
        assert [t for t, _ in out] == [t for t, _ in want]
        if invariant:
            assert out == want
        assert eng.stats["spec_proposed"] > 0
        if full:
            assert eng.spec_acceptance() == 1.0
        assert eng.pool.num_used == 0


def test_speculative_sampling_keeps_the_distribution():
    """speculative_accept: whatever the proposal, each emitted token is distributed as the model's
    probabilities (chi-square-style bound over 20,000 draws of a 5-way distribution)."""
    from ember.infer.engine import speculative_accept

    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    g = torch.Generator().manual_seed(0)
    for proposal in ([0], [3], [4, 4]):  # a likely, an unlikely and a repeated proposal
        counts = torch.zeros(5)
        n = 20_000
        for _ in range(n):
            counts[speculative_accept([p] * (len(proposal) + 1), proposal, g)[0]] += 1
        freq = counts / n
        assert (freq - p).abs().max() < 0.015, (proposal, freq)


def test_sampled_requests_speculate_reproducibly_within_max_tokens():
    m = _model("tiny-llama")
    p = (_prompts([6])[0]) * 5
    run = lambda seed: Engine(m, EngineConfig(block_size=8, speculative="ngram")).generate(  # noqa: E731
        [p], RequestParams(max_tokens=15, temperature=0.7, top_k=20, seed=seed, logprobs=0))[0].seqs[0]
    a, b = run(3), run(3)
    assert a.output == b.output and len(a.output) == 15 and len(a.logprobs) == 15
    eng = Engine(m, EngineConfig(block_size=8, speculative="ngram"))
    eng.generate([p], RequestParams(max_tokens=15, temperature=0.7, seed=3))
    assert eng.stats["spec_proposed"] > 0
    # penalties depend on the tokens before each position: those requests decode one token at a time
    eng = Engine(m, EngineConfig(block_size=8, speculative="ngram"))
    eng.generate([p], RequestParams(max_tokens=15, temperature=0.7, seed=3, repetition_penalty=1.3))
    assert eng.stats["spec_proposed"] == 0


@pytest.mark.parametrize("speculative", ["ngram", "draft"])
def test_speculation_in_a_nearly_full_pool_equals_plain(speculative):
    """Several speculating sequences share a pool that cannot hold all their proposals (and forces
    preemption): proposals shrink to fit, the tokens stay the plain greedy ones."""
    m = _model("tiny-llama")
    base = _prompts([10], seed=5)[0]
    prompts = [base * 3, base[:7] * 4, base[3:] * 3, base * 2]
    _, plain = _run(m, prompts, _greedy(20), num_blocks=40)
    kw = dict(draft_model=_model("tiny-llama")) if speculative == "draft" else {}
    eng = Engine(m, EngineConfig(block_size=8, num_blocks=24, speculative=speculative, num_speculative_tokens=4), **kw)
    out = eng.generate(prompts, _greedy(20))
    assert _tokens_and_logprobs(out) == _tokens_and_logprobs(plain)
    assert eng.stats["spec_proposed"] > 0 and eng.pool.num_used == 0
