"""Hugging Face interop (ember.models.hf + `ember convert`) against tiny random HF models.

Reference: transformers' GPT2LMHeadModel / LlamaForCausalLM with the same weights; logits must match
within 1e-5 in fp32 both ways, and HF dir -> ember -> HF dir must give identical tensors.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from ember import cli  # noqa: E402
from ember.models import ModelConfig, RopeScaling, Transformer, from_state_dict, preset  # noqa: E402
from ember.models import hf as hfconv  # noqa: E402
from ember.io.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

V, T = 101, 40
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def _hf_config(case: str):
    if case == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=64,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       bos_token_id=0, eos_token_id=0)
    kw = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=V, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    if case == "llama-gqa":
        return transformers.LlamaConfig(**kw, tie_word_embeddings=False)
    if case == "llama-tied-llama3":
        return transformers.LlamaConfig(**kw, tie_word_embeddings=True, rope_theta=500000.0,
                                        rope_scaling=dict(LLAMA3_ROPE))
    if case == "llama-mqa-bias":
        return transformers.LlamaConfig(**{**kw, "num_key_value_heads": 1}, tie_word_embeddings=False,
                                        attention_bias=True, mlp_bias=True)
    raise KeyError(case)


CASES = ["gpt2", "llama-gqa", "llama-tied-llama3", "llama-mqa-bias"]


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that logits differ visibly (norm scales around 1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * 0.1
        p.copy_(1.0 + noise if ("norm" in name or ".ln_" in name) and p.dim() == 1 and "bias" not in name
                else noise)


def _hf_model(case: str):
    torch.manual_seed(0)
    cls = transformers.GPT2LMHeadModel if case == "gpt2" else transformers.LlamaForCausalLM
    model = cls(_hf_config(case))
    _randomize(model)
    return model.eval()


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(seed))


def _ember_from_sd(cfg: ModelConfig, sd: dict) -> Transformer:
    return from_state_dict(cfg, sd)


# ------------------------------------------------------------------------------- HF -> ember
@pytest.mark.parametrize("case", CASES)
def test_hf_to_ember_logits_match(case):
    hf = _hf_model(case)
    model_type = "gpt2" if case == "gpt2" else "llama"
    cfg = hfconv.config_from_hf(hf.config.to_dict())
    model = _ember_from_sd(cfg, hfconv.state_dict_from_hf(hf.state_dict(), cfg, model_type))
    x = _tokens()
    with torch.no_grad():
        ref, out = hf(x).logits, model(x)
    assert ref.abs().max() > 0.1  # not a vacuous comparison
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    if case == "llama-tied-llama3":
        assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 16) and cfg.tie_embeddings and cfg.n_kv_head == 2


def test_state_dict_round_trip_is_exact():
    for case in CASES:
        hf = _hf_model(case)
        model_type = "gpt2" if case == "gpt2" else "llama"
        cfg = hfconv.config_from_hf(hf.config.to_dict())
        back = hfconv.state_dict_to_hf(hfconv.state_dict_from_hf(hf.state_dict(), cfg, model_type), cfg, model_type)
        ref = {k: v for k, v in hf.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
        assert sorted(back) == sorted(ref), case
        assert all(torch.equal(back[k], ref[k]) for k in ref), case


def test_gpt2_original_layout_and_buffers_accepted():
    """OpenAI's GPT-2 files have no 'transformer.' prefix and carry attn.bias / masked_bias buffers."""
    hf = _hf_model("gpt2")
    cfg = hfconv.config_from_hf(hf.config.to_dict())
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    sd["h.1.attn.masked_bias"] = torch.tensor(-1e4)
    ours = hfconv.state_dict_from_hf(sd, cfg, "gpt2")
    assert torch.equal(ours["layers.1.attention.wk.weight"],
                       hf.transformer.h[1].attn.c_attn.weight[:, 32:64].t())


def test_config_round_trip_for_presets():
    for name in ("gpt2", "gpt2-xl", "smollm2-135m", "llama-3.2-1b", "llama-3-8b", "tiny", "tiny-llama"):
        cfg = preset(name)
        again = hfconv.config_from_hf(hfconv.config_to_hf(cfg))
        assert again.to_dict() == cfg.to_dict(), name


def test_rope_parameters_and_legacy_keys_agree():
    legacy = {**_hf_config("llama-gqa").to_dict(), "rope_theta": 500000.0, "rope_scaling": dict(LLAMA3_ROPE)}
    legacy.pop("rope_parameters")
    modern = {**legacy, "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 500000.0}}
    modern.pop("rope_theta"), modern.pop("rope_scaling")
    assert hfconv.config_from_hf(legacy) == hfconv.config_from_hf(modern)
    assert hfconv.config_from_hf(modern).rope_theta == 500000.0


@pytest.mark.parametrize("field,value", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}), ("sliding_window", 128), ("hidden_act", "gelu"),
    ("partial_rotary_factor", 0.5), ("model_type", "mistral"),
])
def test_unsupported_hf_features_name_the_field(field, value):
    hf_cfg = _hf_config("llama-gqa").to_dict()
    hf_cfg.pop("rope_parameters")
    hf_cfg[field] = value
    with pytest.raises(ValueError, match=field.split("_")[0] if field != "rope_scaling" else "rope_type"):
        hfconv.config_from_hf(hf_cfg)
    with pytest.raises(ValueError, match="activation_function"):
        hfconv.config_from_hf({**_hf_config("gpt2").to_dict(), "activation_function": "relu"})


def test_to_hf_rejects_configs_without_an_equivalent():
    with pytest.raises(ValueError, match="mask"):
        hfconv.config_to_hf(preset("tiny", mask="prefix"))
    with pytest.raises(ValueError, match="norm/pos_emb/mlp"):
        hfconv.config_to_hf(preset("tiny", norm="rmsnorm"))
    with pytest.raises(ValueError, match="bias"):
        hfconv.config_to_hf(preset("tiny", bias=False))
    with pytest.raises(ValueError, match="model_type"):
        hfconv.config_to_hf(preset("tiny"), model_type="llama")


# ------------------------------------------------------------------------------- ember -> HF
EMBER_CASES = {
    "gpt2-style": dict(name="tiny", vocab_size=V, block_size=64),
    "llama-gqa-untied": dict(name="tiny-llama", vocab_size=V, block_size=64),
    "llama-tied-llama3": dict(name="tiny-llama", vocab_size=V, block_size=64, tie_embeddings=True,
                              rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                original_max_position_embeddings=16)),
}


@pytest.mark.parametrize("case", list(EMBER_CASES))
def test_ember_to_hf_logits_match(case, tmp_path):
    kw = dict(EMBER_CASES[case])
    model = Transformer(preset(kw.pop("name"), **kw))
    model.init_weights(seed=0)
    _randomize(model)
    model.eval()
    save_checkpoint(model, tmp_path / "ckpt")
    assert cli.main(["convert", "--to-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert type(hf).__name__ == ("GPT2LMHeadModel" if case == "gpt2-style" else "LlamaForCausalLM")
    x = _tokens(2)
    with torch.no_grad():
        ref, out = model(x), hf(x).logits
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- files
def test_convert_refuses_an_out_that_would_delete_the_source(tmp_path, capsys):
    model = Transformer(preset("tiny"))
    runs = tmp_path / "runs"
    save_checkpoint(model, runs / "ckpt")
    save_checkpoint(model, runs / "sibling")
    for out in (runs, runs / "ckpt" / "hf"):
        assert cli.main(["convert", "--to-hf", str(runs / "ckpt"), "--out", str(out), "--overwrite"]) == 1
        assert "writing there would delete it" in capsys.readouterr().err
    assert load_checkpoint(runs / "ckpt")[0] is not None and load_checkpoint(runs / "sibling")[0] is not None


@pytest.mark.parametrize("case", CASES)
def test_file_round_trip_through_the_cli(case, tmp_path):
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (tmp_path / "hf" / "README.md").write_text("not a tokenizer file")
    assert cli.main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "em")]) == 0
    assert (tmp_path / "em" / "tokenizer" / "tokenizer.json").is_file()
    assert not (tmp_path / "em" / "tokenizer" / "README.md").exists()
    model, meta = load_checkpoint(tmp_path / "em")
    with torch.no_grad():
        torch.testing.assert_close(model(_tokens()), hf(_tokens()).logits, atol=1e-5, rtol=0)
    assert cli.main(["convert", "--to-hf", str(tmp_path / "em"), "--out", str(tmp_path / "hf2")]) == 0
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    c1, c2 = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("hf", "hf2"))
    for key in ("model_type", "architectures", "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert c1[key] == c2[key], key
    assert (tmp_path / "hf2" / "tokenizer.json").read_text() == '{"model": {"type": "BPE"}}'


def test_sharded_and_bin_imports(tmp_path):
    hf = _hf_model("llama-gqa")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")
    ref = hf(_tokens()).logits.detach()
    for src in ("sharded", "bin"):
        assert cli.main(["convert", "--from-hf", str(tmp_path / src), "--out", str(tmp_path / f"em-{src}")]) == 0
        model, _ = load_checkpoint(tmp_path / f"em-{src}")
        with torch.no_grad():
            torch.testing.assert_close(model(_tokens()), ref, atol=1e-5, rtol=0)


def test_dtype_option_and_cli_errors(tmp_path, capsys):
    hf = _hf_model("gpt2")
    hf.save_pretrained(tmp_path / "hf")
    assert cli.main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "em"),
                     "--dtype", "bfloat16"]) == 0
    model, meta = load_checkpoint(tmp_path / "em")
    assert meta["dtype"] == "bfloat16" and model.tok_embeddings.weight.dtype == torch.bfloat16
    capsys.readouterr()
    assert cli.main(["convert", "--out", str(tmp_path / "x")]) == 1
    assert "exactly one of --from-hf" in capsys.readouterr().err
    assert cli.main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "em")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["convert", "--from-hf", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 1
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**hf.config.to_dict(), "activation_function": "relu"}))
    assert cli.main(["convert", "--from-hf", str(bad), "--out", str(tmp_path / "z")]) == 1
    err = capsys.readouterr().err
    assert "activation_function" in err and "config.json" in err
    assert not (tmp_path / "z").exists()


def test_bad_hf_weights_name_the_file_or_tensor(tmp_path, capsys):
    hf = _hf_model("llama-gqa")
    hf.save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights)
    assert cli.main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "a")]) == 1
    assert "model.layers.1.mlp.up_proj.weight" in capsys.readouterr().err
    weights.write_bytes(weights.read_bytes()[:1000])
    assert cli.main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "truncated or corrupt" in err and "HINT" in err
    weights.unlink()
    assert cli.main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "c")]) == 1
    assert "no model.safetensors" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")
