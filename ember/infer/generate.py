"""The inference ladder over token ids: `prefill` -> `decode_one` -> `generate_iter` -> `generate`.

A static, preallocated KV cache (models/kv_cache.setup_caches) holds prompt + new tokens, so every
compiled decode step has the same shapes (eager steps attend over the filled slots only). Prompts of
different lengths are LEFT-padded into one batch:

    slot:      0    1    2    3    4  | 5 ...          (P = pad, t = prompt token, n = new token)
    sample 0:  P    P    t    t    t  | n n n
    sample 1:  t    t    t    t    t  | n n n
    position:  sample 0 starts at 0 on slot 2; sample 1 on slot 0   (`positions` (B, T))
    attn_mask: (B, 1, T, S) hides pad slots from real queries       (pad queries see themselves:
                                                                    no all-masked rows, so no NaN)

Each sample stops on its own (a stop id, or `stop_fn` returning True); the batch stops when all
have. Everything here sees token ids only; text (tokenizer, stop strings) lives in infer/api.py.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ember.errors import EmberError
from ember.infer.sample import SamplingParams, sample, seen_mask, update_seen
from ember.models.kv_cache import clear_caches, setup_caches
from ember.infer.decode import decode_linear, fused_views, pack_for_decode, unpack


# ------------------------------------------------------------------------------ one forward each
def logits_of(h: torch.Tensor, head: Optional[nn.Module]) -> torch.Tensor:
    """Hidden states (B, C) -> logits (B, V) (identity for a model without a head: pipeline stages)."""
    return decode_linear(head, h) if head is not None else h


def decode_step(model: nn.Module, tokens: torch.Tensor, input_pos: torch.Tensor, positions: Optional[torch.Tensor],
                attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """tokens (B, T) written at cache slots input_pos (T,) -> logits (B, V) of the last position.

    Runs `hidden_states` and applies the head (a large share of the FLOPs for a big vocab) to the
    last position only. All arguments positional: the form `compiled_decode_step` compiles.
    """
    # eagerly, slots after the last one written are empty: attend over the filled ones only (compiled
    # steps keep the static length, so one graph serves every step)
    kv_len = None if torch.compiler.is_compiling() else int(input_pos.max()) + 1
    h = model.hidden_states(tokens, input_pos=input_pos, positions=positions, attn_mask=attn_mask,
                            kv_len=kv_len)[:, -1]  # (B, C)
    return logits_of(h, model.output)


def prefill(model: nn.Module, tokens: torch.Tensor, input_pos: torch.Tensor,
            positions: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run the prompt (B, T) through the model, filling cache slots input_pos (T,); logits (B, V) of the last position."""
    return decode_step(model, tokens, input_pos, positions, attn_mask)


def decode_one(model: nn.Module, token: torch.Tensor, input_pos: torch.Tensor,
               positions: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One step: token (B, 1) at cache slot input_pos (1,) -> logits (B, V)."""
    return decode_step(model, token, input_pos, positions, attn_mask)


PACK_MAX_BATCH = 2  # batches up to this size decode with the packed layout (see generate_iter)


_compiled_step: Optional[Callable] = None


def compiled_decode_step() -> Callable:
    """`decode_step` under torch.compile (one shared compiled function; recompiles per shape)."""
    global _compiled_step
    if _compiled_step is None:
        _compiled_step = torch.compile(decode_step, dynamic=False)
    return _compiled_step


# ------------------------------------------------------------------------------- batch layout
class Batch:
    """Left-padded prompts and the fixed tensors every step reuses (built once, sliced per step).

    tokens (B, T); pad (B,) pad count per row; slots (S,) = 0..S-1; positions (B, S) position id
    of every slot (0 at each row's first real token; pads clamped to 0); prefill_mask (B, 1, T, S)
    and decode_mask (B, 1, 1, S), or None when no row is padded.
    """

    def __init__(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, device: torch.device, pad_id: int = 0):
        lens = [len(p) for p in prompts]
        self.B, self.T = len(prompts), max(lens)
        self.S = self.T + max_new_tokens
        self.pad = torch.tensor([self.T - n for n in lens], device=device)  # (B,)
        self.tokens = torch.full((self.B, self.T), pad_id, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            self.tokens[b, self.T - len(p):] = torch.as_tensor(list(p), dtype=torch.long, device=device)
        self.slots = torch.arange(self.S, device=device)  # (S,)
        self.padded = bool((self.pad > 0).any())
        self.positions = (self.slots.view(1, -1) - self.pad.view(-1, 1)).clamp(min=0)  # (B, S)
        self.valid = self.slots.view(1, -1) >= self.pad.view(-1, 1)  # (B, S) real (non-pad) slots
        self.prefill_mask = self.decode_mask = None
        if self.padded:
            pad_query = ~self.valid[:, : self.T]  # (B, T)
            self.prefill_mask = (self.valid.view(self.B, 1, 1, self.S)
                                 | pad_query.view(self.B, 1, self.T, 1))  # (B, 1, T, S)
            self.decode_mask = self.valid.view(self.B, 1, 1, self.S)  # (B, 1, 1, S)

    def step_args(self, slot: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(input_pos (1,), positions (B, 1) or None) for the token written at cache slot `slot`."""
        input_pos = self.slots[slot: slot + 1]
        return input_pos, (self.positions[:, slot: slot + 1] if self.padded else None)


# ---------------------------------------------------------------------------------- generation
def check_fits(model: nn.Module, prompt_len: int, max_new_tokens: int) -> None:
    block = model.cfg.block_size
    if prompt_len + max_new_tokens > block:
        raise EmberError(
            f"generate: prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context window (block_size {block}). HINT: shorten the prompt, lower max_new_tokens, or "
            f"left-truncate with --truncate.")


def _record(tokens: list[int], done: list[bool], stop_set: set[int],
            stop_fn: Optional[Callable[[int, int], bool]]) -> list[Optional[int]]:
    """This step's token per sample (None if it had finished before); marks samples that finish now."""
    out: list[Optional[int]] = []
    for b, tok in enumerate(tokens):
        out.append(None if done[b] else tok)
        if not done[b]:
            stopped_by_fn = stop_fn is not None and stop_fn(b, tok)  # called for every new token
            done[b] = tok in stop_set or stopped_by_fn
    return out


@torch.inference_mode()
def generate_iter(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  params: Optional[SamplingParams] = None, stop_ids: Sequence[int] = (),
                  stop_fn: Optional[Callable[[int, int], bool]] = None,
                  generator: Optional[torch.Generator] = None, pad_id: int = 0,
                  compile: bool = False, vocab_limit: Optional[int] = None,
                  pack: bool = True) -> Iterator[list[Optional[int]]]:
    """Yield, per step, one new token id per sample (None for samples already finished).

    A sample finishes after emitting a token in `stop_ids` (that token is yielded) or when
    `stop_fn(sample_index, token)` returns True; the loop ends when every sample has finished or
    after max_new_tokens steps. Ids >= `vocab_limit` (rows of a padded embedding that the tokenizer
    does not know) are never sampled. The KV cache is set up here and removed at the end; the model
    runs through `hidden_states` and the head is applied to the last position only.
    On CPU, `pack` (the default) first lays the weights out for decoding, in place
    (infer/decode.pack_for_decode; no extra memory; the model stays usable and trainable) when the
    batch has at most PACK_MAX_BATCH rows, and back to PyTorch's row-major layout for larger batches,
    where the column-major head is slower (bench/decode.py measures both).
    """
    params = (params or SamplingParams()).validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise EmberError("generate: every prompt needs at least one token. HINT: start from the BOS/EOS id.")
    if max_new_tokens <= 0:
        return
    device = next(model.parameters()).device
    batch = Batch(prompts, max_new_tokens, device, pad_id)
    check_fits(model, batch.T, max_new_tokens)
    stop_set = set(int(s) for s in stop_ids)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = seen_mask(batch.tokens, model.cfg.vocab_size, batch.valid[:, : batch.T])
    done = [False] * batch.B
    step = compiled_decode_step() if compile else decode_step
    if pack and device.type == "cpu":  # in place; switching layouts costs ~0.3 s for GPT-2, so once per batch size
        if batch.B <= PACK_MAX_BATCH:
            pack_for_decode(model)
        else:
            unpack(model)
    setup_caches(model, batch.B, batch.S)
    try:
        # packed groups' views looked up once for the whole generation (compiled steps trace the lookup)
        with fused_views(model) if not compile else contextlib.nullcontext():
            logits = prefill(model, batch.tokens, batch.slots[: batch.T],
                             batch.positions[:, : batch.T] if batch.padded else None, batch.prefill_mask)
            for i in range(max_new_tokens):
                if vocab_limit is not None and vocab_limit < logits.shape[-1]:
                    logits[:, vocab_limit:] = float("-inf")
                nxt = sample(logits, params, seen, generator)  # (B,)
                yield _record(nxt.tolist(), done, stop_set, stop_fn)
                if all(done) or i == max_new_tokens - 1:
                    break
                if seen is not None:
                    update_seen(seen, nxt)
                input_pos, positions = batch.step_args(batch.T + i)
                logits = step(model, nxt.view(-1, 1), input_pos, positions, batch.decode_mask)
    finally:
        clear_caches(model)


def generate(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             params: Optional[SamplingParams] = None, stop_ids: Sequence[int] = (),
             stop_fn: Optional[Callable[[int, int], bool]] = None, generator: Optional[torch.Generator] = None,
             stream: Optional[Callable[[list[Optional[int]]], None]] = None, pad_id: int = 0,
             compile: bool = False, vocab_limit: Optional[int] = None, pack: bool = True) -> list[list[int]]:
    """New token ids per prompt (a stop id, when hit, is the last id). `stream(step_tokens)` sees each step."""
    out: list[list[int]] = [[] for _ in prompts]
    for step_tokens in generate_iter(model, prompts, max_new_tokens, params, stop_ids, stop_fn,
                                     generator, pad_id, compile, vocab_limit, pack):
        if stream is not None:
            stream(step_tokens)
        for b, tok in enumerate(step_tokens):
            if tok is not None:
                out[b].append(tok)
    return out
