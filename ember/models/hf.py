"""Hugging Face interop: pure functions between HF (config.json, state dict) and ember.

Two families, with their ember shape:

    model_type "gpt2"  (GPT2LMHeadModel):  layernorm with bias, learned positions, tanh GELU MLP,
                                           biases everywhere, MHA, tied head (usually)
    model_type "llama" (LlamaForCausalLM): rmsnorm, RoPE (plain or Llama-3 scaled), SwiGLU, GQA,
                                           optional biases, tied or untied head

GPT-2 stores its linears as Conv1D (weight (in, out): transposed against nn.Linear) and fuses q/k/v
into one `c_attn` (in, 3C). HF Llama q/k use the "rotate_half" RoPE layout, like ember: no permutation.
The vocabulary keeps HF's exact size (no padding), so conversions are bit-exact both ways.
Imports torch and the standard library only.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from ember.models.config import ModelConfig, RopeScaling

MODEL_TYPES = ("gpt2", "llama")
_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are GELU with the tanh approximation


# ------------------------------------------------------------------------------------- configs
def config_from_hf(hf: Mapping) -> ModelConfig:
    """The ember ModelConfig of an HF config.json dict (model_type "gpt2" or "llama").

    Dropout is a training choice and is set to 0.0. Unsupported features raise ValueError naming the field.
    """
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        return _gpt2_config(hf)
    if model_type == "llama":
        return _llama_config(hf)
    raise ValueError(f"model_type: {model_type!r} is not supported, expected one of {list(MODEL_TYPES)}")


def _require(hf: Mapping, field: str, allowed, default=None) -> None:
    value = hf.get(field, default)
    if value not in allowed:
        raise ValueError(f"{field}: {value!r} is not supported by ember, expected one of {list(allowed)}")


def _gpt2_config(hf: Mapping) -> ModelConfig:
    _require(hf, "activation_function", _GPT2_ACTIVATIONS, "gelu_new")
    _require(hf, "scale_attn_weights", (True,), True)
    _require(hf, "scale_attn_by_inverse_layer_idx", (False,), False)
    _require(hf, "add_cross_attention", (False,), False)
    n_embd = hf["n_embd"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_embd=n_embd, n_head=hf["n_head"],
        ffn_hidden=hf.get("n_inner") or 4 * n_embd, block_size=hf["n_positions"],
        norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), pos_emb="learned", mlp="gelu",
        bias=True, tie_embeddings=hf.get("tie_word_embeddings", True), dropout=0.0,
        init_std=hf.get("initializer_range", 0.02))


def _llama_config(hf: Mapping) -> ModelConfig:
    _require(hf, "hidden_act", ("silu",), "silu")
    _require(hf, "partial_rotary_factor", (None, 1, 1.0))
    _require(hf, "sliding_window", (None,))
    attn_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    if attn_bias != mlp_bias:
        raise ValueError(f"attention_bias ({attn_bias}) and mlp_bias ({mlp_bias}) differ; ember has one `bias` "
                         "flag for attention and MLP")
    theta, scaling = _llama_rope(hf)
    H = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"], n_head=H,
        n_kv_head=hf.get("num_key_value_heads") or H, head_dim=hf.get("head_dim") or hf["hidden_size"] // H,
        ffn_hidden=hf["intermediate_size"], block_size=hf["max_position_embeddings"],
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), pos_emb="rope", rope_theta=float(theta),
        rope_scaling=scaling, mlp="swiglu", bias=bool(attn_bias),
        tie_embeddings=hf.get("tie_word_embeddings", False), dropout=0.0,
        init_std=hf.get("initializer_range", 0.02))


def _llama_rope(hf: Mapping) -> tuple[float, Optional[RopeScaling]]:
    """(rope_theta, scaling) from transformers<5 keys (rope_theta, rope_scaling) or >=5 (rope_parameters)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or params)
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"rope_scaling.rope_type: {rope_type!r} is not supported by ember, "
                         "expected 'default' or 'llama3'")
    return theta, RopeScaling(
        factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))


def hf_model_type(cfg: ModelConfig) -> str:
    """"gpt2" or "llama": the HF family that can represent `cfg` exactly (ValueError if none)."""
    if cfg.mask != "causal":
        raise ValueError(f"mask: {cfg.mask!r} has no Hugging Face equivalent (GPT-2 and Llama are causal)")
    if (cfg.norm, cfg.pos_emb, cfg.mlp) == ("layernorm", "learned", "gelu"):
        if not cfg.bias:
            raise ValueError("bias: False; a GPT-2 style model (layernorm, learned positions, GELU) needs bias=True "
                             "for model_type 'gpt2'")
        if cfg.n_kv_head != cfg.n_head or cfg.head_dim * cfg.n_head != cfg.n_embd:
            raise ValueError("n_kv_head/head_dim: GPT-2 needs n_kv_head == n_head and head_dim == n_embd // n_head")
        return "gpt2"
    if (cfg.norm, cfg.pos_emb, cfg.mlp) == ("rmsnorm", "rope", "swiglu"):
        return "llama"
    raise ValueError(f"norm/pos_emb/mlp: ({cfg.norm}, {cfg.pos_emb}, {cfg.mlp}) has no Hugging Face equivalent; "
                     "expected (layernorm, learned, gelu) for gpt2 or (rmsnorm, rope, swiglu) for llama")


def config_to_hf(cfg: ModelConfig, model_type: Optional[str] = None, bos_token_id: Optional[int] = None,
                 eos_token_id: Optional[int] = None) -> dict:
    """The HF config.json dict for `cfg` (the inverse of `config_from_hf`), weights in float32."""
    inferred = hf_model_type(cfg)
    if model_type is not None and model_type != inferred:
        raise ValueError(f"model_type: {model_type!r} cannot represent this config (it maps to {inferred!r})")
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings,
                  initializer_range=cfg.init_std, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                  dtype="float32", torch_dtype="float32", use_cache=True)
    if inferred == "gpt2":
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", **common,
                    n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, n_positions=cfg.block_size,
                    n_inner=cfg.ffn_hidden, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
                    resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                    scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                    reorder_and_upcast_attn=False)
    rs = cfg.rope_scaling
    scaling = None if rs is None else dict(
        rope_type="llama3", factor=rs.factor, low_freq_factor=rs.low_freq_factor,
        high_freq_factor=rs.high_freq_factor, original_max_position_embeddings=rs.original_max_position_embeddings)
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", **common,
                hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_hidden, num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
                hidden_act="silu", max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
                rope_theta=cfg.rope_theta, rope_scaling=scaling, attention_bias=cfg.bias, mlp_bias=cfg.bias,
                attention_dropout=cfg.dropout, pretraining_tp=1)


# ---------------------------------------------------------------------------------- state dicts
def _gpt2_pairs(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(hf name without 'transformer.', ember name, transposed) for every tensor but c_attn / the head."""
    pairs = [("wte.weight", "tok_embeddings.weight", False), ("wpe.weight", "pos_embeddings.weight", False),
             ("ln_f.weight", "norm.weight", False), ("ln_f.bias", "norm.bias", False)]
    for i in range(cfg.n_layer):
        h, e = f"h.{i}.", f"layers.{i}."
        for hf_mod, em_mod, conv in (("ln_1", "attention_norm", False), ("ln_2", "ffn_norm", False),
                                     ("attn.c_proj", "attention.wo", True), ("mlp.c_fc", "feed_forward.w1", True),
                                     ("mlp.c_proj", "feed_forward.w2", True)):
            pairs.append((f"{h}{hf_mod}.weight", f"{e}{em_mod}.weight", conv))
            pairs.append((f"{h}{hf_mod}.bias", f"{e}{em_mod}.bias", False))
    return pairs


def _llama_pairs(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    pairs = [("model.embed_tokens.weight", "tok_embeddings.weight", False), ("model.norm.weight", "norm.weight", False)]
    mods = [("self_attn.q_proj", "attention.wq"), ("self_attn.k_proj", "attention.wk"),
            ("self_attn.v_proj", "attention.wv"), ("self_attn.o_proj", "attention.wo"),
            ("mlp.gate_proj", "feed_forward.w1"), ("mlp.up_proj", "feed_forward.w3"),
            ("mlp.down_proj", "feed_forward.w2")]
    for i in range(cfg.n_layer):
        h, e = f"model.layers.{i}.", f"layers.{i}."
        pairs.append((f"{h}input_layernorm.weight", f"{e}attention_norm.weight", False))
        pairs.append((f"{h}post_attention_layernorm.weight", f"{e}ffn_norm.weight", False))
        for hf_mod, em_mod in mods:
            pairs.append((f"{h}{hf_mod}.weight", f"{e}{em_mod}.weight", False))
            if cfg.bias:
                pairs.append((f"{h}{hf_mod}.bias", f"{e}{em_mod}.bias", False))
    return pairs


def _is_ignored(name: str) -> bool:
    """HF buffers that are not weights: GPT-2's causal mask buffers, Llama's rotary inv_freq."""
    return name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))


def state_dict_from_hf(sd: Mapping[str, torch.Tensor], cfg: ModelConfig, model_type: str) -> dict[str, torch.Tensor]:
    """An HF state dict as ember names. A tied head is left out (the checkpoint format stores it once).

    Raises ValueError naming missing or unexpected HF tensors.
    """
    if model_type == "gpt2":  # files from save_pretrained carry 'transformer.'; the original OpenAI ones do not
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        pairs = _gpt2_pairs(cfg)
    elif model_type == "llama":
        pairs = _llama_pairs(cfg)
    else:
        raise ValueError(f"model_type: {model_type!r} is not supported, expected one of {list(MODEL_TYPES)}")
    sd = {k: v for k, v in sd.items() if not _is_ignored(k)}
    used, out = set(), {}
    for hf_name, name, conv in pairs:
        out[name] = _take(sd, hf_name, used).t().contiguous() if conv else _take(sd, hf_name, used)
    if model_type == "gpt2":
        for i in range(cfg.n_layer):  # Conv1D c_attn: (C, 3C) -> q, k, v Linear weights (C, C)
            w = _take(sd, f"h.{i}.attn.c_attn.weight", used).t()
            b = _take(sd, f"h.{i}.attn.c_attn.bias", used)
            for j, (wj, bj) in enumerate(zip(w.chunk(3, dim=0), b.chunk(3, dim=0))):
                out[f"layers.{i}.attention.w{'qkv'[j]}.weight"] = wj.contiguous()
                out[f"layers.{i}.attention.w{'qkv'[j]}.bias"] = bj.contiguous()
    if "lm_head.weight" in sd:
        used.add("lm_head.weight")
        if not cfg.tie_embeddings:
            out["output.weight"] = sd["lm_head.weight"]
    elif not cfg.tie_embeddings:
        raise ValueError("lm_head.weight: missing, but tie_word_embeddings is false")
    unexpected = sorted(set(sd) - used)
    if unexpected:
        raise ValueError(f"unexpected tensors for {model_type} {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
    return out


def _take(sd: Mapping[str, torch.Tensor], name: str, used: set) -> torch.Tensor:
    if name not in sd:
        raise ValueError(f"{name}: missing from the Hugging Face weights (config and weights disagree)")
    used.add(name)
    return sd[name]


def state_dict_to_hf(sd: Mapping[str, torch.Tensor], cfg: ModelConfig, model_type: str) -> dict[str, torch.Tensor]:
    """An ember state dict as HF names, contiguous; a tied head is left out (as save_pretrained does)."""
    if model_type == "gpt2":
        prefix, pairs = "transformer.", _gpt2_pairs(cfg)
    elif model_type == "llama":
        prefix, pairs = "", _llama_pairs(cfg)
    else:
        raise ValueError(f"model_type: {model_type!r} is not supported, expected one of {list(MODEL_TYPES)}")
    out = {}
    for hf_name, name, conv in pairs:
        t = _take(sd, name, set())
        out[prefix + hf_name] = t.t().contiguous() if conv else t.contiguous()
    if model_type == "gpt2":
        for i in range(cfg.n_layer):  # q, k, v Linear (C, C) -> Conv1D c_attn (C, 3C)
            a = f"layers.{i}.attention."
            w = torch.cat([_take(sd, f"{a}w{x}.weight", set()) for x in "qkv"], dim=0)
            out[f"{prefix}h.{i}.attn.c_attn.weight"] = w.t().contiguous()
            out[f"{prefix}h.{i}.attn.c_attn.bias"] = torch.cat([_take(sd, f"{a}w{x}.bias", set()) for x in "qkv"])
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = _take(sd, "output.weight", set()).contiguous()
    return out
