"""Offline generation over the engine: `generate_iter` / `generate`, token ids in, token ids out.

`ember generate`, `ember chat`, the pretraining samples and GRPO's rollouts all call these; each
builds an `Engine` (infer/engine.py) sized for its prompts (a KV pool that holds exactly them, every
prompt in the running batch) and runs it to completion, so every way of generating in ember goes
through the one engine. With at most two prompts on CPU the engine lays the weights out for batch-1
decoding (infer/decode.py); generation here is not batch-invariant (the server's engine is, by
default), which lets long prompts prefill with one attention call per chunk.

Each prompt is its own request: it stops at an id in `stop_ids` (that id is yielded), when
`stop_fn(prompt_index, token)` returns True, or after max_new_tokens. Sampling draws from one
generator per prompt, seeded from `generator` in prompt order, so a seed reproduces a batch.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ember.errors import EmberError
from ember.infer.engine import Engine, EngineConfig, RequestParams
from ember.infer.sample import SamplingParams

BLOCK = 16


def check_fits(model: nn.Module, prompt_len: int, max_new_tokens: int) -> None:
    block = model.cfg.block_size
    if prompt_len + max_new_tokens > block:
        raise EmberError(
            f"generate: prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context window (block_size {block}). HINT: shorten the prompt, lower max_new_tokens, or "
            f"left-truncate with --truncate.")


def offline_engine(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   stop_ids: Sequence[int] = (), vocab_limit: Optional[int] = None,
                   speculative: Optional[str] = None) -> Engine:
    """An engine whose KV pool holds exactly these prompts and their new tokens, all running at once
    (plus room for speculative proposals)."""
    room = max_new_tokens + (BLOCK if speculative else 0)
    blocks = sum(math.ceil((len(p) + room) / BLOCK) for p in prompts)
    cfg = EngineConfig(block_size=BLOCK, num_blocks=max(2, blocks), max_num_seqs=max(1, len(prompts)),
                       max_num_batched_tokens=2048, batch_invariant=False, speculative=speculative)
    return Engine(model, cfg, eos_ids=stop_ids, vocab_limit=vocab_limit)


def _seeds(n: int, generator: Optional[torch.Generator]) -> list[Optional[int]]:
    if generator is None:
        return [None] * n
    return [int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device)) for _ in range(n)]


@torch.inference_mode()
def generate_iter(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  params: Optional[SamplingParams] = None, stop_ids: Sequence[int] = (),
                  stop_fn: Optional[Callable[[int, int], bool]] = None,
                  generator: Optional[torch.Generator] = None,
                  vocab_limit: Optional[int] = None,
                  speculative: Optional[str] = None) -> Iterator[list[Optional[int]]]:
    """Yield, per engine step, the new ids of each prompt (an empty list for prompts that produced none
    in that step: finished, or still prefilling). Without speculative decoding a step adds at most one
    id per prompt; with `speculative="ngram"` (prompt lookup; greedy only) a step may add several,
    and the result is the same as without."""
    params = (params or SamplingParams()).validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise EmberError("generate: every prompt needs at least one token. HINT: start from the BOS/EOS id.")
    if max_new_tokens <= 0:
        return
    check_fits(model, max(len(p) for p in prompts), max_new_tokens)
    was_training = model.training
    engine = offline_engine(model, prompts, max_new_tokens, stop_ids, vocab_limit, speculative=speculative)
    seeds = _seeds(len(prompts), generator)
    index = {}
    for b, (p, seed) in enumerate(zip(prompts, seeds)):
        rp = RequestParams(max_tokens=max_new_tokens, temperature=params.temperature, top_k=params.top_k,
                           top_p=params.top_p, min_p=params.min_p, repetition_penalty=params.repetition_penalty,
                           seed=seed)
        index[engine.add_request(p, rp, request_id=str(b)).id] = b
    try:
        while engine.has_unfinished():
            out: list[list[int]] = [[] for _ in prompts]
            for d in engine.step():
                b = index[d.request_id]
                for tok in d.token_ids:
                    out[b].append(tok)
                    if stop_fn is not None and stop_fn(b, tok):  # called for every new token
                        if not d.finished:
                            engine.abort(d.request_id, reason="stop")
                        break
            if any(out):
                yield out
    finally:
        for rid in index:
            engine.abort(rid)
        model.train(was_training)


def generate(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             params: Optional[SamplingParams] = None, stop_ids: Sequence[int] = (),
             stop_fn: Optional[Callable[[int, int], bool]] = None, generator: Optional[torch.Generator] = None,
             stream: Optional[Callable[[list[list[int]]], None]] = None,
             vocab_limit: Optional[int] = None, speculative: Optional[str] = None) -> list[list[int]]:
    """New token ids per prompt (a stop id, when hit, is the last id). `stream(step_tokens)` sees each step."""
    out: list[list[int]] = [[] for _ in prompts]
    for step_tokens in generate_iter(model, prompts, max_new_tokens, params, stop_ids, stop_fn, generator,
                                     vocab_limit, speculative):
        if stream is not None:
            stream(step_tokens)
        for b, toks in enumerate(step_tokens):
            out[b].extend(toks)
    return out
