"""Read llama.cpp GGUF files (Llama architecture) as a Hugging Face config, state dict and tokenizer.

    cfg, weights, tokenizer = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")

The `gguf` package (llama.cpp's own reader) parses the file and dequantizes every tensor type it
knows (F32, F16, BF16, Q4_0, Q4_1, Q5_*, Q8_0, K-quants ...) to float32, so a quantized file imports
as the float model it approximates (its logits differ slightly from the unquantized original).
Names map to Hugging Face's Llama names, and q/k rows are un-permuted: llama.cpp's converter
interleaves the two rotary halves of each head (`permute` in convert_hf_to_gguf.py), which ember and
HF keep as [first half | second half]. `ember convert --from-gguf` turns the result into an ember
checkpoint through the same path as an HF directory (models/hf.py).

The tokenizer ("gpt2"-type byte-level BPE: vocab, merges, token types, pre-tokenizer name) becomes an
HF `tokenizers` JSON plus a tokenizer_config.json with the chat template and special tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ember.errors import EmberError

# llama.cpp tensor names -> Hugging Face Llama names ({i} = layer)
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
# pre-tokenizers (tokenizer.ggml.pre) that ember can express with HF tokenizers' components
_PRE_TOKENIZERS = {
    "gpt2": [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}],
    "smollm": [{"type": "Digits", "individual_digits": True},
               {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}],
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of special tokens


def _reader(path: Path):
    try:
        import gguf
    except ImportError:  # a dependency of ember; a broken environment gets a clear message
        raise EmberError("reading GGUF needs the `gguf` package. HINT: pip install gguf") from None
    if not path.is_file():
        raise EmberError(f"{path}: GGUF file not found. HINT: check the path")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise EmberError(f"{path}: not a GGUF file (it starts with {magic!r}, expected b'GGUF'). "
                         "HINT: give a llama.cpp .gguf file, or use --from-hf for a Hugging Face directory")
    try:
        return gguf, gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct.error on a truncated or corrupt file
        raise EmberError(f"{path}: cannot read the GGUF file ({e}). HINT: re-download it") from None


def _fields(reader: Any) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items()}


def _meta(fields: dict, path: Path, key: str, default: Any = ...) -> Any:
    if key in fields:
        return fields[key]
    if default is ...:
        raise EmberError(f"{path}: metadata key {key!r} is missing. HINT: the file may come from an older llama.cpp; "
                         "re-convert it with a current convert_hf_to_gguf.py")
    return default


def hf_config(fields: dict, path: Path, tied: bool) -> dict:
    """The Hugging Face LlamaConfig fields the GGUF metadata describes."""
    arch = _meta(fields, path, "general.architecture")
    if arch != "llama":
        raise EmberError(f"{path}: general.architecture is {arch!r}; ember imports 'llama' GGUF files "
                         "(Llama, SmolLM, Mistral-style dense models). HINT: convert other models from HF with --from-hf")
    scaling = fields.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise EmberError(f"{path}: {arch}.rope.scaling.type is {scaling!r}; ember's GGUF import supports unscaled RoPE. "
                         "HINT: convert the original Hugging Face checkpoint with --from-hf")
    n_head = int(_meta(fields, path, f"{arch}.attention.head_count"))
    n_embd = int(_meta(fields, path, f"{arch}.embedding_length"))
    head_dim = int(fields.get(f"{arch}.attention.key_length", n_embd // n_head))
    rot = int(fields.get(f"{arch}.rope.dimension_count", head_dim))
    if rot != head_dim:
        raise EmberError(f"{path}: {arch}.rope.dimension_count is {rot}, the head size {head_dim}; ember rotates whole "
                         "heads. HINT: convert the original Hugging Face checkpoint with --from-hf")
    tokens = fields.get("tokenizer.ggml.tokens")
    vocab = int(fields.get(f"{arch}.vocab_size", len(tokens) if tokens else 0))
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
        "hidden_size": n_embd, "intermediate_size": int(_meta(fields, path, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_meta(fields, path, f"{arch}.block_count")), "num_attention_heads": n_head,
        "num_key_value_heads": int(fields.get(f"{arch}.attention.head_count_kv", n_head)), "head_dim": head_dim,
        "max_position_embeddings": int(_meta(fields, path, f"{arch}.context_length")),
        "rms_norm_eps": float(_meta(fields, path, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(fields.get(f"{arch}.rope.freq_base", 10000.0)), "hidden_act": "silu",
        "tie_word_embeddings": tied, "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": fields.get("tokenizer.ggml.eos_token_id"),
    }


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: per head, interleaved rotary pairs -> [first half | second half]."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation ([first half | second half] -> interleaved pairs); `unpermute`'s inverse."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_weights(gguf: Any, reader: Any, cfg: dict, path: Path) -> dict[str, torch.Tensor]:
    """Every tensor, dequantized to float32, under its Hugging Face name (q/k un-permuted)."""
    out: dict[str, torch.Tensor] = {}
    layer = re.compile(r"blk\.(\d+)\.(.+)")
    for t in reader.tensors:
        m = layer.fullmatch(t.name)
        if m and m.group(2) in _LAYER_NAMES:
            name = f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
        elif t.name in _GLOBAL_NAMES:
            name = _GLOBAL_NAMES[t.name]
        else:
            raise EmberError(f"{path}: tensor {t.name!r} ({t.tensor_type.name}) has no place in a Llama model. "
                             "HINT: ember imports plain Llama-architecture GGUF files")
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise EmberError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which the gguf package "
                             "cannot dequantize. HINT: requantize with llama-quantize to Q8_0 or Q4_K_M") from None
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
        w = torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape)  # a writable copy
        if m and m.group(2).startswith("attn_q."):
            w = unpermute(w, cfg["num_attention_heads"])
        elif m and m.group(2).startswith("attn_k."):
            w = unpermute(w, cfg["num_key_value_heads"])
        out[name] = w
    return out


def tokenizer_files(fields: dict, path: Path) -> dict[str, str]:
    """{"tokenizer.json": ..., "tokenizer_config.json": ...} for the file's BPE tokenizer (HF formats)."""
    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise EmberError(f"{path}: tokenizer.ggml.model is {model!r}; ember imports byte-level BPE ('gpt2') "
                         "tokenizers from GGUF. HINT: pass --tokenizer with the model's Hugging Face tokenizer")
    pre = fields.get("tokenizer.ggml.pre", "gpt2")
    if pre not in _PRE_TOKENIZERS:
        raise EmberError(f"{path}: tokenizer.ggml.pre is {pre!r}; ember knows {sorted(_PRE_TOKENIZERS)}. "
                         "HINT: pass --tokenizer with the model's Hugging Face tokenizer")
    tokens = list(_meta(fields, path, "tokenizer.ggml.tokens"))
    types = list(fields.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = list(_meta(fields, path, "tokenizer.ggml.merges"))
    special = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                "special": True} for i, (tok, kind) in enumerate(zip(tokens, types)) if kind in (_CONTROL, _USER_DEFINED)]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": _PRE_TOKENIZERS[pre]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {tok: i for i, tok in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in merges]},
    }

    def name(key: str):
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": name("eos"), "bos_token": name("bos"),
              "pad_token": name("padding"), "add_bos_token": bool(fields.get("tokenizer.ggml.add_bos_token", False))}
    if isinstance(fields.get("tokenizer.chat_template"), str):
        config["chat_template"] = fields["tokenizer.chat_template"]
    return {"tokenizer.json": json.dumps(tokenizer, ensure_ascii=False),
            "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=1)}


def read_gguf(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(HF config dict, HF-named float32 state dict, tokenizer files) of a Llama-architecture GGUF file."""
    path = Path(path)
    gguf, reader = _reader(path)
    fields = _fields(reader)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    cfg = hf_config(fields, path, tied)
    return cfg, hf_weights(gguf, reader, cfg, path), tokenizer_files(fields, path)


# ------------------------------------------------------------------------------------------ write
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
# ember's own BPE pre-tokenizer (the cl100k / Llama-3 split) is llama.cpp's "llama-bpe"
_EMBER_SPLIT = ("'(?i:[sdmt]|ll|ve|re)|[^\\r\\n\\p{L}\\p{N}]?+\\p{L}++|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]++[\\r\\n]*+"
                "|\\s++$|\\s*[\\r\\n]|\\s+(?!\\S)|\\s")
_PRE_TOKENIZERS["llama-bpe"] = [
    {"type": "Split", "pattern": {"Regex": _EMBER_SPLIT}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]
_NORMAL = 1


def _pre_name(tokenizer: dict, where: Path) -> str:
    pre = tokenizer.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    for name, want in _PRE_TOKENIZERS.items():
        if parts == want:
            return name
    if parts and parts[-1].get("type") == "ByteLevel" and len(parts) == 1:
        return "gpt2"
    raise EmberError(f"{where}: its pre-tokenizer has no llama.cpp name that ember knows ({sorted(_PRE_TOKENIZERS)}). "
                     "HINT: export to Hugging Face (--to-hf) and use llama.cpp's convert_hf_to_gguf.py")


def _tokenizer_fields(tok_dir: Path) -> dict:
    """tokens, token types, merges, pre-tokenizer name, special ids and chat template of an HF tokenizer dir."""
    path = tok_dir / "tokenizer.json"
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise EmberError(f"{path}: cannot read the tokenizer ({e}). HINT: the checkpoint needs its tokenizer/ "
                         "directory to export GGUF") from None
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise EmberError(f"{path}: model type {model.get('type')!r}; GGUF export writes byte-level BPE tokenizers")
    vocab = dict(model["vocab"])
    added = {a["content"]: a["id"] for a in tok.get("added_tokens", [])}
    vocab.update(added)
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [_USER_DEFINED] * n  # ids no entry names: unused padding rows
    for t, i in vocab.items():
        tokens[i] = t
        types[i] = _CONTROL if t in added else _NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    cfg_path = tok_dir / "tokenizer_config.json"
    conf = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}

    def tid(key):
        v = conf.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return vocab.get(v) if isinstance(v, str) else None

    return {"tokens": tokens, "types": types, "merges": merges, "pre": _pre_name(tok, path),
            "bos": tid("bos_token"), "eos": tid("eos_token"), "pad": tid("pad_token"),
            "add_bos": bool(conf.get("add_bos_token", False)), "chat_template": conf.get("chat_template")}


def write_gguf(path: str | Path, hf_cfg: dict, hf_sd: dict[str, torch.Tensor], tok_dir: Path | None,
               qtype: str = "f32", name: str = "ember") -> Path:
    """Write a Llama-architecture model (HF config + HF-named float state dict) as a llama.cpp GGUF file.

    `qtype`: f32, f16, q8_0 or q4_0 for the 2-D weights (llama.cpp's own block formats, encoded by the
    gguf package); norms stay f32, as llama.cpp's converter keeps them; a row whose length is not a
    multiple of 32 falls back to f16. q/k rows are permuted to llama.cpp's interleaved rotary order.
    Written to a temp file and renamed into place."""
    import gguf

    from ember.fileio import atomic_path

    if qtype not in GGUF_TYPES:
        raise EmberError(f"--type {qtype!r}: expected one of {list(GGUF_TYPES)}")
    if hf_cfg.get("model_type") != "llama":
        raise EmberError(f"model_type {hf_cfg.get('model_type')!r}: ember writes Llama-architecture GGUF "
                         "(rmsnorm, rope, swiglu). HINT: export GPT-2 style models with --to-hf")
    path = Path(path)
    T = gguf.GGMLQuantizationType
    want = {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[qtype]
    arch = "llama"
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(name)
        w.add_context_length(int(hf_cfg["max_position_embeddings"]))
        w.add_embedding_length(int(hf_cfg["hidden_size"]))
        w.add_block_count(int(hf_cfg["num_hidden_layers"]))
        w.add_feed_forward_length(int(hf_cfg["intermediate_size"]))
        w.add_head_count(int(hf_cfg["num_attention_heads"]))
        w.add_head_count_kv(int(hf_cfg["num_key_value_heads"]))
        head_dim = int(hf_cfg.get("head_dim") or hf_cfg["hidden_size"] // hf_cfg["num_attention_heads"])
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_layer_norm_rms_eps(float(hf_cfg["rms_norm_eps"]))
        w.add_rope_freq_base(float(hf_cfg.get("rope_theta", 10000.0)))
        if hf_cfg.get("rope_scaling"):
            raise EmberError("rope_scaling: ember's GGUF export writes unscaled RoPE. HINT: use --to-hf and llama.cpp's "
                             "convert_hf_to_gguf.py for Llama-3.1-style scaled models")
        w.add_vocab_size(int(hf_cfg["vocab_size"]))
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
        if qtype.startswith("q"):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if tok_dir is not None:
            t = _tokenizer_fields(tok_dir)
            rows = int(hf_cfg["vocab_size"])
            tokens = t["tokens"] + [f"[PAD{i}]" for i in range(len(t["tokens"]), rows)]
            types = t["types"] + [_USER_DEFINED] * (rows - len(t["types"]))
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre(t["pre"])
            w.add_token_list(tokens[:rows])
            w.add_token_types(types[:rows])
            w.add_token_merges(t["merges"])
            for key, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
                if t[key] is not None:
                    fn(int(t[key]))
            w.add_add_bos_token(t["add_bos"])
            if isinstance(t["chat_template"], str):
                w.add_chat_template(t["chat_template"])
        names = {v: k for k, v in _LAYER_NAMES.items()}
        globals_ = {v: k for k, v in _GLOBAL_NAMES.items()}
        for hf_name, tensor in hf_sd.items():
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
            if m and m.group(2) in names:
                gname = f"blk.{m.group(1)}.{names[m.group(2)]}"
            elif hf_name in globals_:
                gname = globals_[hf_name]
            else:
                raise EmberError(f"tensor {hf_name!r} has no llama.cpp name. HINT: ember writes plain Llama models")
            x = tensor.detach().float()
            if gname.endswith("attn_q.weight"):
                x = permute(x, int(hf_cfg["num_attention_heads"]))
            elif gname.endswith("attn_k.weight"):
                x = permute(x, int(hf_cfg["num_key_value_heads"]))
            arr = x.contiguous().numpy()
            kind = want if arr.ndim == 2 else T.F32
            if kind in (T.Q8_0, T.Q4_0) and arr.shape[-1] % 32:
                kind = T.F16
            if kind == T.F32:
                w.add_tensor(gname, arr.astype(np.float32))
            elif kind == T.F16:
                w.add_tensor(gname, arr.astype(np.float16))
            else:
                w.add_tensor(gname, gguf.quants.quantize(arr, kind), raw_dtype=kind)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path
