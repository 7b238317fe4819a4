"""ember.infer.generate (offline generation over the engine) / text: cached == uncached, batched == one-by-one,
stops, parity with transformers."""


import pytest
import torch

from ember.errors import EmberError
from ember.infer.generate import generate, generate_iter
from ember.infer.sample import SamplingParams
from ember.infer.text import TextStream
from ember.models import Transformer, preset
from ember.models.kv_cache import clear_caches, setup_caches

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(autouse=True)
def one_thread(set_threads):
    """Tiny models are overhead-bound: one thread is faster (and steadier on a busy machine)."""
    set_threads(1)


def _model(name, seed=0):
    m = Transformer(preset(name))
    m.init_weights(seed)
    return m.eval()


def _prompts(lens, seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_model_static_cache_logits_equal_uncached_at_every_step(name):
    """The model's own static KV cache (models/kv_cache.py): prefill then one token at a time == no cache."""
    m = _model(name)
    seq = torch.tensor(_prompts([64], seed=1))  # (1, 64)
    T0 = 10
    with torch.inference_mode():
        full = m(seq)  # (1, 64, V): the uncached reference
        setup_caches(m, 1, 64)
        logits = m(seq[:, :T0], input_pos=torch.arange(T0))[:, -1]
        torch.testing.assert_close(logits, full[:, T0 - 1], rtol=1e-5, atol=1e-5)
        for t in range(T0, 64):
            logits = m(seq[:, t: t + 1], input_pos=torch.tensor([t]))[:, -1]
            torch.testing.assert_close(logits, full[:, t], rtol=1e-5, atol=1e-5)
        clear_caches(m)


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_batched_generation_equals_one_by_one(name):
    m = _model(name)
    prompts = _prompts([5, 9, 1, 7, 16], seed=2)
    one = [generate(m, [p], 24, GREEDY)[0] for p in prompts]
    assert generate(m, prompts, 24, GREEDY) == one
    # the uncached reference: argmax of the full forward, token by token
    seq = list(prompts[1])
    with torch.inference_mode():
        for _ in range(24):
            seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    assert seq[len(prompts[1]):] == one[1]


def test_sampled_batch_is_reproducible_by_seed():
    m = _model("tiny")
    params = SamplingParams(temperature=1.0, top_k=20, repetition_penalty=1.2)
    run = lambda s: generate(m, _prompts([4, 6]), 16, params, generator=torch.Generator().manual_seed(s))
    assert run(5) == run(5) != run(6)


def test_stop_ids_and_stop_fn_finish_samples_independently():
    m = _model("tiny")
    prompts = _prompts([4, 6, 5], seed=3)
    free = generate(m, prompts, 12, GREEDY)
    stop_tok = free[0][3]
    out = generate(m, prompts, 12, GREEDY, stop_ids=[stop_tok])
    assert out[0] == free[0][: free[0].index(stop_tok) + 1]  # the stop id is the last one
    # stop_fn ends sample 1 after 2 tokens; the others are untouched
    calls = {}

    def stop_fn(b, tok):
        calls[b] = calls.get(b, 0) + 1
        return b == 1 and calls[b] == 2

    out = generate(m, prompts, 12, GREEDY, stop_fn=stop_fn)
    assert out[1] == free[1][:2] and out[2] == free[2]
    # when all samples are done the loop ends early
    steps = list(generate_iter(m, prompts, 12, GREEDY, stop_fn=lambda b, t: True))
    assert len(steps) == 1


def test_streaming_yields_each_step_and_nothing_after_finish():
    m = _model("tiny")
    prompts = _prompts([3, 8])
    seen = []
    out = generate(m, prompts, 6, GREEDY, stop_fn=lambda b, t: b == 0, stream=seen.append)
    assert len(seen) == 6 and seen[0][0] == out[0] and all(s[0] == [] for s in seen[1:])
    assert [t for s in seen for t in s[1]] == out[1] and all(len(s[1]) == 1 for s in seen)
    # prompt lookup: several tokens per step, the same greedy tokens
    rep = [prompts[1] * 4]
    steps = []
    assert generate(m, rep, 24, GREEDY, speculative="ngram", stream=steps.append) == generate(m, rep, 24, GREEDY)
    assert len(steps) < 24


def test_too_long_prompt_and_empty_prompt_are_errors():
    m = _model("tiny")  # block_size 128
    with pytest.raises(EmberError, match="context window"):
        generate(m, _prompts([120]), 10, GREEDY)
    with pytest.raises(EmberError, match="at least one token"):
        generate(m, [[]], 4, GREEDY)


# ----------------------------------------------------------------------------- text / stop strings
class CharTok:
    """A byte tokenizer: id = byte value (so multi-byte characters span several ids)."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def _stream_all(text, stop, window=64):
    s, shown = TextStream(CharTok(), stop, window=window), ""
    for b in text.encode():
        shown += s.push(b)
        if s.stopped:
            break
    return shown + s.flush(), s


@pytest.mark.parametrize("window", [2, 64])
def test_text_stream_cuts_at_stop_and_never_shows_it(window):
    shown, s = _stream_all("Hello world. END more text", ["END", "###"], window)
    assert s.stopped and shown == s.text == "Hello world. "
    shown, s = _stream_all("a partial EN but no stop", ["END"], window)
    assert not s.stopped and shown == "a partial EN but no stop"


def test_text_stream_holds_split_utf8_and_stop_prefixes():
    s = TextStream(CharTok(), ["<|end|>"])
    deltas = [s.push(b) for b in "né<|en".encode()]
    assert "\ufffd" not in "".join(deltas) and "".join(deltas) == "né"  # "<|en" is held back
    deltas += [s.push(b) for b in "d|>tail".encode()]
    assert s.stopped and "".join(deltas) == "né"


# ------------------------------------------------------------------- parity with transformers.generate
def _hf_tiny(kind, tmp_path):
    """A tiny random HF model saved to disk and converted with `ember convert --from-hf`."""
    transformers = pytest.importorskip("transformers")
    from ember import cli
    from ember.io.checkpoint import load_checkpoint

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)
        hf = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                                       max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                                       tie_word_embeddings=False)
        hf = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # weights large enough for confident, tie-free argmaxes
        g = torch.Generator().manual_seed(1)
        for name, p in hf.named_parameters():
            is_scale = p.dim() == 1 and ("norm" in name or ".ln_" in name) and "bias" not in name
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if is_scale else 0.3 * torch.randn(p.shape, generator=g))
    hf.eval().save_pretrained(tmp_path / "hf")
    assert cli.main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "em")]) == 0
    model, _ = load_checkpoint(tmp_path / "em")
    return hf, model.eval(), cfg.eos_token_id


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_matches_transformers_generate(kind, tmp_path):
    hf, model, eos = _hf_tiny(kind, tmp_path)
    prompts = _prompts([6, 11, 3], seed=4, vocab=101)
    ours = generate(model, prompts, 30, GREEDY, stop_ids=[eos])
    for p, out in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=30, do_sample=False, use_cache=True, eos_token_id=eos,
                              pad_token_id=eos)[0, len(p):].tolist()
        assert out == ref
    # batched, left-padded on the HF side too
    T = max(map(len, prompts))
    ids = torch.tensor([[eos] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, use_cache=True,
                          eos_token_id=eos, pad_token_id=eos)[:, T:].tolist()
    for out, r in zip(ours, ref):
        assert out == r[: len(out)] and all(t == eos for t in r[len(out):])
