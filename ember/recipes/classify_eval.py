"""Evaluate a classifier checkpoint: accuracy, per-class precision / recall / F1, a confusion-matrix PNG.

    ember classify eval --checkpoint runs/classify/final --split test        # the split it was trained with
    ember classify eval --checkpoint runs/classify/final --data.path other.csv --split all

By default the data settings (file, fields, balancing, fractions, seed) are the ones the checkpoint
was trained with, so `--split test` is the held-out test split no training step saw. Writes
report.json and confusion.png to --out (default: CHECKPOINT/eval-SPLIT).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from ember.errors import EmberError
from ember.log import log


@dataclass
class Config:
    """Evaluate a classifier checkpoint on a split of labelled data."""

    checkpoint: str = ""
    """A classifier checkpoint (ember classify train's final/)."""
    split: Literal["test", "val", "train", "all"] = "test"
    """Which split of the data to score (all = every record of the file)."""
    data_path: Optional[str] = None
    """Another data file (same fields as in training); default the training file."""
    batch_size: int = 32
    """Examples per forward."""
    out: Optional[str] = None
    """Where report.json and confusion.png go (default CHECKPOINT/eval-SPLIT)."""
    device: str = "cpu"
    """cpu, cuda or cuda:N."""


def main(cfg: Config) -> int:
    import dataclasses

    from ember.data.cls import ClsDataConfig, ClsLoader
    from ember.eval.classification import confusion, plot_confusion, predict, report
    from ember.fileio import atomic_write_text, check_writable
    from ember.infer.api import load_tokenizer
    from ember.io.checkpoint import load_checkpoint
    from ember.parallel import resolve_device
    from ember.recipes.classify_train import load_splits

    if not cfg.checkpoint:
        raise EmberError("--checkpoint is required: a classifier checkpoint (ember classify train's final/)")
    out = Path(cfg.out) if cfg.out else Path(cfg.checkpoint) / f"eval-{cfg.split}"
    check_writable(out)
    model, meta = load_checkpoint(cfg.checkpoint, device=resolve_device(cfg.device), kinds=("classifier",))
    tok = load_tokenizer(cfg.checkpoint, meta, None)
    names = meta["head"].get("labels") or [str(i) for i in range(meta["head"]["num_classes"])]
    saved = meta.get("extra", {}).get("data")
    if not saved and not cfg.data_path:
        raise EmberError(f"{cfg.checkpoint}: records no training data settings. HINT: pass --data-path FILE")
    data = dataclasses.replace(ClsDataConfig(**saved) if saved else ClsDataConfig(),
                               **({"path": cfg.data_path} if cfg.data_path else {}))
    examples = load_splits(data, tok, names, which=(cfg.split,))[1][cfg.split]
    pad = tok.fill_id
    labels, probs = predict(model, ClsLoader(examples, cfg.batch_size, pad).iter_eval())
    cm = confusion(labels, probs.argmax(-1), len(names))
    rep = report(cm, names) | {"split": cfg.split, "examples": len(examples), "data": data.path}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(rep, indent=2) + "\n")
    ck = Path(cfg.checkpoint).resolve()
    plot_confusion(cm, names, out / "confusion.png", title=f"{ck.parent.name}/{ck.name}: {cfg.split} split")
    _print(rep)
    log(f"wrote {out / 'report.json'} and {out / 'confusion.png'}")
    return 0


def _print(rep: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{rep['split']} split: {rep['examples']} examples, accuracy {rep['accuracy']:.4f}, "
                    f"macro F1 {rep['macro_f1']:.4f}")
    for col in ("class", "precision", "recall", "F1", "support"):
        t.add_column(col, justify="right" if col != "class" else "left")
    for name, r in rep["per_class"].items():
        t.add_row(name, f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}", str(r["support"]))
    Console().print(t)
