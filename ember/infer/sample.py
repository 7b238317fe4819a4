"""Sampling: pure functions from next-token logits (B, V) to token ids (B,).

The processing order follows Hugging Face's `generate` (so seeds and masks are comparable):

    logits ─ repetition_penalty ─ / temperature ─ top_k ─ top_p ─ min_p ─ softmax ─ draw

temperature == 0 means greedy (argmax of the penalised logits; the other warpers are skipped).
Every function is batched over B, keeps shapes static (masks, not slicing) and takes an optional
`torch.Generator`, so one seed reproduces a whole generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ember.errors import EmberError


@dataclass
class SamplingParams:
    """How the next token is chosen from the logits."""

    temperature: float = 1.0
    """Softmax temperature; 0 = greedy (argmax)."""
    top_k: Optional[int] = None
    """Keep only the k most likely tokens (None or 0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability mass reaches top_p (1 = off)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p * (the top token's probability) (0 = off)."""
    repetition_penalty: float = 1.0
    """HF semantics: logits of already-seen tokens are divided (if > 0) or multiplied (if < 0) by it (1 = off)."""

    def validate(self) -> "SamplingParams":
        checks = [
            (self.temperature >= 0, "temperature", "a number >= 0 (0 = greedy)"),
            (self.top_k is None or self.top_k >= 0, "top_k", "an integer >= 0 (0 = off)"),
            (0 < self.top_p <= 1, "top_p", "a number in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p", "a number in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty", "a number > 0 (1 = off)"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise EmberError(f"sampling: {name}={getattr(self, name)!r} is invalid, expected {expected}.")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# --------------------------------------------------------------------------------- processors
def seen_mask(ids: torch.Tensor, vocab_size: int, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, V) bool: True where token v occurs in row b of ids (B, T) (only where `valid` (B, T) is True)."""
    B = ids.shape[0]
    if valid is not None:  # invalid (pad) entries write into a scratch column V, dropped below
        ids = torch.where(valid.bool(), ids, torch.full_like(ids, vocab_size))
    out = torch.zeros(B, vocab_size + 1, dtype=torch.bool, device=ids.device)
    return out.scatter_(1, ids, True)[:, :vocab_size].contiguous()


def update_seen(seen: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mark tokens (B,) as seen in seen (B, V), in place."""
    return seen.scatter_(1, tokens.view(-1, 1), True)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF `RepetitionPenaltyLogitsProcessor`: for seen tokens, x > 0 -> x / p, x < 0 -> x * p. (B, V)."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: torch.Tensor, k: Optional[int]) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf. (B, V)."""
    if not k or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest prefix of the sorted tokens whose mass reaches p (always the top one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = mass_before >= p  # the first token has mass_before 0 < p: always kept
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's largest probability. (B, V)."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values  # (B, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """All processors in HF order; returns float32 logits (B, V) ready for softmax (or argmax if greedy)."""
    x = logits.float()
    if seen is not None:
        x = apply_repetition_penalty(x, seen, params.repetition_penalty)
    if params.greedy:
        return x
    if params.temperature != 1.0:
        x = x / params.temperature
    x = apply_top_k(x, params.top_k)
    x = apply_top_p(x, params.top_p)
    return apply_min_p(x, params.min_p)


# ---------------------------------------------------------------------------------------- draw
def sample_from_logits(logits: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw one token per row from softmax(logits) (B, V) -> (B,) long."""
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample(logits: torch.Tensor, params: SamplingParams, seen: Optional[torch.Tensor] = None,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): greedy when temperature == 0, else processed + drawn."""
    x = process_logits(logits, params, seen)
    if params.greedy:
        return x.argmax(dim=-1)
    return sample_from_logits(x, generator)
