"""The ember checkpoint format: a directory of safetensors weights plus JSON metadata.

    <dir>/
      model.safetensors   the weights, contiguous, on cpu; a tied head is stored once (no output.weight)
      ember.json          {"format": "ember-checkpoint", "format_version": 1, "ember_version": ...,
                           "model": <ModelConfig dict>, "head": {"kind": "lm"}, "tokenizer": "tokenizer/" | null,
                           "dtype": "float32", "extra": {...}}

The head kind says what the model's output is: "lm" (next-token logits over the vocabulary),
"classifier" (with "num_classes": N, logits over classes at the last real token) or "reward" (a
scalar score). Files without "head" are LM checkpoints. `head_of(meta)` reads it; `load_checkpoint`
builds LM models and refuses other kinds with the loader to use.
      tokenizer/          optional copy of the tokenizer (load it with `Tokenizer.load(dir / "tokenizer")`)

An adapter checkpoint (`ember finetune` with LoRA, unmerged) has no model.safetensors: ember.json
records {"adapter": {"dir": "adapter", "base": <absolute path of the base checkpoint>}} and
`adapter/` holds the adapter in PEFT's format (io/adapter.py); loading it loads the base and applies it.

Writes are atomic: the whole directory is built next to the target and renamed over it, so a crash
leaves the previous checkpoint (or nothing), never a half-written one. Loading never executes code
(safetensors and json only), and every bad file is a `CheckpointError` naming the file and the fix.

`save_checkpoint` wants a plain (unsharded) model. A trainer with FSDP/TP parameters (DTensors) first
gathers a full state dict, e.g. `get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
cpu_offload=True))`, and calls `save_state_dict` on rank 0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from ember.errors import EmberError
from ember.fileio import atomic_dir
from ember.models import ModelConfig, Transformer, from_state_dict

FORMAT = "ember-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
ADAPTER = "adapter"
META = "ember.json"
TOKENIZER = "tokenizer"

# module-wrapper segments that torch.compile / activation checkpointing / DDP add to parameter names
_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "module.")


class CheckpointError(EmberError):
    """A checkpoint directory that is missing, corrupt or does not match its config."""


# -------------------------------------------------------------------------------------------- save
def save_checkpoint(model: Transformer, out_dir: str | Path, tokenizer_dir: Optional[str | Path] = None,
                    extra: Optional[dict] = None) -> Path:
    """Write `model` (plain, unsharded) as a checkpoint directory; returns its path."""
    return save_state_dict(model.state_dict(), model.cfg, out_dir, tokenizer_dir=tokenizer_dir, extra=extra)


HEAD_KINDS = ("lm", "classifier", "reward")


def check_head(head: Optional[dict], where: str = "head") -> dict:
    """A valid head description ({"kind": "lm"} when None)."""
    head = dict(head or {"kind": "lm"})
    kind = head.get("kind")
    if kind not in HEAD_KINDS:
        raise CheckpointError(f"{where}: head kind {kind!r}, expected one of {list(HEAD_KINDS)}. "
                              "HINT: the checkpoint may come from a newer ember: upgrade ember")
    if kind == "classifier":
        n = head.get("num_classes")
        if not isinstance(n, int) or isinstance(n, bool) or n < 2:
            raise CheckpointError(f"{where}: a classifier head needs 'num_classes' >= 2, got {n!r}. "
                                  "HINT: the file is corrupt; re-save the checkpoint")
        labels = head.get("labels")
        if labels is not None and (not isinstance(labels, list) or len(labels) != n):
            raise CheckpointError(f"{where}: the classifier head's 'labels' must list its {n} class names")
    return head


def head_of(meta: dict, where: str = "ember.json") -> dict:
    """The head a checkpoint's metadata describes (LM for files written before heads were recorded)."""
    return check_head(meta.get("head"), where)


def save_state_dict(state_dict: Mapping[str, torch.Tensor], model_cfg: ModelConfig, out_dir: str | Path,
                    tokenizer_dir: Optional[str | Path] = None, extra: Optional[dict] = None,
                    head: Optional[dict] = None, quant: Optional[dict] = None) -> Path:
    """Write a full (gathered) state dict of a `Transformer(model_cfg)` as a checkpoint directory.

    `head`: what the output is (see the module docstring); default {"kind": "lm"}.
    `quant`: the `QuantSpec.to_dict()` of a model quantized by ember.quant (its state dict holds codes)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    head = check_head(head)
    n_out = head_size(head)
    tensors = _storable(state_dict, model_cfg, n_out)
    _check_tensors(tensors, model_cfg, where="state dict given to save_state_dict", n_out=n_out, quant=quant)
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise CheckpointError(f"{tokenizer_dir}: tokenizer directory not found. "
                              "HINT: pass the directory holding tokenizer.json (or None).")
    meta = _meta(model_cfg, head, tokenizer_dir, _dtype_name(tensors), extra)
    if quant:
        meta["quant"] = dict(quant)
    return _write(out, meta, tokenizer_dir, lambda tmp: save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"}))


def save_adapter_checkpoint(out_dir: str | Path, model_cfg: ModelConfig, base: str | Path,
                            write_adapter: Callable[[Path], Any], tokenizer_dir: Optional[str | Path] = None,
                            extra: Optional[dict] = None) -> Path:
    """A checkpoint that is a base checkpoint plus an adapter: ember.json names the base (by absolute
    path) and `adapter/` holds the adapter (`write_adapter(dir)` writes it); no weights of its own.
    `load_checkpoint` loads the base and applies the adapter."""
    base = Path(base).resolve()
    meta = _meta(model_cfg, None, tokenizer_dir, "float32", extra)
    meta["adapter"] = {"dir": ADAPTER, "base": str(base)}
    return _write(Path(out_dir), meta, tokenizer_dir, lambda tmp: write_adapter(tmp / ADAPTER))


def _meta(model_cfg: ModelConfig, head: Optional[dict], tokenizer_dir, dtype: str, extra: Optional[dict]) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "ember_version": _ember_version(),
            "model": model_cfg.to_dict(), "head": check_head(head),
            "tokenizer": f"{TOKENIZER}/" if tokenizer_dir is not None else None, "dtype": dtype,
            "extra": dict(extra or {})}


def _write(out: Path, meta: dict, tokenizer_dir, write_payload: Callable[[Path], Any]) -> Path:
    """ember.json + payload (+ tokenizer/) into `out`, atomically; errors name the directory."""
    try:
        meta_text = json.dumps(meta, indent=2)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{out / META}: `extra` is not JSON-serialisable ({e}). "
                              "HINT: keep extra to str/int/float/bool/list/dict values.") from None
    try:
        with atomic_dir(out) as tmp:
            write_payload(tmp)
            if tokenizer_dir is not None:
                shutil.copytree(tokenizer_dir, tmp / TOKENIZER)
            (tmp / META).write_text(meta_text + "\n")
    except OSError as e:  # disk full, quota, permissions; atomic_dir left `out` as it was
        raise CheckpointError(f"{out}: could not write the checkpoint ({e.strerror or e}); nothing there was "
                              "replaced. HINT: free disk space or choose another directory") from None
    return out


def head_size(head: dict) -> Optional[int]:
    """The output size a head kind gives the Transformer (None = the vocabulary: a language model)."""
    return {"lm": None, "reward": 1}.get(head["kind"], head.get("num_classes"))


def _storable(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig,
              n_out: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Clean names, drop a tied head, and make every tensor a plain contiguous cpu tensor.

    Tensors that share storage (views of one fused buffer) are cloned: safetensors stores each once.
    """
    out, seen = {}, set()
    for name, t in state_dict.items():
        for part in _WRAPPER_PARTS:
            name = name.replace(part, "")
        if cfg.tie_embeddings and n_out is None and name == "output.weight":
            continue
        if _is_dtensor(t):
            raise CheckpointError(f"state dict tensor '{name}' is a sharded DTensor. HINT: gather a full state "
                                  "dict first (torch.distributed.checkpoint.state_dict.get_model_state_dict with "
                                  "StateDictOptions(full_state_dict=True, cpu_offload=True)) and call "
                                  "save_state_dict on rank 0.")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    return out


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _dtype_name(tensors: Mapping[str, torch.Tensor]) -> str:
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    return dtypes[0] if len(dtypes) == 1 else "mixed"


def _ember_version() -> str:
    from ember._version import __version__

    return __version__


# -------------------------------------------------------------------------------------------- load
def read_meta(ckpt_dir: str | Path) -> dict:
    """The validated contents of `<ckpt_dir>/ember.json`."""
    d = Path(ckpt_dir)
    if not d.exists():
        raise CheckpointError(f"{d}: checkpoint directory not found. "
                              "HINT: check the path; a checkpoint is a directory holding ember.json and "
                              "model.safetensors.")
    if not d.is_dir():
        raise CheckpointError(f"{d}: is a file, expected a checkpoint directory. "
                              "HINT: pass the directory that holds ember.json and model.safetensors.")
    path = d / META
    if not path.is_file():
        hint = ("it looks like a Hugging Face model: run `ember convert --from-hf DIR --out NEW_DIR` first"
                if (d / "config.json").is_file() else "re-save the checkpoint with ember (save_checkpoint)")
        raise CheckpointError(f"{path}: missing, so {d} is not an ember checkpoint. HINT: {hint}.")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}). "
                              "HINT: the file is corrupt; restore it or re-save the checkpoint.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: format is {found!r}, expected {FORMAT!r}. "
                              "HINT: this is not an ember checkpoint; re-save it with ember.")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path}: format_version is {version!r}, expected an integer >= 1. "
                              "HINT: the file is corrupt; re-save the checkpoint.")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version} is newer than this ember reads "
                              f"({FORMAT_VERSION}). HINT: upgrade ember (pip install -U ember).")
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{path}: 'model' must be the model config mapping, got {meta.get('model')!r}. "
                              "HINT: the file is corrupt; re-save the checkpoint.")
    return meta


def model_config(meta: dict, ckpt_dir: str | Path = "?") -> ModelConfig:
    """The ModelConfig recorded in a checkpoint's metadata."""
    try:
        return ModelConfig.from_dict(dict(meta["model"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(ckpt_dir) / META}: 'model' is not a valid ModelConfig ({e}). "
                              "HINT: the checkpoint may come from a newer ember: upgrade ember.") from None


_COMMANDS = {"classifier": "ember classify eval / predict", "reward": "ember reward score"}


def load_checkpoint(ckpt_dir: str | Path, device: str | torch.device = "cpu",
                    dtype: Optional[torch.dtype] = None, kinds: tuple[str, ...] = ("lm",),
                    quantized: bool = False) -> tuple[Transformer, dict]:
    """Build the model a checkpoint describes (on meta), load its weights, re-tie, eval mode.

    Returns (model, meta). `dtype` casts floating weights (None keeps the stored dtype; quantization
    scales stay fp32); the RoPE table stays fp32. `kinds`: the head kinds the caller can use (a
    classifier's output is its classes, not the vocabulary); another kind is a CheckpointError naming
    the command for it. `quantized`: whether the caller runs inference only and so accepts a
    checkpoint written by `ember quantize` (its Linears become ember.quant.QuantLinear).
    """
    d = Path(ckpt_dir)
    meta = read_meta(d)
    head = head_of(meta, str(d / META))
    if head["kind"] not in kinds:
        want = " or ".join(kinds)
        raise CheckpointError(f"{d / META}: holds a {head['kind']} head, expected {want}. HINT: use it with "
                              f"{_COMMANDS.get(head['kind'], 'ember generate / chat')}")
    cfg = model_config(meta, d)
    if meta.get("adapter"):
        return _load_with_adapter(d, meta, cfg, device, dtype)
    if meta.get("quant"):
        if not quantized:
            raise CheckpointError(f"{d / META}: holds {meta['quant'].get('method')}-quantized weights, which are "
                                  "for inference only (ember generate, chat, serve, evaluate). HINT: train or "
                                  "convert the original checkpoint, then quantize the result")
        return _load_quantized(d, meta, cfg, head, device, dtype)
    tensors = _read_tensors(d / WEIGHTS, device)
    n_out = head_size(head)
    _check_tensors(tensors, cfg, where=str(d / WEIGHTS), n_out=n_out)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return from_state_dict(cfg, tensors, device, n_out=n_out), meta


def _quant_spec(meta: dict, d: Path):
    from ember.quant import QuantSpec

    try:
        return QuantSpec.from_dict(dict(meta["quant"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{d / META}: 'quant' is not a valid quantization record ({e}). "
                              "HINT: re-run ember quantize on the original checkpoint") from None


def _load_quantized(d: Path, meta: dict, cfg: ModelConfig, head: dict, device, dtype) -> tuple[Transformer, dict]:
    from ember.quant import prepare_quantized

    spec = _quant_spec(meta, d)
    n_out = head_size(head)
    tensors = _read_tensors(d / WEIGHTS, device)
    _check_tensors(tensors, cfg, where=str(d / WEIGHTS), n_out=n_out, quant=meta["quant"])
    if dtype is not None:  # norms, biases, float layers; the codes and their scales keep their dtypes
        tensors = {k: v.to(dtype) if v.is_floating_point() and not k.endswith((".scale", ".zero")) else v
                   for k, v in tensors.items()}
    with torch.device("meta"):
        model = Transformer(cfg, n_out)
    prepare_quantized(model, spec)
    if cfg.tie_embeddings and n_out is None and "output" not in spec.modules and not spec.embedding:
        tensors.setdefault("output.weight", tensors["tok_embeddings.weight"])
    model.load_state_dict(tensors, strict=True, assign=True)
    model.tie_weights()
    model.reset_buffers(torch.device(device))
    return model.eval(), meta


def _load_with_adapter(d: Path, meta: dict, cfg: ModelConfig, device, dtype) -> tuple[Transformer, dict]:
    from ember.io.adapter import load_adapter

    base = Path(meta["adapter"].get("base", ""))
    if not (base / META).is_file():
        raise CheckpointError(f"{d / META}: the adapter's base checkpoint {base} is gone. HINT: put the base "
                              "checkpoint back, or merge the adapter into full weights (ember finetune --merge)")
    model, base_meta = load_checkpoint(base, device=device, dtype=dtype)
    same = lambda c: {k: v for k, v in c.to_dict().items() if k != "dropout"}  # noqa: E731 (training-only)
    if same(model.cfg) != same(cfg):
        raise CheckpointError(f"{d / META}: the base checkpoint {base} no longer has the model the adapter was "
                              "trained on. HINT: use the original base checkpoint")
    if meta.get("extra", {}).get("base_quant") == "nf4":  # trained against the NF4 base: use what it saw
        from ember.peft.qlora import dequantized_base

        model.load_state_dict(dequantized_base(model.state_dict()))
    load_adapter(model, cfg, d / meta["adapter"].get("dir", ADAPTER))
    return model.eval(), meta


def _read_tensors(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: weights file missing. "
                              "HINT: the checkpoint is incomplete; re-save it or copy model.safetensors back.")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read the safetensors file, it is truncated or corrupt ({e}). "
                              "HINT: re-copy or re-save the checkpoint.") from None


def expected_shapes(cfg: ModelConfig, n_out: Optional[int] = None,
                    quant: Optional[dict] = None) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape that a checkpoint of `cfg` (head size `n_out`, quantized as `quant`
    describes) stores (a tied head is left out)."""
    with torch.device("meta"):
        model = Transformer(cfg, n_out)
        if quant:
            from ember.quant import QuantSpec, prepare_quantized

            prepare_quantized(model, QuantSpec.from_dict(dict(quant)))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings and n_out is None:
        shapes.pop("output.weight", None)
    return shapes


def _check_tensors(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig, where: str,
                   n_out: Optional[int] = None, quant: Optional[dict] = None) -> None:
    """Names and shapes must be exactly those of `Transformer(cfg, n_out)` (quantized as `quant` says)."""
    expected = expected_shapes(cfg, n_out, quant)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    hint = ("HINT: the weights do not belong to this model config; fix 'model' in ember.json "
            "or re-save the checkpoint with ember.")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s) {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s) {_few(unexpected)}")
        raise CheckpointError(f"{where}: {' and '.join(parts)} for the model config. {hint}")
    bad = [(k, expected[k], tuple(tensors[k].shape)) for k in expected  # model order: embeddings first
           if tuple(tensors[k].shape) != expected[k]]
    if bad:
        desc = "; ".join(f"{k}: expected {e}, found {f}" for k, e, f in bad[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise CheckpointError(f"{where}: shape mismatch: {desc}{more}. {hint}")


def _few(names: list[str], n: int = 4) -> str:
    shown = ", ".join(names[:n])
    return f"[{shown}{', ...' if len(names) > n else ''}]"

