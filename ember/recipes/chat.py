"""Chat with a checkpoint interactively, using its tokenizer's chat template.

    ember chat --checkpoint runs/sft/final --system "You are a helpful assistant."

Type a message and press Enter; the reply streams as it is generated. Commands:
    /exit           leave (Ctrl-D or Ctrl-C at the prompt do too)
    /reset          forget the conversation (the system prompt stays)
    /system TEXT    set the system prompt (empty TEXT removes it)
Ctrl-C during a reply ends that reply, not the session. The history is kept within the context
window: the oldest turns are dropped first; the system prompt is always kept.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import tyro

from ember.errors import EmberError
from ember.infer.generate import generate_iter
from ember.infer.sample import SamplingParams
from ember.infer.text import TextStream
from ember.log import log
from ember.recipes.sampling import SamplingFlags
from ember.tokenizer.chat import END_OF_TURN, NEW_TURN, end_of_turn_ids

HELP = "commands: /exit, /reset, /system TEXT  (Ctrl-C stops a reply, Ctrl-D exits)"


@dataclass
class Config(SamplingFlags):
    """Chat with a checkpoint interactively (the tokenizer's chat template, streamed replies)."""

    max_new_tokens: int = 256
    """Longest reply, in tokens."""
    temperature: float = 0.7
    """Softmax temperature; 0 = greedy."""
    top_p: float = 0.9
    """Nucleus sampling mass (1 = off)."""
    stop: tyro.conf.UseAppendAction[list[str]] = field(default_factory=list)
    """Extra stop strings (repeat the flag); end-of-turn tokens always stop a reply."""
    system: Optional[str] = None
    """System prompt for the conversation (change it with /system TEXT)."""


# --------------------------------------------------------------------------------- conversation
def encode_chat(tok: Any, messages: list[dict]) -> list[int]:
    return tok.encode_chat(messages, add_generation_prompt=True)


def fit_history(tok: Any, system: Optional[str], history: list[dict], budget: int) -> tuple[list[int], int]:
    """Prompt ids of system + history within `budget` tokens, dropping the oldest turns; (ids, turns dropped).

    Raises EmberError if even the last user message alone (with the system prompt) does not fit.
    """
    head = [{"role": "system", "content": system}] if system else []
    dropped = 0
    while True:
        ids = encode_chat(tok, head + history)
        if len(ids) <= budget:
            return ids, dropped
        if len(history) <= 1:
            raise EmberError(f"chat: the message is {len(ids)} tokens with the chat template, more than the "
                             f"{budget} the context window leaves. HINT: send a shorter message or a shorter /system.")
        cut = 2 if len(history) > 2 and history[1]["role"] == "assistant" else 1  # a user+assistant pair
        del history[:cut]
        dropped += cut


def stop_ids(tok: Any) -> list[int]:
    return end_of_turn_ids(tok)


def reply(model: torch.nn.Module, tok: Any, ids: list[int], cfg: Config, params: SamplingParams,
          generator: torch.Generator) -> str:
    """Stream one reply to stdout; Ctrl-C ends it early (the partial reply is kept)."""
    ends = stop_ids(tok)
    stream = TextStream(tok, [*cfg.stop, *END_OF_TURN, *NEW_TURN], skip_ids=ends)

    seen = {"n": 0, "last": None}

    def on_token(b: int, token: int) -> bool:
        seen["n"], seen["last"] = seen["n"] + 1, token
        _write(stream.push(token))
        return stream.stopped

    max_new = min(cfg.max_new_tokens, model.cfg.block_size - len(ids))
    try:
        for _ in generate_iter(model, [ids], max_new, params, stop_ids=ends, stop_fn=on_token,
                               generator=generator, vocab_limit=tok.vocab_size):
            pass
        _write(stream.flush())
        if seen["n"] >= max_new and not stream.stopped and seen["last"] not in ends:
            limit = ("--max-new-tokens" if max_new == cfg.max_new_tokens else "the context window")
            _write(f" [cut: {max_new} tokens, the limit of {limit}]")
    except KeyboardInterrupt:  # Ctrl-C mid-reply: keep what was said, stay in the session
        _write(stream.flush() + " [stopped]")
    _write("\n")
    return stream.text.strip()


def _write(text: str) -> None:
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def main(cfg: Config) -> int:
    params = cfg.sampling_params()
    model, tok = cfg.load("chat")
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    budget = model.cfg.block_size - min(cfg.max_new_tokens, model.cfg.block_size // 2)
    system, history = cfg.system, []
    log(f"ember chat: {cfg.checkpoint} ({model.cfg.block_size}-token context). {HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            sys.stdout.write("\n")
            return 0
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history.clear()
            log("(conversation cleared)", file=sys.stderr)
            continue
        if text == "/system" or text.startswith("/system "):
            system = text[len("/system"):].strip() or None
            log(f"(system prompt {'set' if system else 'removed'})", file=sys.stderr)
            continue
        if text.startswith("/"):
            log(f"unknown command {text.split()[0]!r}; {HELP}", file=sys.stderr)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": line})
        try:
            ids, dropped = fit_history(tok, system, history, budget)
        except EmberError as e:
            history.pop()
            log(f"error: {e}", file=sys.stderr)
            continue
        if dropped:
            log(f"(dropped the {dropped} oldest message(s) to fit the context window)", file=sys.stderr)
        history.append({"role": "assistant", "content": reply(model, tok, ids, cfg, params, generator)})
