"""The flags `ember generate` and `ember chat` share: which checkpoint to load, and how to sample.

Each command subclasses `SamplingFlags` and may redeclare a field to change its default (chat samples
more conservatively and writes longer replies); flag names and YAML keys are the field names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import tyro

from ember.errors import EmberError
from ember.infer import api
from ember.infer.sample import SamplingParams


@dataclass
class SamplingFlags:
    checkpoint: str = ""
    """Checkpoint directory (ember.json + model.safetensors [+ tokenizer/])."""
    max_new_tokens: int = 128
    """New tokens per sample (clamped, with a warning, to what fits the context window)."""
    temperature: float = 0.8
    """Softmax temperature; 0 = greedy."""
    top_k: Optional[int] = 50
    """Sample among the k most likely tokens only (0 or None = off)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 = off)."""
    min_p: float = 0.0
    """Drop tokens below min_p x the top probability (0 = off)."""
    repetition_penalty: float = 1.0
    """Penalise already-seen tokens (HF semantics; 1 = off)."""
    stop: tyro.conf.UseAppendAction[list[str]] = field(default_factory=list)
    """A stop string (repeat the flag for several); the output is cut before it. \\n and \\t are unescaped."""
    seed: int = 1234
    """Random seed (same seed, same samples)."""
    tokenizer: Optional[str] = None
    """Tokenizer directory/file; default the checkpoint's own tokenizer/ copy."""
    device: str = "cpu"
    """Device to run on (cpu, cuda, cuda:1, ...)."""
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    """Weights dtype; default the checkpoint's."""

    def sampling_params(self) -> SamplingParams:
        """The sampling flags as validated SamplingParams (a clear error names a bad value)."""
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty).validate()

    def require_checkpoint(self, command: str) -> None:
        if not self.checkpoint:
            raise EmberError(f"ember {command}: --checkpoint DIR is required "
                             "(a directory from ember pretrain or ember convert).")

    def load(self, command: str) -> tuple[Any, Any]:
        """(model, tokenizer) from --checkpoint, on --device in --dtype, with --tokenizer if given."""
        self.require_checkpoint(command)
        return api.load(self.checkpoint, device=self.device, dtype=self.dtype, tokenizer=self.tokenizer)
