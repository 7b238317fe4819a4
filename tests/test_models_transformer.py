"""ember.models.Transformer: shapes, meta build, init, dropout, tying, mask modes, KV cache, RoPE.

Mask modes are checked by perturbation: change one input token and see which logits move.
"""

from __future__ import annotations

import math

import pytest
import torch

from ember.models import ModelConfig, RopeScaling, Transformer, preset
from ember.models.kv_cache import clear_caches, setup_caches
from ember.models.layers import rope_inv_freq

TOL = 1e-5


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    model = Transformer(cfg)
    model.init_weights(seed)
    return model.eval()


def tokens(cfg: ModelConfig, B: int = 2, T: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, T), generator=g)


def perturb(x: torch.Tensor, b: int, j: int, vocab: int) -> torch.Tensor:
    """A copy of x with token (b, j) replaced by a different id."""
    y = x.clone()
    y[b, j] = (y[b, j] + 1 + vocab // 2) % vocab
    return y


def moved(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(T,) bool: which positions' logits differ between two (T, V) logit rows."""
    return (a - b).abs().amax(dim=-1) > 1e-6


VARIANTS = {
    "tiny": ("tiny", {}),
    "tiny-llama": ("tiny-llama", {}),
    "mha": ("tiny-llama", dict(n_kv_head=4)),
    "gqa": ("tiny", dict(n_kv_head=2)),
    "mqa": ("tiny-llama", dict(n_kv_head=1)),
    "no-bias": ("tiny", dict(bias=False)),
    "bias-llama": ("tiny-llama", dict(bias=True)),
    "untied": ("tiny", dict(tie_embeddings=False)),
    "tied-llama": ("tiny-llama", dict(tie_embeddings=True)),
    "rmsnorm-learned-gelu": ("tiny", dict(norm="rmsnorm")),
    "layernorm-rope-swiglu": ("tiny", dict(pos_emb="rope", mlp="swiglu")),
    "rope-gelu": ("tiny", dict(pos_emb="rope")),
    "learned-swiglu": ("tiny", dict(mlp="swiglu")),
    "rope-scaling": ("tiny-llama", dict(rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=32))),
    "head-dim": ("tiny-llama", dict(head_dim=32)),
}


# ----------------------------------------------------------------------------------- shapes, counts
@pytest.mark.parametrize("name", list(VARIANTS))
def test_output_shape_and_param_count(name):
    base, over = VARIANTS[name]
    cfg = preset(base, **over)
    model = build(cfg)
    x = tokens(cfg, B=3, T=7)
    logits = model(x)
    assert logits.shape == (3, 7, cfg.vocab_size)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert model.num_params() == cfg.num_params()
    assert model.num_params(embedding=False) == cfg.num_params(embedding=False)
    assert (model.output.weight is model.tok_embeddings.weight) == cfg.tie_embeddings
    assert (model.pos_embeddings is not None) == (cfg.pos_emb == "learned")
    assert model.layers["0"].attention.wk.weight.shape == (cfg.n_kv_head * cfg.head_dim, cfg.n_embd)
    assert (model.layers["0"].attention.wq.bias is not None) == cfg.bias


def test_big_preset_builds_on_meta():
    with torch.device("meta"):
        model = Transformer(preset("llama-3-70b"))
    assert next(model.parameters()).is_meta
    assert model.num_params() == preset("llama-3-70b").num_params()
    assert abs(model.num_params() / 70.55e9 - 1) < 1e-3
    assert len(model.layers) == 80


def test_gpt2_param_count():
    # GPT-2 small with vocab padded to 50304: the well-known 124M
    assert abs(preset("gpt2").num_params() - 124.48e6) < 0.01e6


# ------------------------------------------------------------------------------------------- init
def test_init_weights_statistics():
    cfg = preset("tiny", n_embd=128, n_layer=4, init_std=0.02)
    model = build(cfg, seed=0)
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name, p in model.named_parameters():
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            assert p.std().item() == pytest.approx(resid, rel=0.1), name
        elif name.endswith(("norm.weight",)):
            assert torch.all(p == 1), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:  # embeddings and the other linears
            assert p.std().item() == pytest.approx(0.02, rel=0.1), name
            assert abs(p.mean().item()) < 0.002, name


def test_init_weights_is_seeded():
    a, b = build(preset("tiny-llama"), seed=3), build(preset("tiny-llama"), seed=3)
    c = build(preset("tiny-llama"), seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["layers.0.attention.wq.weight"], sc["layers.0.attention.wq.weight"])


@pytest.mark.parametrize("base", ["tiny", "tiny-llama"])
def test_tied_weights_survive_meta_to_empty_init(base):
    cfg = preset(base, tie_embeddings=True)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights(0)
    assert model.output.weight is model.tok_embeddings.weight
    assert model.num_params() == cfg.num_params()
    if cfg.pos_emb == "rope":  # the rope buffer is recomputed, not left as garbage
        ref = Transformer(cfg).rope
        assert torch.allclose(model.rope, ref)
    # gradient flows into the one shared tensor from both uses
    model(tokens(cfg)).sum().backward()
    assert model.tok_embeddings.weight.grad is not None


def test_meta_init_matches_direct_init():
    cfg = preset("tiny-llama")
    with torch.device("meta"):
        meta = Transformer(cfg)
    meta.to_empty(device="cpu")
    meta.init_weights(7)
    direct = build(cfg, seed=7)
    x = tokens(cfg)
    assert torch.allclose(meta.eval()(x), direct(x), atol=TOL)


# ---------------------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("base", ["tiny", "tiny-llama"])
def test_dropout_only_in_train_mode(base):
    cfg = preset(base, dropout=0.3)
    model = build(cfg)
    x = tokens(cfg)
    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():
        e1, e2 = model(x), model(x)
        model.train()
        t1, t2 = model(x), model(x)
    assert torch.equal(e1, e2)
    assert not torch.allclose(t1, t2)
    assert not torch.allclose(t1, e1)
    # without dropout, train and eval agree
    plain = build(preset(base))
    with torch.no_grad():
        assert torch.allclose(plain.train()(x), plain.eval()(x), atol=TOL)


# ------------------------------------------------------------------------------------- mask modes
@pytest.mark.parametrize("base", ["tiny", "tiny-llama"])
def test_causal_mask_by_perturbation(base):
    cfg = preset(base, mask="causal")
    model = build(cfg)
    x = tokens(cfg, B=2, T=8)
    with torch.no_grad():
        ref = model(x)
        for j in range(8):
            out = model(perturb(x, 0, j, cfg.vocab_size))
            m = moved(out[0], ref[0])
            assert not m[:j].any(), f"position < {j} saw token {j}"
            assert m[j:].all(), f"positions >= {j} did not see token {j}"
            assert torch.allclose(out[1], ref[1], atol=TOL)  # the other sample is untouched


@pytest.mark.parametrize("base", ["tiny", "tiny-llama"])
def test_bidirectional_mask_by_perturbation(base):
    cfg = preset(base, mask="bidirectional")
    model = build(cfg)
    x = tokens(cfg, B=2, T=8)
    with torch.no_grad():
        ref = model(x)
        out = model(perturb(x, 1, 7, cfg.vocab_size))  # the last token
    assert moved(out[1], ref[1]).all()  # every position, position 0 included, sees it
    assert torch.allclose(out[0], ref[0], atol=TOL)


@pytest.mark.parametrize("base", ["tiny", "tiny-llama"])
def test_prefix_mask_by_perturbation(base):
    cfg = preset(base, mask="prefix")
    model = build(cfg)
    T, prefix = 8, torch.tensor([3, 5])
    x = tokens(cfg, B=2, T=T)
    with torch.no_grad():
        ref = model(x, prefix_len=prefix)
        for b, P in enumerate(prefix.tolist()):
            # inside the prefix: bidirectional (position 0 sees the prefix's last token)
            out = model(perturb(x, b, P - 1, cfg.vocab_size), prefix_len=prefix)
            assert moved(out[b], ref[b]).all(), f"sample {b}: the prefix is not fully visible"
            # after the prefix: causal (no position sees a later token)
            for j in range(P, T):
                out = model(perturb(x, b, j, cfg.vocab_size), prefix_len=prefix)
                m = moved(out[b], ref[b])
                assert not m[:j].any(), f"sample {b}: a position < {j} saw token {j} (prefix {P})"
                assert m[j:].all()
                assert torch.allclose(out[1 - b], ref[1 - b], atol=TOL)


def test_prefix_zero_equals_causal_and_full_equals_bidirectional():
    cfg = preset("tiny-llama", mask="prefix")
    model = build(cfg)
    x = tokens(cfg, B=2, T=8)
    with torch.no_grad():
        zero = model(x, prefix_len=torch.tensor([0, 1]))  # a prefix of 1 is causal too
        full = model(x, prefix_len=torch.tensor([8, 8]))
        model.cfg.mask = "causal"
        causal = model(x)
        model.cfg.mask = "bidirectional"
        bidir = model(x)
    assert torch.allclose(zero, causal, atol=TOL)
    assert torch.allclose(full, bidir, atol=TOL)


def test_prefix_mask_needs_prefix_len():
    model = build(preset("tiny", mask="prefix"))
    with pytest.raises(ValueError, match="prefix_len"):
        model(tokens(model.cfg))


# --------------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("base,over", [("tiny", {}), ("tiny", dict(n_kv_head=2)), ("tiny-llama", {}),
                                       ("tiny-llama", dict(n_kv_head=1))])
def test_kv_cache_matches_uncached(base, over):
    cfg = preset(base, **over)
    model = build(cfg)
    B, T, prefill = 2, 12, 5
    x = tokens(cfg, B=B, T=T)
    with torch.no_grad():
        ref = model(x)  # (B, T, V) uncached, causal
        setup_caches(model, batch_size=B, max_seq_len=16)
        out = model(x[:, :prefill], input_pos=torch.arange(prefill))
        assert torch.allclose(out, ref[:, :prefill], atol=TOL)
        for t in range(prefill, T):  # decode one token at a time
            out = model(x[:, t:t + 1], input_pos=torch.tensor([t]))
            assert out.shape == (B, 1, cfg.vocab_size)
            assert torch.allclose(out[:, 0], ref[:, t], atol=TOL), f"step {t}"
        clear_caches(model)
        assert torch.allclose(model(x), ref, atol=TOL)


@pytest.mark.parametrize("base", ["tiny", "tiny-llama"])
def test_eager_decode_over_filled_slots_matches_static_cache_length(base, monkeypatch):
    """Eager steps attend over the filled cache slots only; compiled ones over all slots with a mask.
    Both give the same logits, with and without a left-padding mask."""
    cfg = preset(base)
    model = build(cfg)
    B, T, P, S = 2, 9, 4, 16
    x = tokens(cfg, B=B, T=T)
    pad = torch.ones(B, 1, T, S, dtype=torch.bool)
    pad[1, :, :, 0] = False  # sample 1 has a pad in slot 0

    def run(attn_mask):
        setup_caches(model, batch_size=B, max_seq_len=S)
        outs = [model(x[:, :P], input_pos=torch.arange(P),
                      attn_mask=None if attn_mask is None else attn_mask[:, :, :P])]
        for t in range(P, T):
            outs.append(model(x[:, t:t + 1], input_pos=torch.tensor([t]),
                              attn_mask=None if attn_mask is None else attn_mask[:, :, t:t + 1]))
        clear_caches(model)
        return torch.cat(outs, dim=1)

    with torch.no_grad():
        eager = [run(None), run(pad)]
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the static-shape path
        static = [run(None), run(pad)]
    for e, s in zip(eager, static):
        torch.testing.assert_close(e, s, rtol=1e-5, atol=TOL)
    assert not torch.allclose(eager[0][1], eager[1][1], atol=TOL)  # the pad mask did change sample 1


def test_kv_cache_prefix_lm_matches_uncached():
    cfg = preset("tiny-llama", mask="prefix")
    model = build(cfg)
    B, T, P = 2, 10, 4
    x, prefix = tokens(cfg, B=B, T=T), torch.tensor([P, P])
    with torch.no_grad():
        ref = model(x, prefix_len=prefix)
        setup_caches(model, batch_size=B, max_seq_len=T)
        out = model(x[:, :P], input_pos=torch.arange(P), prefix_len=prefix)  # prefill the whole prefix
        assert torch.allclose(out, ref[:, :P], atol=TOL)
        for t in range(P, T):
            out = model(x[:, t:t + 1], input_pos=torch.tensor([t]), prefix_len=prefix)
            assert torch.allclose(out[:, 0], ref[:, t], atol=TOL), f"step {t}"


def test_attn_mask_is_and_ed_with_the_mode_mask():
    """A (B, 1, T, S) padding mask hiding key 0 of sample 0: its token no longer reaches positions >= 1."""
    cfg = preset("tiny-llama")
    model = build(cfg)
    x = tokens(cfg, B=2, T=6)
    pad = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    pad[0, :, 1:, 0] = False
    with torch.no_grad():
        ref = model(x, attn_mask=pad)
        out = model(perturb(x, 0, 0, cfg.vocab_size), attn_mask=pad)
        causal_ref = model(x)
    m = moved(out[0], ref[0])
    assert m[0] and not m[1:].any()
    assert torch.allclose(ref[1], causal_ref[1], atol=TOL)  # all-True rows change nothing
    # and the mode mask still applies: a later token stays invisible
    out = model(perturb(x, 1, 4, cfg.vocab_size), attn_mask=pad)
    assert not moved(out[1], ref[1])[:4].any()


def test_kv_cache_rejects_too_long():
    model = build(preset("tiny"))
    with pytest.raises(ValueError, match="block_size"):
        setup_caches(model, batch_size=1, max_seq_len=model.cfg.block_size + 1)


# ------------------------------------------------------------------------------------------- RoPE
@pytest.mark.parametrize("head_dim,theta,factor,low,high,orig", [
    (128, 500000.0, 8.0, 1.0, 4.0, 8192),   # Llama 3.1
    (64, 500000.0, 32.0, 1.0, 4.0, 8192),   # Llama 3.2
    (16, 10000.0, 4.0, 1.0, 4.0, 64),       # tiny: every band (kept, smoothed, scaled) occurs
])
def test_rope_llama3_scaling_matches_transformers(head_dim, theta, factor, low, high, orig):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=4 * orig,
                         rope_parameters=dict(rope_type="llama3", rope_theta=theta, factor=factor,
                                              low_freq_factor=low, high_freq_factor=high,
                                              original_max_position_embeddings=orig))
    hf_inv, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, torch.device("cpu"))
    ours = rope_inv_freq(head_dim, theta, RopeScaling(factor, low, high, orig))
    assert attention_factor == 1.0
    assert ours.shape == hf_inv.shape
    assert torch.allclose(ours, hf_inv.float(), rtol=1e-6, atol=1e-6)
    plain = rope_inv_freq(head_dim, theta)
    assert not torch.allclose(ours, plain)  # scaling did something


def test_rope_plain_formula():
    inv = rope_inv_freq(8, 10000.0)
    expected = torch.tensor([10000.0 ** (-i / 8) for i in (0, 2, 4, 6)])
    assert torch.allclose(inv, expected, rtol=1e-6)


def test_rope_positions_shift_invariance():
    """RoPE attention depends on relative positions: shifting all positions leaves logits unchanged."""
    cfg = preset("tiny-llama")
    model = build(cfg)
    x = tokens(cfg, B=2, T=8)
    with torch.no_grad():
        a = model(x)
        b = model(x, positions=torch.arange(8) + 17)
        c = model(x, positions=(torch.arange(8) + torch.tensor([[0], [5]])))  # (B, T) per-sample
    assert torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(a, c, atol=1e-4)
