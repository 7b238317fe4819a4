"""Preference data: prompt + chosen + rejected -> token ids with labels on the completions only.

Record layouts (JSON array, JSONL or parquet):

    {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}       TRL's
    {"conversations": [{"from": "human", "value": ...}, ...], "chosen": {"from": "gpt", "value": ...},
     "rejected": {...}}                                                                      ShareGPT-style

Conversational records are rendered with the model's chat template (ember.data.sft.chat_example): the
prompt turns carry no labels, the final assistant turn (its end-of-turn token included) is the
completion whose log-probability DPO and reward models compare. A plain-string prompt with plain
completions is tokenized as text, the completion followed by EOS. A malformed record is an error
naming file and line, or a counted skip with `skip_bad_records`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ember.data.examples import ExampleLoader
from ember.data.sft import (IGNORE, SFTStats, _fit, chat_example, check_limits, check_turns, read_records,
                            text_example)
from ember.errors import EmberError

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class PrefDataConfig:
    """Preference pairs for `ember dpo` / `ember reward train`."""

    path: str = ""
    """A JSON / JSONL / parquet file of preference records."""
    val_fraction: float = 0.05
    """Fraction of pairs held out for validation."""
    max_length: int = 512
    """Tokens per prompt + completion."""
    truncation: str = "right"
    """A longer prompt + completion: right = keep its start, left = keep its end, drop = skip the pair."""
    skip_bad_records: bool = False
    """Skip (and count) malformed records instead of failing on the first one."""
    seed: int = 0
    """Seed of the validation split and the batch order."""

    def __post_init__(self) -> None:
        check_limits(self)


def _msgs(x: Any, where: str) -> list[dict]:
    if isinstance(x, str):
        return [{"role": "user", "content": x}]
    if isinstance(x, dict):
        x = [x]
    if not isinstance(x, list):
        raise ValueError(f"{where} must be a string, a message or a list of messages")
    out = []
    for m in x:
        if not isinstance(m, dict):
            raise ValueError(f"{where}: a message must be an object")
        role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
        if role not in _ROLES or not isinstance(content, str):
            raise ValueError(f"{where}: a message needs a role (user/assistant/system, or from: human/gpt) and text")
        out.append({"role": _ROLES[role], "content": content})
    return out


def to_pair(rec: Any) -> tuple[str, Any, Any, Any]:
    """("chat", prompt messages, chosen reply, rejected reply) or ("text", prompt, chosen, rejected)."""
    if not isinstance(rec, dict):
        raise ValueError(f"a JSON {type(rec).__name__}, expected an object")
    if "chosen" not in rec or "rejected" not in rec:
        raise ValueError(f"expected 'chosen' and 'rejected' (keys {sorted(rec)[:6]})")
    prompt = rec.get("prompt", rec.get("conversations"))
    if prompt is None:
        raise ValueError("expected a 'prompt' (or ShareGPT 'conversations')")
    if all(isinstance(rec[k], str) for k in ("chosen", "rejected")) and isinstance(prompt, str) and "prompt" in rec:
        if not rec["chosen"] or not rec["rejected"]:
            raise ValueError("an empty completion")
        return "text", prompt, rec["chosen"], rec["rejected"]
    p = _msgs(prompt, "prompt")
    replies = []
    for k in ("chosen", "rejected"):
        r = _msgs(rec[k], k)
        if r[0]["role"] != "assistant":  # TRL's conversational layout repeats the prompt in chosen/rejected
            r = r[len(p):] if r[:len(p)] == p else r
        if len(r) != 1 or r[0]["role"] != "assistant" or not r[0]["content"].strip():
            raise ValueError(f"'{k}' must be one non-empty assistant reply")
        replies.append(r[0]["content"])
    check_turns(p + [{"role": "assistant", "content": replies[0]}])
    return "chat", p, replies[0], replies[1]


def pair_example(tok, kind: str, prompt, chosen: str, rejected: str) -> tuple[tuple, tuple]:
    """((ids, labels) of prompt + chosen, (ids, labels) of prompt + rejected); labels on the reply only."""
    if kind == "text":
        return text_example(tok, prompt, chosen), text_example(tok, prompt, rejected)
    return tuple(chat_example(tok, prompt + [{"role": "assistant", "content": c}]) for c in (chosen, rejected))


def load_pairs(path: str | Path, tok, cfg: PrefDataConfig, stats: Optional[SFTStats] = None) -> list[tuple]:
    """Every usable (chosen (ids, labels), rejected (ids, labels)) of a file, in file order."""
    stats = stats if stats is not None else SFTStats()
    out = []
    for where, rec in read_records(path):
        stats.records += 1
        try:
            kind, prompt, chosen, rejected = to_pair(rec)
            pair = pair_example(tok, kind, prompt, chosen, rejected)
        except (ValueError, EmberError) as e:
            if cfg.skip_bad_records:
                stats.bad_records += 1
                continue
            raise EmberError(f"{where}: {e}. HINT: fix the record, or pass --data.skip-bad-records") from None
        fitted = [_fit(ids, labels, cfg, stats) for ids, labels in pair]
        if any(f is None or all(x == IGNORE for x in f[1][1:]) for f in fitted):
            stats.all_masked += 1
            continue
        out.append(tuple(fitted))
    return out


def pair_batch(pairs: list[tuple], pad_id: int) -> dict:
    """{"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"}: (B, T) inputs and shifted labels,
    right-padded to the longest of both sides (so one forward can take chosen and rejected together)."""
    T = max(len(ids) for pair in pairs for ids, _ in pair) - 1
    out = {}
    for side, k in (("chosen", 0), ("rejected", 1)):
        ids_t = torch.full((len(pairs), T), pad_id, dtype=torch.long)
        lab_t = torch.full((len(pairs), T), IGNORE, dtype=torch.long)
        for b, pair in enumerate(pairs):
            ids, labels = pair[k]
            n = len(ids) - 1
            ids_t[b, :n] = torch.tensor(ids[:-1])
            lab_t[b, :n] = torch.tensor(labels[1:])
        out[f"{side}_ids"], out[f"{side}_labels"] = ids_t, lab_t
    return out


def reward_batch(pairs: list[tuple], pad_id: int) -> dict:
    """{"chosen_ids", "chosen_last", "rejected_ids", "rejected_last"}: whole right-padded sequences (B, T)
    and the index of each one's last real token (where a reward model reads its score)."""
    from ember.data.cls import cls_batch

    out = {}
    for side, k in (("chosen", 0), ("rejected", 1)):
        b = cls_batch([(pair[k][0], 0) for pair in pairs], pad_id)
        out[f"{side}_ids"], out[f"{side}_last"] = b["input_ids"], b["last"]
    return out


class PairLoader(ExampleLoader):
    """Seeded, resumable, rank-aware batches of preference pairs: `pair_batch` (DPO: inputs and shifted
    completion labels) or, with reward=True, `reward_batch` (whole sequences and their last tokens)."""

    name = "preference data"

    def __init__(self, examples: list, batch_size: int, pad_id: int, seed: int = 0, dp_rank: int = 0,
                 dp_size: int = 1, reward: bool = False):
        super().__init__(examples, batch_size, pad_id, seed, dp_rank, dp_size)
        self.reward = reward

    def collate(self, chosen: list) -> dict:
        return reward_batch(chosen, self.pad_id) if self.reward else pair_batch(chosen, self.pad_id)
