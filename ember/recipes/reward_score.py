"""Score prompt + completion pairs with a reward model checkpoint (head kind "reward").

    ember reward score --checkpoint runs/reward/final --prompt "Is the sky blue?" --completion "Yes, it is."
    ember reward score --checkpoint runs/reward/final --input pairs.jsonl     # {"prompt", "completion"} per line

The prompt is rendered with the model's chat template as a user turn and the completion as the
assistant's reply (exactly as `ember reward train` renders its pairs); the score is the head's output at
the last real token (ember.train.rollouts.reward_model_fn, which `ember grpo --reward-model` uses too).
Prints one score per pair (or JSON with --json).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ember.errors import EmberError


@dataclass
class Config:
    """Score completions with a reward model."""

    checkpoint: str = ""
    """A reward model checkpoint (ember reward train's final/)."""
    prompt: Optional[str] = None
    """A prompt (a user turn)."""
    completion: Optional[str] = None
    """Its completion (the assistant's reply)."""
    input: Optional[str] = None
    """A JSONL file of {"prompt", "completion"} records."""
    json: bool = False
    """Print {"prompt", "completion", "score"} per pair."""
    device: str = "cpu"
    """cpu, cuda or cuda:N."""


def main(cfg: Config) -> int:
    from ember.train.rollouts import reward_model_fn

    pairs = []
    if cfg.prompt is not None or cfg.completion is not None:
        if cfg.prompt is None or cfg.completion is None:
            raise EmberError("--prompt and --completion go together")
        pairs.append((cfg.prompt, cfg.completion))
    if cfg.input:
        path = Path(cfg.input)
        if not path.is_file():
            raise EmberError(f"{path}: no such file")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                pairs.append((rec["prompt"], rec["completion"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise EmberError(f"{path}:{n}: expected a JSON object with 'prompt' and 'completion'") from None
    if not cfg.checkpoint or not pairs:
        raise EmberError("--checkpoint and --prompt/--completion (or --input FILE) are required")
    scores = reward_model_fn(cfg.checkpoint, cfg.device)([p for p, _ in pairs], [c for _, c in pairs])
    for (p, c), s in zip(pairs, scores):
        print(json.dumps({"prompt": p, "completion": c, "score": s}, ensure_ascii=False) if cfg.json else f"{s:.4f}")
    sys.stdout.flush()
    return 0
