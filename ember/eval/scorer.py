"""The one scorer under every evaluation: log-likelihoods, rolling log-likelihoods and generations,
all computed by the inference engine (infer/engine.py) with batch invariance on.

Why the engine and not a padded forward: a score must not move with the batch size (padding bugs have
changed published MMLU numbers by 20 points), and the engine's batch-invariant mode makes every
logprob identical whatever else shares the step, whether the context came from the prefix cache, and
whether the request was preempted. The same engine answers `/v1/completions` with echo + logprobs, so
`ember evaluate`, the lm-eval adapter (eval/harness.py) and lm-eval's `local-completions` over
`ember serve` see the same numbers.

Prompts dominate scoring, so the engine runs its tiled batch-invariant attention (`attention_tile`,
one attention call per 32 prompt positions instead of one per token): the numbers are those of
every other batching under the same setting, bit for bit.

Sharing a context across choices: single-token continuations of one context (the letters " A" ..
" D" of an MMLU question) are read from one request over the context, which returns the next-token
log-probabilities of those ids (`RequestParams.score_next`). Longer continuations are requests of
their own, but the first one runs alone and the others are queued only once its prefill is done, so
they take the context's full KV blocks from the prefix cache and compute only the last partial block
and their own tokens.

Semantics follow lm-evaluation-harness: a pair (context, continuation) is scored as the sum of the
continuation tokens' log-probabilities given everything before them, `is_greedy` says whether each
continuation token was the argmax; an empty context is conditioned on the prefix token (BOS, else
EOS); trailing spaces of the context move to the continuation; a pair longer than the window is cut
from the left. The engine holds a scored sequence whole (its last token included), so the window is
`block_size - 1` tokens of input, one less than a padded forward would allow.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ember.errors import EmberError
from ember.infer.engine import Engine, EngineConfig, RequestParams

Progress = Optional[Callable[[int], None]]


@dataclass
class LL:
    """One scored continuation."""

    logprob: float
    is_greedy: bool
    n_tokens: int


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int, context_len: int = 1) -> list[tuple[list[int], list[int]]]:
    """Disjoint (context, predicted) windows covering `tokens` so that every token is predicted exactly
    once with up to max_len - 1 tokens before it: the first window is conditioned on `prefix`, each
    later one predicts max_len - context_len + 1 new tokens after context_len - 1 earlier tokens
    (context_len = 1: non-overlapping windows; larger: a sliding window with stride
    max_len - context_len + 1). Equal to lm-eval's get_rolling_token_windows + make_disjoint_window."""
    if not 1 <= context_len <= max_len:
        raise EmberError(f"rolling windows: context_len={context_len} must be in [1, max_len={max_len}].")
    out: list[tuple[list[int], list[int]]] = []
    n = len(tokens)
    if n == 0:
        return out
    pred_len = max_len - context_len + 1
    first = min(max_len, n)
    out.append(([prefix], list(tokens[:first])))
    done = first
    while done < n:
        k = min(n - done, pred_len)
        end = done + k
        window = list(tokens[max(0, end - max_len - 1):end - 1])  # the input the model sees
        out.append((window[:len(window) - (k - 1)], list(tokens[end - k:end])))
        done = end
    return out


class Scorer:
    """Scores and generations for evaluation, over one batch-invariant engine.

    batch_size: sequences the engine runs at once (scores do not depend on it)."""

    def __init__(self, model: nn.Module, tokenizer: Any, batch_size: int = 8, kv_memory_mb: float = 256.0,
                 max_num_batched_tokens: int = 1024, eos_ids: Sequence[int] = (), kv_block_size: int = 8,
                 attention_tile: int = 32):
        if batch_size < 1:
            raise EmberError(f"evaluate: batch_size={batch_size} must be >= 1.")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = batch_size
        self.block_size = model.cfg.block_size
        self.max_length = self.block_size - 1
        bos = getattr(tokenizer, "bos_id", None)
        eos = getattr(tokenizer, "eos_id", None)
        self.prefix_id = bos if bos is not None else eos
        if self.prefix_id is None:
            raise EmberError("evaluate: the tokenizer has neither a BOS nor an EOS token to condition an empty "
                             "context on. HINT: set bos_token or eos_token in the tokenizer's ember.json.")
        self.eos_ids = tuple(eos_ids) or ((eos,) if eos is not None else ())
        cfg = EngineConfig(block_size=kv_block_size, kv_memory_mb=kv_memory_mb, max_num_seqs=batch_size,
                           max_num_batched_tokens=max(max_num_batched_tokens, self.block_size),
                           prefix_caching=True, batch_invariant=True, attention_tile=attention_tile)
        self.engine = Engine(model, cfg, tokenizer=tokenizer, eos_ids=self.eos_ids)
        self._rid = 0

    # ------------------------------------------------------------------ tokenisation
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval makes them: trailing context spaces move to the
        continuation, the whole text is encoded once and split where the context's encoding ends (so
        a continuation is tokenised in its context); an empty context becomes the prefix token."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        if not context:
            return [self.prefix_id], self.encode(continuation)
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    # ------------------------------------------------------------------ running the engine
    def _next_id(self) -> str:
        self._rid += 1
        return f"eval-{self._rid}"

    def _run(self, jobs: list[tuple[list[int], RequestParams]], after: dict[int, int],
             progress: Progress) -> list:
        """Run jobs (prompt ids, params) to completion; a job j in `after` is queued only once job
        after[j] has finished (so it finds that job's blocks in the prefix cache). Requests in order."""
        eng = self.engine
        out: list = [None] * len(jobs)
        waiting_on: dict[int, list[int]] = {}
        for j, lead in after.items():
            waiting_on.setdefault(lead, []).append(j)
        ready = deque(j for j in range(len(jobs)) if j not in after)
        live: dict[str, int] = {}
        cap = 2 * self.batch_size  # requests handed to the engine at once (it admits batch_size)
        while ready or live:
            while ready and len(live) < cap:
                j = ready.popleft()
                ids, params = jobs[j]
                live[eng.add_request(ids, params, request_id=self._next_id()).id] = j
            done = 0
            for d in eng.step():
                if not d.finished:
                    continue
                req = eng.requests[d.request_id]
                if not req.finished:
                    continue
                j = live.pop(d.request_id)
                out[j] = req
                eng.release(d.request_id)
                done += 1
                for f in waiting_on.pop(j, []):
                    ready.appendleft(f)
            if progress is not None and done:
                progress(done)
        return out

    # ------------------------------------------------------------------ log-likelihoods
    def fit(self, ctx: list[int], cont: list[int]) -> tuple[list[int], int]:
        """(ids, index of the first continuation token) cut from the left to the window."""
        if not cont:
            raise EmberError("evaluate: a continuation has no tokens to score.")
        ids = (ctx + cont)[-self.block_size:]
        return ids, max(1, len(ids) - len(cont))

    @torch.inference_mode()
    def loglikelihood_tokens(self, pairs: Sequence[tuple[list[int], list[int]]], progress: Progress = None) -> list[LL]:
        """Sum of log p(continuation | context) and is_greedy for each (context ids, continuation ids).

        Single-token continuations of one context (the letters of a multiple-choice question) are read
        from one request over the context (`score_next`); longer ones are requests of their own that
        start after their context's first request is done, to find its KV blocks in the prefix cache.
        Both give the numbers a request per pair would (the same rows, the same arithmetic)."""
        fitted = [self.fit(list(c), list(x)) for c, x in pairs]
        keys = [(tuple(ids), start) for ids, start in fitted]
        unique: dict[tuple, int] = {}
        for k in keys:
            unique.setdefault(k, len(unique))
        jobs: list = []
        kind: list[tuple] = []  # per job: ("next", ctx ids) or ("span", ids, start)
        next_job: dict[tuple, int] = {}
        leaders: dict[tuple, int] = {}
        after: dict[int, int] = {}
        where: dict[tuple, tuple[int, Optional[int]]] = {}  # unique key -> (job, token for "next")
        bs = self.engine.pool.block_size
        for ids, start in unique:
            if len(ids) - start == 1 and start == len(ids) - 1:
                ctx = ids[:start]
                j = next_job.get(ctx)
                if j is None:
                    j = next_job[ctx] = len(jobs)
                    jobs.append([list(ctx), set()])
                    kind.append(("next",))
                jobs[j][1].add(ids[start])
                where[(ids, start)] = (j, ids[start])
                continue
            j = len(jobs)
            jobs.append((list(ids), RequestParams(max_tokens=0, prompt_logprobs=1, prompt_logprobs_start=start)))
            kind.append(("span", start))
            where[(ids, start)] = (j, None)
            shared = (start - 1) // bs  # full blocks before the first scored position
            if shared:
                key = ids[:shared * bs]
                if key in leaders:
                    after[j] = leaders[key]
                else:
                    leaders[key] = j
        for j, k in enumerate(kind):
            if k[0] == "next":
                ctx, toks = jobs[j]
                jobs[j] = (ctx, RequestParams(max_tokens=0, score_next=tuple(sorted(toks))))
        reqs = self._run(jobs, after, progress)
        results = {}
        for key, (j, tok) in where.items():
            req = reqs[j]
            if tok is not None:
                lp, greedy = req.next_logprobs[tok]
                results[key] = LL(lp, greedy, 1)
            else:
                lps = req.prompt_logprobs[kind[j][1]:]
                results[key] = LL(math.fsum(lp.logprob for lp in lps),
                                  all(lp.top and lp.top[0][0] == lp.token for lp in lps), len(lps))
        return [results[k] for k in keys]

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], progress: Progress = None) -> list[LL]:
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in pairs], progress)

    def rolling_tokens(self, docs: Sequence[list[int]], context_len: int = 1, progress: Progress = None) -> list[LL]:
        """The log-likelihood of each whole token sequence (every token predicted once, the first given
        the prefix token) over windows of max_length tokens; see `rolling_windows`."""
        pairs, owner = [], []
        for d, toks in enumerate(docs):
            for ctx, pred in rolling_windows(toks, self.prefix_id, self.max_length, context_len):
                pairs.append((ctx, pred))
                owner.append(d)
        lls = self.loglikelihood_tokens(pairs, progress)
        sums = [0.0] * len(docs)
        counts = [0] * len(docs)
        for d, ll in zip(owner, lls):
            sums[d] += ll.logprob
            counts[d] += ll.n_tokens
        return [LL(s, False, c) for s, c in zip(sums, counts)]

    def rolling(self, texts: Sequence[str], context_len: int = 1, progress: Progress = None) -> list[LL]:
        return self.rolling_tokens([self.encode(t) for t in texts], context_len, progress)

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, prompts: Sequence[list[int]], max_tokens: int, until: Sequence[str] = (),
                 temperature: float = 0.0, n: int = 1, seed: Optional[int] = None, top_p: float = 1.0,
                 progress: Progress = None) -> list[list[str]]:
        """n texts per prompt, each cut before the first stop string in `until` (or at EOS, or after
        max_tokens, or where the context ends). Prompts longer than the window keep their end."""
        jobs = []
        for i, p in enumerate(prompts):
            p = list(p)[-(self.block_size - 1):]
            room = min(max_tokens, self.block_size - len(p))
            rp = RequestParams(max_tokens=room, temperature=temperature, top_p=top_p, n=n,
                               seed=None if seed is None else seed + 1000003 * i, stop=tuple(until))
            jobs.append((p, rp))
        reqs = self._run(jobs, {}, progress)
        return [[s.text for s in r.seqs] for r in reqs]
