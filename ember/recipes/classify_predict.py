"""Classify text with a classifier checkpoint: the label and its probability, per text.

    ember classify predict --checkpoint runs/classify/final --text "WINNER! Claim your prize now"
    ember classify predict --checkpoint runs/classify/final --input messages.txt      # one text per line
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Optional

import tyro

from ember.errors import EmberError


@dataclass
class Config:
    """Label texts with a classifier checkpoint."""

    checkpoint: str = ""
    """A classifier checkpoint (ember classify train's final/)."""
    text: tyro.conf.UseAppendAction[list[str]] = field(default_factory=list)
    """A text to classify (repeat the flag for several)."""
    input: Optional[str] = None
    """A file of texts, one per line."""
    json: bool = False
    """Print one JSON object per text ({"text", "label", "probability", "probabilities"})."""
    device: str = "cpu"
    """cpu, cuda or cuda:N."""


def main(cfg: Config) -> int:
    from pathlib import Path

    from ember.data.cls import ClsLoader, encode
    from ember.eval.classification import predict
    from ember.infer.api import load_tokenizer
    from ember.io.checkpoint import load_checkpoint
    from ember.parallel import resolve_device

    texts = list(cfg.text)
    if cfg.input:
        path = Path(cfg.input)
        if not path.is_file():
            raise EmberError(f"{path}: no such file. HINT: --input FILE with one text per line")
        texts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not cfg.checkpoint or not texts:
        raise EmberError("--checkpoint and at least one --text (or --input FILE) are required")
    model, meta = load_checkpoint(cfg.checkpoint, device=resolve_device(cfg.device), kinds=("classifier",))
    tok = load_tokenizer(cfg.checkpoint, meta, None)
    names = meta["head"].get("labels") or [str(i) for i in range(meta["head"]["num_classes"])]
    max_len = (meta.get("extra", {}).get("data") or {}).get("max_length", model.cfg.block_size)
    examples = encode(tok, [(t, 0) for t in texts], min(max_len, model.cfg.block_size))
    pad = tok.fill_id
    _, probs = predict(model, ClsLoader(examples, 32, pad).iter_eval())
    for text, p in zip(texts, probs):
        k = int(p.argmax())
        if cfg.json:
            print(json.dumps({"text": text, "label": names[k], "probability": float(p[k]),
                              "probabilities": {n: float(v) for n, v in zip(names, p)}}, ensure_ascii=False))
        else:
            print(f"{names[k]}\t{float(p[k]):.4f}\t{text}")
    sys.stdout.flush()
    return 0
