"""Convert checkpoints between Hugging Face format and ember's.

    ember convert --from-hf HF_DIR --out DIR       # GPT2LMHeadModel or LlamaForCausalLM -> ember checkpoint
    ember convert --from-gguf FILE.gguf --out DIR  # llama.cpp GGUF (Llama architecture, any quantization)
    ember convert --to-hf DIR --out HF_DIR         # ember checkpoint -> config.json + model.safetensors
    ember convert --to-gguf DIR --type q8_0 --out FILE.gguf   # ember Llama-style checkpoint -> llama.cpp GGUF

An HF directory holds config.json and model.safetensors (a sharded model.safetensors.index.json, or
pytorch_model.bin read with torch.load(weights_only=True), are accepted on import). Tokenizer files
(tokenizer.json, vocab.json, merges.txt, ...) travel along: into `<DIR>/tokenizer/` on import and back
next to the weights on export. Round trips are bit-exact in float32 (the default --dtype).
A GGUF file is dequantized to float32 (io/gguf.py); its tokenizer and chat template become
`<DIR>/tokenizer/tokenizer.json` and `tokenizer_config.json`.
GGUF export (io/gguf.py `write_gguf`) writes f32, f16, or llama.cpp's Q8_0 / Q4_0 blocks, with the
tokenizer, special ids and chat template, so a model trained or tuned in ember runs in llama.cpp.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import torch

from ember.errors import EmberError
from ember.fileio import atomic_dir
from ember.log import log
from ember.models import ModelConfig
from ember.models import hf as hfconv
from ember.io.checkpoint import META, TOKENIZER, load_checkpoint, save_state_dict
from ember.io.hf import read_hf_config, read_hf_weights

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "chat_template.jinja", "generation_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Config:
    """Convert checkpoints to or from Hugging Face format (GPT-2 and Llama)."""

    from_hf: Optional[str] = None
    """Import: a Hugging Face model directory (config.json + model.safetensors)."""
    from_gguf: Optional[str] = None
    """Import: a llama.cpp .gguf file (Llama architecture; quantized weights are dequantized)."""
    to_hf: Optional[str] = None
    """Export: an ember checkpoint directory (ember.json + model.safetensors)."""
    to_gguf: Optional[str] = None
    """Export: an ember checkpoint directory (Llama style) -> a llama.cpp .gguf file at --out."""
    type: Literal["f32", "f16", "q8_0", "q4_0"] = "f32"
    """--to-gguf only: the weights' GGUF type (norms stay f32)."""
    out: Optional[str] = None
    """The directory to write (must not exist or be empty, unless --overwrite)."""
    overwrite: bool = False
    """Replace an existing --out directory (atomically: the old one stays until the new one is complete)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the written weights (float32 keeps round trips exact)."""


def main(cfg: Config) -> int:
    if sum(x is not None for x in (cfg.from_hf, cfg.from_gguf, cfg.to_hf, cfg.to_gguf)) != 1:
        raise EmberError("give exactly one of --from-hf HF_DIR, --from-gguf FILE, --to-hf DIR or --to-gguf DIR. "
                         "HINT: ember convert --from-hf HF_DIR --out DIR, or ember convert --to-hf DIR --out HF_DIR")
    if not cfg.out:
        raise EmberError("--out is required. HINT: add --out NEW_DIR")
    if cfg.to_gguf is not None:
        return 0 if to_gguf(Path(cfg.to_gguf), Path(cfg.out), cfg.type, cfg.overwrite) else 1
    from ember.fileio import check_out_dir

    src, out = Path(cfg.from_hf or cfg.from_gguf or cfg.to_hf), Path(cfg.out)
    check_out_dir(out, cfg.overwrite, sources=(src,))
    if cfg.from_hf is not None:
        from_hf(src, out, DTYPES[cfg.dtype])
    elif cfg.from_gguf is not None:
        from_gguf(src, out, DTYPES[cfg.dtype])
    else:
        to_hf(src, out, DTYPES[cfg.dtype])
    return 0


# ---------------------------------------------------------------------------------------- import
def from_hf(hf_dir: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Convert an HF GPT-2/Llama directory into an ember checkpoint at `out`."""
    hf_cfg = read_hf_config(hf_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = _copy_files(hf_dir, Path(tmp) / TOKENIZER, TOKENIZER_FILES)
        return _save_llm(hf_cfg, lambda: read_hf_weights(hf_dir), hf_dir, hf_dir / "config.json", out, dtype,
                         tok_dir, {}, "re-download or re-save the model (model.save_pretrained(dir))")


def from_gguf(path: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Convert a llama.cpp GGUF file (Llama architecture) into an ember checkpoint at `out`."""
    from ember.io import gguf

    hf_cfg, weights, tok_files = gguf.read_gguf(path)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp) / TOKENIZER
        tok_dir.mkdir()
        for name, text in tok_files.items():
            (tok_dir / name).write_text(text, encoding="utf-8")
        return _save_llm(hf_cfg, lambda: weights, path, path, out, dtype, tok_dir, {"gguf": path.name},
                         "re-download the file, or convert the original Hugging Face checkpoint with --from-hf")


def _save_llm(hf_cfg: dict, read_weights: Callable[[], dict], src: Path, cfg_where: Path, out: Path,
              dtype: torch.dtype, tok_dir: Optional[Path], extra: dict, weights_hint: str) -> Path:
    """HF-style config + weights (HF names, read only once the config is valid) -> an ember checkpoint;
    errors name `cfg_where` (config) or `src` (weights, with `weights_hint`)."""
    try:
        cfg = hfconv.config_from_hf(hf_cfg)
    except (KeyError, ValueError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise EmberError(f"{cfg_where}: cannot convert: {what}. "
                         "HINT: ember converts GPT2LMHeadModel and LlamaForCausalLM checkpoints") from None
    try:
        sd = hfconv.state_dict_from_hf(read_weights(), cfg, hf_cfg["model_type"])
    except ValueError as e:
        raise EmberError(f"{src}: the weights do not match the config: {e}. HINT: {weights_hint}") from None
    sd = {k: v.to(dtype) for k, v in sd.items()}
    source = {k: hf_cfg.get(k) for k in ("model_type", "architectures", "bos_token_id", "eos_token_id")}
    save_state_dict(sd, cfg, out, tokenizer_dir=tok_dir, extra={"hf": source, **extra})
    _summary(src, out, cfg, dtype, [out / "model.safetensors", out / META] + _listing(out / TOKENIZER))
    return out


# ---------------------------------------------------------------------------------------- export
def to_hf(ckpt_dir: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Convert an ember checkpoint into an HF directory at `out` (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    model, meta = load_checkpoint(ckpt_dir)
    cfg = model.cfg
    try:
        model_type = hfconv.hf_model_type(cfg)
        bos, eos = _special_ids(ckpt_dir, meta)
        hf_cfg = hfconv.config_to_hf(cfg, model_type, bos_token_id=bos, eos_token_id=eos)
        sd = hfconv.state_dict_to_hf(model.state_dict(), cfg, model_type)
    except ValueError as e:
        raise EmberError(f"{ckpt_dir / META}: no Hugging Face equivalent: {e}. HINT: GPT-2 export needs "
                         "layernorm+learned+gelu with biases; Llama export needs rmsnorm+rope+swiglu") from None
    sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    hf_cfg["dtype"] = hf_cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    tok = ckpt_dir / TOKENIZER
    with atomic_dir(out) as tmp:
        if tok.is_dir():
            _copy_files(tok, tmp, [p.name for p in tok.iterdir() if p.is_file()])
        if not (tmp / "generation_config.json").exists() and (bos is not None or eos is not None):
            gen = {"bos_token_id": bos, "eos_token_id": eos}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    _summary(ckpt_dir, out, cfg, dtype, _listing(out))
    return out


def to_gguf(ckpt_dir: Path, out: Path, qtype: str = "f32", overwrite: bool = False) -> Path:
    """Write an ember checkpoint (Llama style) as a llama.cpp GGUF file at `out`."""
    from ember.io import gguf

    if out.is_dir():
        raise EmberError(f"{out}: is a directory; --to-gguf writes one file. HINT: --out {out / 'model.gguf'}")
    if out.exists() and not overwrite:
        raise EmberError(f"{out}: exists. HINT: pass --overwrite to replace it, or choose another --out")
    model, meta = load_checkpoint(ckpt_dir)
    cfg = model.cfg
    try:
        if hfconv.hf_model_type(cfg) != "llama":
            raise ValueError("a GPT-2 style model (layernorm, learned positions, GELU)")
        bos, eos = _special_ids(ckpt_dir, meta)
        hf_cfg = hfconv.config_to_hf(cfg, "llama", bos_token_id=bos, eos_token_id=eos)
        sd = hfconv.state_dict_to_hf(model.state_dict(), cfg, "llama")
    except ValueError as e:
        raise EmberError(f"{ckpt_dir / META}: no GGUF (llama) equivalent: {e}. HINT: GGUF export needs "
                         "rmsnorm+rope+swiglu; export other models with --to-hf") from None
    tok = ckpt_dir / TOKENIZER
    out.parent.mkdir(parents=True, exist_ok=True)
    gguf.write_gguf(out, hf_cfg, sd, tok if tok.is_dir() else None, qtype, name=ckpt_dir.resolve().name)
    log(f"converted {ckpt_dir} -> {out} ({qtype}, {out.stat().st_size:,} bytes; run it with llama.cpp, or "
        f"import it back with ember convert --from-gguf {out} --out DIR)")
    return out


def _special_ids(ckpt_dir: Path, meta: dict) -> tuple[Optional[int], Optional[int]]:
    """bos/eos ids: recorded at import, else the tokenizer's eos (if the tokenizer package can read it)."""
    source = (meta.get("extra") or {}).get("hf") or {}
    if source.get("bos_token_id") is not None or source.get("eos_token_id") is not None:
        return source.get("bos_token_id"), source.get("eos_token_id")
    if not (ckpt_dir / TOKENIZER).is_dir():
        return None, None
    try:
        from ember.tokenizer import Tokenizer

        return None, Tokenizer.load(ckpt_dir / TOKENIZER).eos_id
    except (ImportError, AttributeError, EmberError, OSError, ValueError):
        return None, None


# ---------------------------------------------------------------------------------------- helpers
def _copy_files(src: Path, dst: Path, names) -> Optional[Path]:
    """Copy the named regular files that exist in `src` into `dst`; `dst` or None if none existed."""
    found = [src / n for n in names if (src / n).is_file()]
    if not found:
        return None
    dst.mkdir(parents=True, exist_ok=True)
    for f in found:
        shutil.copy2(f, dst / f.name)
    return dst


def _listing(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []


def _summary(src: Path, out: Path, cfg: ModelConfig, dtype: torch.dtype, files: list[Path]) -> None:
    kind = "rope/rmsnorm/swiglu" if cfg.pos_emb == "rope" else "learned/layernorm/gelu"
    log(f"converted {src} -> {out}: {cfg.num_params():,} params ({kind}, {cfg.n_layer} layers, "
        f"vocab {cfg.vocab_size}), {str(dtype).removeprefix('torch.')}")
    for f in files:
        log(f"  wrote {f} ({f.stat().st_size:,} bytes)")
