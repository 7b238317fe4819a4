"""Instruction data for supervised fine-tuning: records -> (input ids, labels) -> padded or packed batches.

Record layouts (JSON array, JSONL or parquet; detected per record):

    {"instruction": ..., "input": ..., "output": ...}       Alpaca: user = instruction (+ "\\n\\n" + input)
    {"messages": [{"role": ..., "content": ...}, ...]}     chat: system?, then user / assistant turns
    {"prompt": ..., "completion": ...}                     plain text, no template: loss on the completion

Chat records are rendered with the tokenizer's own template (its Jinja `chat_template`, or ChatML).
Labels are -100 everywhere but the assistant turns, each turn's end-of-turn token included (the model
must learn to stop). The assistant spans come from rendering the conversation prefix by prefix and
diffing the token prefixes, which works for any template (no `{% generation %}` markers needed):

    ids(messages[:i], generation prompt)   = everything before assistant turn i
    ids(messages[:i+1])                    = ... through the end of turn i
    labels[len(before) : len(through)]     = the turn (trailing template text after its end token dropped)

`train_on_prompt` labels every token instead. A record whose labels end up all -100 (e.g. truncated
away) is skipped and counted, never trained on; padding is masked by position, never by token id, so
pad == EOS cannot hide the EOS from the labels. A bad record is an error naming file and line, or a
counted skip with `skip_bad_records`.

Batches (`SFTLoader`): `pack=False` pads to the longest example of each batch, batches built from
length-sorted groups (less padding); `pack=True` concatenates examples into rows of `max_length`
tokens with positions restarting per example and a block-diagonal causal mask (no attention across
examples; SDPA with a boolean mask, so it runs on CPU).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from ember.data.examples import ExampleLoader
from ember.errors import EmberError
from ember.tokenizer.chat import end_of_turn_ids

IGNORE = -100


@dataclass
class SFTDataConfig:
    """Instruction data for `ember finetune`."""

    path: str = ""
    """A JSON / JSONL / parquet file of records (Alpaca, chat messages, or prompt/completion)."""
    val_path: Optional[str] = None
    """A separate validation file; None = hold out val_fraction of the records."""
    val_fraction: float = 0.05
    """Fraction of records held out for validation when val_path is not given."""
    system: Optional[str] = None
    """A system prompt put before Alpaca records (chat records keep their own)."""
    train_on_prompt: bool = False
    """Label every token, prompts included (default: assistant turns only)."""
    max_length: int = 512
    """Tokens per example (and per packed row)."""
    truncation: str = "right"
    """An example longer than max_length: right = keep its start, left = keep its end, drop = skip it."""
    pack: bool = False
    """Pack several examples per row (document-masked attention) instead of padding each batch."""
    skip_bad_records: bool = False
    """Skip (and count) malformed records instead of failing on the first one."""
    seed: int = 0
    """Seed of the validation split and of the batch order."""

    def __post_init__(self) -> None:
        check_limits(self)


def check_limits(cfg) -> None:
    """The truncation, max_length and val_fraction checks every example-data config shares."""
    if cfg.truncation not in ("right", "left", "drop"):
        raise ValueError(f"data.truncation={cfg.truncation!r}: expected right, left or drop")
    if cfg.max_length < 2:
        raise ValueError(f"data.max_length={cfg.max_length}: expected at least 2 tokens")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={cfg.val_fraction}: expected a fraction in [0, 1)")


@dataclass
class SFTStats:
    records: int = 0
    bad_records: int = 0
    all_masked: int = 0
    truncated: int = 0
    dropped_long: int = 0


# ------------------------------------------------------------------------------------ records
def read_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for every record of a JSON array, JSONL or parquet file; where = 'file:line'."""
    path = Path(path)
    if not path.is_file():
        raise EmberError(f"{path}: no such data file. HINT: check --data.path")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a bad file
            raise EmberError(f"{path}: not a readable parquet file ({e})") from None
        yield from ((f"{path}:row {i + 1}", r) for i, r in enumerate(rows))
        return
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise EmberError(f"{path}: not valid JSON ({e}). HINT: a JSON array of records, or JSONL") from None
        yield from ((f"{path}: item {i}", r) for i, r in enumerate(records))
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{lineno}", _Bad(f"not valid JSON ({e})")


class _Bad:
    def __init__(self, why: str):
        self.why = why


def to_messages(rec: Any, system: Optional[str]) -> tuple[str, Any]:
    """("chat", messages) or ("text", (prompt, completion)); ValueError says what is wrong."""
    if isinstance(rec, _Bad):
        raise ValueError(rec.why)
    if not isinstance(rec, dict):
        raise ValueError(f"a JSON {type(rec).__name__}, expected an object")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        check_turns(msgs)
        return "chat", [{"role": m["role"], "content": m["content"]} for m in msgs]
    if "instruction" in rec and "output" in rec:
        for k in ("instruction", "output"):
            if not isinstance(rec[k], str) or not rec[k].strip():
                raise ValueError(f"'{k}' is empty or not a string")
        extra = rec.get("input") or ""
        if not isinstance(extra, str):
            raise ValueError("'input' is not a string")
        user = rec["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
        return "chat", msgs
    if "prompt" in rec and "completion" in rec:
        if not all(isinstance(rec[k], str) for k in ("prompt", "completion")) or not rec["completion"]:
            raise ValueError("'prompt' and 'completion' must be strings, the completion non-empty")
        return "text", (rec["prompt"], rec["completion"])
    raise ValueError(f"unknown record layout (keys {sorted(rec)[:6]}); expected messages, instruction/output, "
                     "or prompt/completion")


def check_turns(msgs: list) -> None:
    """system? then user/assistant alternating from a user turn, at least one assistant, no empty turn."""
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be an object with string 'role' and 'content'")
        if not m["content"].strip():
            raise ValueError(f"messages[{i}] ({m['role']}) is empty")
    roles = [m["role"] for m in msgs]
    body = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(body))]
    if body != expected or "system" in body:
        raise ValueError(f"roles {roles}: expected an optional system turn, then user and assistant alternating")
    if "assistant" not in body:
        raise ValueError("no assistant turn: nothing to learn from")


# ------------------------------------------------------------------------------------ tokens
def _end_ids(tok) -> set[int]:
    return set(end_of_turn_ids(tok))


def chat_example(tok, msgs: list[dict], train_on_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation; labels -100 but on assistant turns (see the module docstring)."""
    ids = tok.encode_chat(msgs, add_generation_prompt=False)
    if train_on_prompt:
        return ids, list(ids)
    labels = [IGNORE] * len(ids)
    ends = _end_ids(tok)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = tok.encode_chat(msgs[:i], add_generation_prompt=True)
        through = tok.encode_chat(msgs[: i + 1], add_generation_prompt=False)
        if through[: len(before)] != before or ids[: len(through)] != through:
            raise ValueError("the chat template does not render conversations prefix by prefix (its tokens for "
                             "an earlier turn change when a later turn is added)")
        stop = len(through)
        while stop > len(before) and through[stop - 1] not in ends and any(t in ends for t in through[len(before):stop]):
            stop -= 1  # trailing template text after the end-of-turn token ("\n" in ChatML) is not learned
        labels[len(before):stop] = ids[len(before):stop]
    return ids, labels


def text_example(tok, prompt: str, completion: str, train_on_prompt: bool = False) -> tuple[list[int], list[int]]:
    p = tok.encode(prompt) if prompt else []
    c = tok.encode(completion) + [tok.eos_id]
    return p + c, (p if train_on_prompt else [IGNORE] * len(p)) + c


def _fit(ids: list[int], labels: list[int], cfg: SFTDataConfig, stats: SFTStats) -> Optional[tuple]:
    n = cfg.max_length
    if len(ids) <= n:
        return ids, labels
    if cfg.truncation == "drop":
        stats.dropped_long += 1
        return None
    stats.truncated += 1
    return (ids[:n], labels[:n]) if cfg.truncation == "right" else (ids[-n:], labels[-n:])


def load_examples(path: str | Path, tok, cfg: SFTDataConfig, stats: Optional[SFTStats] = None) -> list[tuple]:
    """Every usable (ids, labels) of a file, in file order; bad records raise or are counted."""
    stats = stats if stats is not None else SFTStats()
    out = []
    for where, rec in read_records(path):
        stats.records += 1
        try:
            kind, content = to_messages(rec, cfg.system)
            ids, labels = (chat_example(tok, content, cfg.train_on_prompt) if kind == "chat"
                           else text_example(tok, *content, cfg.train_on_prompt))
        except (ValueError, EmberError) as e:
            if cfg.skip_bad_records:
                stats.bad_records += 1
                continue
            raise EmberError(f"{where}: {e}. HINT: fix the record, or pass --data.skip-bad-records") from None
        fitted = _fit(ids, labels, cfg, stats)
        if fitted is None:
            continue
        ids, labels = fitted
        if all(x == IGNORE for x in labels[1:]):  # the first label is never a target (it has no input)
            stats.all_masked += 1
            continue
        out.append((ids, labels))
    return out


def split_examples(examples: list, cfg: SFTDataConfig) -> tuple[list, list]:
    """(train, val) by a seeded choice of record indices (at least one of each when possible)."""
    n = len(examples)
    n_val = min(n - 1, max(1, round(n * cfg.val_fraction))) if cfg.val_fraction and n > 1 else 0
    val = set(np.random.default_rng(cfg.seed).choice(n, n_val, replace=False).tolist()) if n_val else set()
    return [e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val]


# ------------------------------------------------------------------------------------ batches
def pad_batch(examples: list[tuple], pad_id: int) -> dict:
    """Right-padded {"input_ids", "labels"} (B, T): inputs are ids[:-1], labels are labels[1:] (shifted)."""
    T = max(len(ids) for ids, _ in examples) - 1
    inputs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for b, (ids, lab) in enumerate(examples):
        n = len(ids) - 1
        inputs[b, :n] = torch.tensor(ids[:-1])
        labels[b, :n] = torch.tensor(lab[1:])
    return {"input_ids": inputs, "labels": labels}


def pack_rows(examples: list[tuple], pad_id: int, length: int) -> dict:
    """Examples concatenated into rows of `length` inputs: positions restart per example, attention is
    block-diagonal causal ("attn_mask" (B, 1, T, T) bool), labels never cross an example boundary."""
    rows, cur = [], []
    for ids, lab in examples:
        n = len(ids) - 1
        if cur and sum(len(i) - 1 for i, _ in cur) + n > length:
            rows.append(cur)
            cur = []
        cur.append((ids, lab))
    if cur:
        rows.append(cur)
    B = len(rows)
    inputs = torch.full((B, length), pad_id, dtype=torch.long)
    labels = torch.full((B, length), IGNORE, dtype=torch.long)
    positions = torch.zeros((B, length), dtype=torch.long)
    doc = torch.full((B, length), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for d, (ids, lab) in enumerate(row):
            n = len(ids) - 1
            inputs[b, at:at + n] = torch.tensor(ids[:-1])
            labels[b, at:at + n] = torch.tensor(lab[1:])
            positions[b, at:at + n] = torch.arange(n)
            doc[b, at:at + n] = d
            at += n
    same = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0)  # (B, T, T)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = same & causal
    mask |= torch.eye(length, dtype=torch.bool)  # padding rows attend to themselves (no NaN); their labels are -100
    return {"input_ids": inputs, "labels": labels, "positions": positions, "attn_mask": mask[:, None]}


class SFTLoader(ExampleLoader):
    """SFT batches: padded and length-grouped, or packed (see the module docstring)."""

    name = "SFT data"

    def __init__(self, examples: list[tuple], batch_size: int, pad_id: int, pack: bool = False,
                 max_length: int = 512, seed: int = 0, dp_rank: int = 0, dp_size: int = 1):
        super().__init__(examples, batch_size, pad_id, seed, dp_rank, dp_size)
        self.pack, self.max_length = pack, max_length

    def _batches(self, epoch: int) -> list[list[int]]:
        """Length-sorted groups (or, packed, enough examples to fill batch_size rows), shuffled."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.examples))
        g = self.global_batch
        if not self.pack:  # sort within windows of 32 batches so each batch holds similar lengths
            w = 32 * g
            order = np.concatenate([sorted(order[i:i + w], key=lambda j: len(self.examples[j][0]))
                                    for i in range(0, len(order), w)])
        per = g if not self.pack else g * max(1, self.max_length // max(
            1, int(np.mean([len(e[0]) for e in self.examples]))))
        batches = [order[i:i + per].tolist() for i in range(0, len(order) - per + 1, per)]
        rng.shuffle(batches)
        return batches

    def collate(self, chosen: list) -> dict:
        return pack_rows(chosen, self.pad_id, self.max_length - 1) if self.pack else pad_batch(chosen, self.pad_id)

    def eval_collate(self, chosen: list) -> dict:
        return pad_batch(chosen, self.pad_id)

    def _extra_state(self) -> dict:
        return {"pack": self.pack}
