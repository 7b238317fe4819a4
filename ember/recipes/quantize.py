"""`ember quantize --checkpoint DIR --method int8|int4 [--group-size 32] --out DIR`: weight-only quantization.

Every Linear (the head included) and the token embedding get integer codes (ember/quant/core.py:
int8 per output channel, int4 per group of --group-size inputs); norms, biases and learned position
embeddings stay float. The result is an ordinary checkpoint directory (ember.json records "quant")
that `ember generate`, `chat`, `serve` and `evaluate` load as they load any other; training commands
refuse it. The table printed at the end compares file bytes and the weights' reconstruction error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ember.errors import EmberError
from ember.log import log, warn


@dataclass
class Config:
    """Quantize a checkpoint's weights to int8 or int4 (weight-only)."""

    checkpoint: str = ""
    """The ember checkpoint directory to quantize (a language model)."""
    method: Literal["int8", "int4"] = "int8"
    """int8: symmetric per output channel; int4: asymmetric per group of --group-size inputs."""
    group_size: int = 32
    """int4 only: inputs per scale/zero point (32, 64, 128 or 256; smaller = more accurate, larger file)."""
    out: str = ""
    """The directory to write (must not exist or be empty, unless --overwrite)."""
    skip: list[str] = field(default_factory=list)
    """Linear names (suffixes) to keep in float, e.g. --skip output (the head)."""
    embedding: bool = True
    """Quantize the token embedding too (a tied embedding shares the head's codes)."""
    overwrite: bool = False
    """Replace an existing --out directory (atomically)."""


def main(cfg: Config) -> int:
    from ember.fileio import check_out_dir
    from ember.io.checkpoint import META, TOKENIZER, load_checkpoint, read_meta, save_state_dict
    from ember.quant import QuantLinear, quantize_model

    if not cfg.checkpoint or not cfg.out:
        raise EmberError("--checkpoint and --out are required. HINT: ember quantize --checkpoint DIR --method int8 "
                         "--out DIR-int8")
    src, out = Path(cfg.checkpoint), Path(cfg.out)
    meta = read_meta(src)
    if meta.get("quant"):
        raise EmberError(f"{src / META}: already quantized ({meta['quant'].get('method')}). "
                         "HINT: quantize the original float checkpoint")
    check_out_dir(out, cfg.overwrite, sources=(src,))
    model, meta = load_checkpoint(src, dtype=torch.float32)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    try:
        spec = quantize_model(model, cfg.method, cfg.group_size if cfg.method == "int4" else None,
                              skip=cfg.skip, embedding=cfg.embedding)
    except ValueError as e:
        raise EmberError(f"--method/--group-size: {e}") from None
    left = [n for n in before if n not in spec.modules and not (cfg.skip and n.endswith(tuple(cfg.skip)))]
    if left:
        fits = [g for g in (256, 128, 64, 32) if all(before[n].shape[1] % g == 0 for n in before)]
        hint = f"--group-size {fits[0]} fits every layer" if fits else "no group size fits every layer"
        warn(f"{len(left)} linear(s) stay float: their in_features is not a multiple of {cfg.group_size} "
             f"({', '.join(left[:3])}{', ...' if len(left) > 3 else ''}). HINT: {hint}")
    errs = []
    for name in spec.modules:
        w, q = before[name], model.get_submodule(name)
        assert isinstance(q, QuantLinear)
        errs.append(((q.dequantized() - w).norm() / w.norm().clamp(min=1e-12)).item())
    tok_dir = src / TOKENIZER if (src / TOKENIZER).is_dir() else None
    extra = dict(meta.get("extra", {}), quantized_from=str(src.resolve()))
    save_state_dict(model.state_dict(), model.cfg, out, tokenizer_dir=tok_dir, extra=extra,
                    head=meta.get("head"), quant=spec.to_dict())
    _report(src, out, spec, errs)
    return 0


def _report(src: Path, out: Path, spec, errs: list[float]) -> None:
    from rich.console import Console
    from rich.table import Table

    from ember.io.checkpoint import WEIGHTS

    b0, b1 = (src / WEIGHTS).stat().st_size, (out / WEIGHTS).stat().st_size
    t = Table(title=f"ember quantize: {spec.method}" + (f", groups of {spec.group_size}" if spec.group_size else ""))
    for c in ("", "file bytes", "ratio", "quantized linears", "mean rel. weight error", "max"):
        t.add_column(c, justify="right")
    t.add_row(str(src), f"{b0:,}", "1.00", "", "", "")
    mean = sum(errs) / max(1, len(errs))
    t.add_row(str(out), f"{b1:,}", f"{b1 / b0:.2f}", f"{len(spec.modules)}" + (" + embedding" if spec.embedding else ""),
              f"{mean:.4f}", f"{max(errs, default=0.0):.4f}")
    Console().print(t)
    log(f"wrote {out} (load it with ember generate / chat / serve / evaluate --checkpoint {out})")
