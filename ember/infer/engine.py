"""The serving engine: token ids in, token ids out, over a paged KV cache with continuous batching.

    add_request(prompt_ids, RequestParams) ─▶ waiting ─▶ scheduler ─▶ one forward for the whole step ─▶ sample
                                                ▲           │  (decodes first, then prefill chunks,
                                                └─preempt───┘   within max_num_batched_tokens)

**Block pool.** The KV cache of every layer is one tensor of `num_blocks * block_size` slots; a
sequence owns a *block table* (a list of block ids), so slot `s` of position `p` is
`table[p // bs] * bs + p % bs`. Blocks are reference-counted: `n > 1` samples of one prompt share the
prompt's full blocks, and so do requests with a common prefix.

**Prefix caching.** A full block is named by the hash of (its parent's hash, its token ids), so a
name stands for the whole prefix. A new request looks its full blocks up and skips computing those;
`cached_tokens` counts them. A freed block keeps its name until it is reused (least recently freed
first), so a prompt sent again later still hits.

**Scheduling.** Each step runs the running sequences (one token each, or the next chunk of a long
prompt: chunked prefill) and then admits waiting ones while the token budget, `max_num_seqs` and the
free blocks allow. When a running sequence needs a block and none is free, the most recently admitted
sequence is preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed (prompt + what it had generated) when blocks free up.

**Batch invariance** (`batch_invariant=True`, the default): a sequence's tokens and logprobs do not
depend on what else is in the batch, on prefix-cache hits or on preemptions. Two things make it so on
CPU: the step's tokens are padded once to a row count that is a multiple of 4 (MKL then computes each
row of a product the same way whatever the other rows are, which `tests/test_infer_engine.py`
checks), or of more where a width needs it (`invariant_rows`: element-wise kernels must never reach
their scalar tail), products run over a fixed number of weight slices, and attention runs one query at a time over exactly the keys
it may see (so the result of a query is the same whether it came in a long prefill, a chunk, or a
decode step). `batch_invariant=False` runs each prompt chunk as one attention call and all decode
steps as one padded call, faster on long prompts, with last-bit differences between batchings.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ember.errors import EmberError
from ember.infer.decode import (PACK_MAX_SEQS, BlockDecoder, QuantBlockDecoder, decode_linear, pack_for_decode,
                                split_linear, unpack)
from ember.infer.sample import SamplingParams, apply_repetition_penalty, process_logits, sample_from_logits
from ember.infer.text import TextStream
from ember.models.layers import GeluMLP, SwiGLU, apply_rope, plain_linear
from ember.quant import set_rowwise

ROW_MULTIPLE = 4  # matrix products see a multiple of this many rows (see the module docstring)


def invariant_rows(widths: Iterable[int], threads: int) -> int:
    """The row-count multiple that keeps every op of a step batch-invariant on CPU.

    Matrix products need a multiple of 4 rows. Element-wise kernels with transcendental functions
    (SiLU's exp, GELU's tanh) run vectorized over the flattened tensor and finish its last
    (numel mod 32) elements, and each thread's chunk of a large tensor, with scalar code that rounds
    differently; so rows * width must be a multiple of 32 * threads for every width the step uses."""
    unit = 32 * max(1, threads)
    m = ROW_MULTIPLE
    for w in widths:
        m = math.lcm(m, unit // math.gcd(w, unit))
    return m


# ----------------------------------------------------------------------------------- settings
@dataclass
class EngineConfig:
    """How the engine holds and schedules work."""

    block_size: int = 16
    """Tokens per KV block."""
    kv_memory_mb: float = 512.0
    """KV cache size in MiB (all layers, keys and values); sets num_blocks unless given."""
    num_blocks: Optional[int] = None
    """KV blocks in the pool (overrides kv_memory_mb)."""
    max_num_seqs: int = 32
    """Sequences that run at once."""
    max_num_batched_tokens: int = 512
    """Token budget of one step (decodes + prefill chunks); longer prompts are prefilled in chunks."""
    prefix_caching: bool = True
    """Reuse the KV of full blocks whose prefix was computed before."""
    batch_invariant: bool = True
    """Outputs independent of batch composition, prefix hits and preemptions (see the module docstring)."""
    attention_tile: int = 0
    """Batch-invariant attention in tiles of this many query positions (a multiple of 4; 0: one query
    per call). Prompts then take one attention call per tile instead of one per token (several times
    faster prefill: what evaluation, which scores prompts, runs), and each decode step attends with
    four query rows instead of one (slower decoding at long contexts). Outputs differ in the last bits
    between settings, never between batchings under one setting."""
    speculative: Optional[str] = None
    """Speculative decoding: "ngram" (proposals looked up in the sequence itself: prompt lookup) or
    "draft" (greedy proposals from a smaller draft model); None = off. Greedy requests get exactly
    their plain output; sampled ones speculative sampling (the same distribution)."""
    num_speculative_tokens: int = 4
    """Tokens proposed per step and sequence."""
    ngram_max: int = 4
    """Longest suffix looked up by the n-gram proposer (it tries shorter ones down to ngram_min)."""
    ngram_min: int = 1
    pack: Optional[bool] = None
    """Lay the weights out for batch-1 decoding (infer/decode.py); None: when max_num_seqs <= 2 on CPU
    and not batch-invariant (the layout is slower for larger batches)."""

    def validate(self) -> "EngineConfig":
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise EmberError(f"engine: {name}={getattr(self, name)} must be >= 1.")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise EmberError(f"engine: num_blocks={self.num_blocks} must be >= 2.")
        if self.speculative not in (None, "ngram", "draft"):
            raise EmberError(f"engine: speculative={self.speculative!r} must be 'ngram', 'draft' or None.")
        if self.speculative and not (self.num_speculative_tokens >= 1 and 1 <= self.ngram_min <= self.ngram_max):
            raise EmberError("engine: num_speculative_tokens must be >= 1 and 1 <= ngram_min <= ngram_max.")
        if self.attention_tile < 0 or self.attention_tile % ROW_MULTIPLE:
            raise EmberError(f"engine: attention_tile={self.attention_tile} must be 0 or a multiple of {ROW_MULTIPLE}.")
        if self.num_blocks is None and self.kv_memory_mb <= 0:
            raise EmberError(f"engine: kv_memory_mb={self.kv_memory_mb} must be > 0.")
        return self


@dataclass
class RequestParams:
    """Per-request sampling and output options (OpenAI / vLLM semantics)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    n: int = 1
    stop: tuple[str, ...] = ()
    """Stop strings (need the engine's tokenizer); the text is cut before them."""
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    """Return the chosen token's logprob and this many top alternatives (0: the chosen one only)."""
    prompt_logprobs: Optional[int] = None
    """Also return logprobs of the prompt tokens (each given its prefix), with this many alternatives."""
    score_next: tuple[int, ...] = ()
    """Token ids whose log-probability right after the whole prompt is returned in
    `Request.next_logprobs` ({id: (logprob, is_argmax)}): evaluation scores the single-token choices
    of a question (" A" .. " D") from one request over their shared context."""
    prompt_logprobs_start: int = 1
    """The first prompt position whose logprob is returned (earlier ones stay None). Scoring a
    continuation after a shared context sets it to the context's length: the context's full blocks
    may then come from the prefix cache (evaluation scores every choice of a question this way)."""

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)

    def validate(self) -> "RequestParams":
        self.sampling().validate()
        checks = [
            (self.max_tokens >= 0, "max_tokens", "an integer >= 0"),
            (self.n >= 1, "n", "an integer >= 1"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "a number in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "a number in [-2, 2]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "an integer in [0, 20]"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs",
             "an integer in [0, 20]"),
            (self.prompt_logprobs_start >= 1, "prompt_logprobs_start", "an integer >= 1"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise EmberError(f"request: {name}={getattr(self, name)!r} is invalid, expected {expected}.")
        return self


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


# ---------------------------------------------------------------------------------- sequences
WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


class Sequence_:
    """One generated sample: prompt + output ids, its blocks and its sampling state."""

    def __init__(self, request: "Request", index: int, generator: Optional[torch.Generator],
                 stream: Optional[TextStream]):
        self.request, self.index = request, index
        self.ids: list[int] = list(request.prompt)
        self.n_prompt = len(request.prompt)
        self.blocks: list[int] = []
        self.n_computed = 0  # tokens whose KV is in the cache
        self.n_hashed = 0  # full blocks whose hash is registered
        self.hashes: list[int] = []  # hash of every full block so far
        self.status = WAITING
        self.finish_reason: Optional[str] = None
        self.generator = generator
        self.stream = stream
        self.text = ""
        self.logprobs: list[TokenLogprob] = []
        self.cached_tokens = 0
        self.draft_computed = 0  # tokens whose KV is in the draft model's cache
        self.arrival = next(_arrivals)

    @property
    def output(self) -> list[int]:
        return self.ids[self.n_prompt:]

    @property
    def finished(self) -> bool:
        return self.status == FINISHED


_arrivals = itertools.count()


class Request:
    """A prompt and its `n` sequences; `outputs` is filled in as the engine steps."""

    def __init__(self, request_id: str, prompt: Sequence[int], params: RequestParams):
        self.id, self.prompt, self.params = request_id, list(prompt), params
        self.seqs: list[Sequence_] = []
        self.prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None
        self.next_logprobs: Optional[dict[int, tuple[float, bool]]] = None
        self.arrived = time.perf_counter()
        self.first_token_at: Optional[float] = None
        self.cached_tokens = 0

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


@dataclass
class SeqDelta:
    """What one step added to one sequence."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finished: bool
    finish_reason: Optional[str]


# ----------------------------------------------------------------------------------- the pool
class BlockPool:
    """Fixed-size KV blocks with reference counts and a prefix cache of named (hashed) full blocks.

    A sequence grows into the block after its last one when that block is free, and a new sequence
    starts at the largest run of free blocks: most sequences then own consecutive blocks, and
    attention reads their keys and values as a view of the cache instead of gathering them."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref = [0] * num_blocks
        self.free: set[int] = set(range(num_blocks))  # never named, or name dropped
        self.cached: OrderedDict[int, None] = OrderedDict()  # ref 0 but named: reusable, evicted LRU
        self.by_hash: dict[int, int] = {}
        self.hash_of: dict[int, int] = {}
        self.hits = self.queries = 0

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def _run_start(self) -> int:
        """Where a new sequence starts: in the longest run of free (unnamed) blocks, at its first block
        when nothing precedes it, else at its middle (the sequence before it keeps room to grow)."""
        best, best_len, start, length = -1, 0, -1, 0
        for b in range(self.num_blocks):
            if b in self.free:
                if length == 0:
                    start = b
                length += 1
                if length > best_len:
                    best, best_len = start, length
            else:
                length = 0
        return best if best == 0 or best_len < 2 else best + best_len // 2

    def allocate(self, after: Optional[int] = None) -> int:
        """A block: the one after block `after` when it is free, else the start of the longest free run,
        else the least recently freed named block (its name is dropped)."""
        if after is not None and after + 1 in self.free:
            b = after + 1
            self.free.remove(b)
        elif self.free:
            b = self._run_start()
            self.free.remove(b)
        else:
            b, _ = self.cached.popitem(last=False)
            del self.by_hash[self.hash_of.pop(b)]
        self.ref[b] = 1
        return b

    def release(self, b: int) -> None:
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if b in self.hash_of:
                self.cached[b] = None
            else:
                self.free.add(b)

    def share(self, b: int) -> None:
        if self.ref[b] == 0:
            self.cached.pop(b)
        self.ref[b] += 1

    def lookup(self, h: int) -> Optional[int]:
        return self.by_hash.get(h)

    def name(self, b: int, h: int) -> None:
        if h in self.by_hash or b in self.hash_of:
            return  # the same prefix computed twice at once: keep the first name
        self.by_hash[h], self.hash_of[b] = b, h


def block_hash(parent: Optional[int], tokens: Sequence[int]) -> int:
    return hash((parent, tuple(tokens)))


# --------------------------------------------------------------------------------- the engine
class Engine:
    """Continuous batching over a paged KV cache. `step()` runs one forward and returns the deltas."""

    def __init__(self, model: nn.Module, config: Optional[EngineConfig] = None, tokenizer: Any = None,
                 eos_ids: Sequence[int] = (), vocab_limit: Optional[int] = None,
                 draft_model: Optional[nn.Module] = None):
        self.cfg = (config or EngineConfig()).validate()
        bs = self.cfg.block_size
        per_block = sum(kv_bytes_per_block(m, bs) for m in (model, draft_model) if m is not None)
        n = self.cfg.num_blocks or max(2, int(self.cfg.kv_memory_mb * 2 ** 20 // per_block))
        self.pool = BlockPool(n, bs)
        self.kv_bytes = n * per_block
        self.runner = ModelRunner(model, n, bs, self.cfg.batch_invariant, self.cfg.pack, self.cfg.max_num_seqs,
                                  self.cfg.attention_tile)
        self.model, self.device = model, self.runner.device
        self.draft: Optional[ModelRunner] = None
        if self.cfg.speculative == "draft":
            if draft_model is None:
                raise EmberError("engine: speculative='draft' needs a draft model. HINT: ember serve --draft-checkpoint DIR.")
            if draft_model.cfg.vocab_size < model.cfg.vocab_size and vocab_limit is None and tokenizer is None:
                raise EmberError("engine: the draft model's vocabulary is smaller than the model's.")
            self.draft = ModelRunner(draft_model, n, bs, self.cfg.batch_invariant, False, self.cfg.max_num_seqs,
                                     self.cfg.attention_tile)
        elif draft_model is not None:
            raise EmberError("engine: a draft model was given but speculative is not 'draft'.")
        self.tokenizer = tokenizer
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.vocab_limit = vocab_limit if vocab_limit is not None else (
            tokenizer.vocab_size if tokenizer is not None else None)
        self.waiting: deque[Sequence_] = deque()
        self.running: list[Sequence_] = []
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.stats = {"steps": 0, "prompt_tokens": 0, "generated_tokens": 0, "cached_tokens": 0,
                      "preemptions": 0, "spec_proposed": 0, "spec_accepted": 0}

    # ------------------------------------------------------------------------------ requests
    @property
    def max_model_len(self) -> int:
        return self.model.cfg.block_size

    def add_request(self, prompt: Sequence[int], params: Optional[RequestParams] = None,
                    request_id: Optional[str] = None) -> Request:
        """Queue a prompt; its `n` sequences start when the scheduler admits them."""
        params = (params or RequestParams()).validate()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise EmberError("request: the prompt has no tokens. HINT: start from the BOS/EOS id.")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise EmberError(f"request: token id {bad[0]} is outside the vocabulary (0..{vocab - 1}).")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise EmberError(f"request: prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"the model's context of {self.max_model_len} tokens. HINT: shorten the prompt or "
                             "lower max_tokens.")
        if len(prompt) + params.max_tokens > self.pool.num_blocks * self.pool.block_size:
            raise EmberError(f"request: {len(prompt) + params.max_tokens} tokens cannot fit the KV pool "
                             f"({self.pool.num_blocks} blocks of {self.pool.block_size}). HINT: raise kv_memory_mb.")
        if params.stop and self.tokenizer is None:
            raise EmberError("request: stop strings need the engine to have a tokenizer.")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise EmberError(f"request: id {rid!r} is already in use.")
        req = Request(rid, prompt, params)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None] * len(prompt)
        for i in range(params.n):
            gen = None
            if params.temperature > 0:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(params.seed + i if params.seed is not None else torch.seed())
            stream = None
            if self.tokenizer is not None:
                stream = TextStream(self.tokenizer, params.stop, skip_ids=self.eos_ids)
            req.seqs.append(Sequence_(req, i, gen, stream))
        self.requests[rid] = req
        vocab_ok = self.vocab_limit if self.vocab_limit is not None else vocab
        bad = [t for t in params.score_next if not 0 <= int(t) < vocab_ok]
        if bad:
            raise EmberError(f"request: score_next id {bad[0]} is outside the vocabulary (0..{vocab_ok - 1}).")
        if params.max_tokens == 0 and params.prompt_logprobs is None and not params.score_next:
            for s in req.seqs:
                self._finish(s, "length")
            return req
        # one sequence prefills the prompt; the other n-1 fork from it (sharing its blocks) when it ends
        self.waiting.append(req.seqs[0])
        return req

    def abort(self, request_id: str, index: Optional[int] = None, reason: str = "abort") -> None:
        """Cancel a request (or its sequence `index`): it finishes with `reason` and frees its blocks now."""
        req = self.requests.get(request_id)
        if req is None:
            return
        for s in req.seqs:
            if not s.finished and (index is None or s.index == index):
                if s in self.waiting:
                    self.waiting.remove(s)
                self._finish(s, reason)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def release(self, request_id: str) -> None:
        """Forget a finished request (its outputs were read)."""
        req = self.requests.get(request_id)
        if req is not None and req.finished:
            del self.requests[request_id]

    # ----------------------------------------------------------------------------- blocks
    def _blocks_needed(self, s: Sequence_, n_new: int) -> int:
        return max(0, math.ceil((s.n_computed + n_new) / self.pool.block_size) - len(s.blocks))

    def _free_blocks(self, s: Sequence_) -> None:
        for b in s.blocks:
            self.pool.release(b)
        s.blocks, s.n_computed, s.n_hashed, s.hashes, s.draft_computed = [], 0, 0, [], 0

    def _finish(self, s: Sequence_, reason: str) -> None:
        s.status, s.finish_reason = FINISHED, reason
        if s in self.running:
            self.running.remove(s)
        self._free_blocks(s)

    def _preempt(self, s: Sequence_) -> None:
        self.running.remove(s)
        self._free_blocks(s)
        s.status = WAITING
        self.waiting.appendleft(s)
        self.stats["preemptions"] += 1

    def _match_prefix(self, s: Sequence_) -> None:
        """Take the cached blocks of s's longest named prefix (always leaving one token to compute)."""
        bs, parent = self.pool.block_size, None
        n_full = (len(s.ids) - 1) // bs  # the last token is always computed (its logits are needed)
        if s.request.prompt_logprobs is not None:  # scored positions need their logits computed
            n_full = min(n_full, (s.request.params.prompt_logprobs_start - 1) // bs)
        for i in range(n_full):
            h = block_hash(parent, s.ids[i * bs:(i + 1) * bs])
            self.pool.queries += 1
            b = self.pool.lookup(h)
            if b is None:
                break
            self.pool.hits += 1
            self.pool.share(b)
            s.blocks.append(b)
            s.hashes.append(h)
            parent = h
        s.n_computed = s.n_hashed = len(s.blocks)
        s.n_computed *= bs
        s.cached_tokens = s.n_computed

    def _name_full_blocks(self, s: Sequence_) -> None:
        bs = self.pool.block_size
        while (s.n_hashed + 1) * bs <= s.n_computed:
            i = s.n_hashed
            h = block_hash(s.hashes[-1] if s.hashes else None, s.ids[i * bs:(i + 1) * bs])
            s.hashes.append(h)
            if self.cfg.prefix_caching:
                self.pool.name(s.blocks[i], h)
            s.n_hashed += 1

    # ---------------------------------------------------------------------------- schedule
    def _schedule(self) -> list[tuple[Sequence_, int]]:
        budget = self.cfg.max_num_batched_tokens
        plan: list[tuple[Sequence_, int]] = []
        preempted = False
        for s in list(self.running):
            if s not in self.running:
                continue  # preempted below to make room for an earlier one
            n = min(len(s.ids) - s.n_computed, budget)
            if n <= 0:
                continue
            while self._blocks_needed(s, n) > self.pool.num_free:
                victim = max((r for r in self.running if r not in (q for q, _ in plan)),
                             key=lambda r: r.arrival, default=None)
                if victim is None:
                    break
                self._preempt(victim)
                preempted = True
                if victim is s:
                    break
            if s not in self.running or self._blocks_needed(s, n) > self.pool.num_free:
                continue
            self._grow(s, n)
            plan.append((s, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs and not preempted:
            s = self.waiting[0]
            if s.n_computed == 0 and not s.blocks and self.cfg.prefix_caching:
                self._match_prefix(s)
            n = min(len(s.ids) - s.n_computed, budget)
            if self._blocks_needed(s, n) > self.pool.num_free:
                self._free_blocks(s)  # give back the prefix it matched; it matches again when admitted
                s.cached_tokens = 0
                if not self.running and not plan:
                    raise EmberError("engine: the KV pool is too small for one sequence. HINT: raise kv_memory_mb.")
                break
            self.waiting.popleft()
            s.status = RUNNING
            self.running.append(s)
            self._grow(s, n)
            plan.append((s, n))
            budget -= n
        return plan

    def _grow(self, s: Sequence_, n: int) -> None:
        for _ in range(self._blocks_needed(s, n)):
            s.blocks.append(self.pool.allocate(s.blocks[-1] if s.blocks else None))

    # --------------------------------------------------------------------------------- step
    @torch.inference_mode()
    def step(self) -> list[SeqDelta]:
        """Schedule, run one forward over every scheduled token, sample; return what changed."""
        plan = self._schedule()
        if not plan:
            return []
        self.stats["steps"] += 1
        drafts = self._propose(plan) if self.cfg.speculative else {}
        tokens, positions, slots, segments = [], [], [], []
        logit_rows: list[tuple[Sequence_, int, str, int]] = []  # (seq, row, "prompt" | "next" | "spec", i)
        for s, n in plan:
            extra = drafts.get(id(s), [])
            m = n + len(extra)
            start = len(tokens)
            pos = range(s.n_computed, s.n_computed + m)
            tokens.extend(s.ids[s.n_computed:s.n_computed + n])
            tokens.extend(extra)
            positions.extend(pos)
            slots.append(self.runner.slots(s, s.n_computed + m, s.n_computed))
            segments.append((start, m, s.n_computed + m, s))
            req = s.request
            if req.prompt_logprobs is not None and s.index == 0 and s.n_computed < s.n_prompt:
                first = req.params.prompt_logprobs_start
                for p in pos:  # the logits at position p score prompt token p + 1
                    if first <= p + 1 < s.n_prompt:
                        logit_rows.append((s, start + p - s.n_computed, "prompt", p + 1))
            if extra:
                logit_rows += [(s, start + i, "spec", i) for i in range(m)]
            elif s.n_computed + n == len(s.ids):
                logit_rows.append((s, start + n - 1, "next", 0))
        logits = self.runner.forward(tokens, positions, slots, segments, [r for _, r, _, _ in logit_rows])
        for s, n in plan:
            if s.n_computed < s.n_prompt:
                self.stats["prompt_tokens"] += min(n, s.n_prompt - s.n_computed)
            if id(s) not in drafts:
                s.n_computed += n
                self._name_full_blocks(s)
        deltas: dict[tuple[str, int], SeqDelta] = {}
        spec_rows: dict[int, list[torch.Tensor]] = {}
        for (s, _, kind, i), row in zip(logit_rows, logits):
            if kind == "prompt":
                self._record_prompt_logprob(s.request, i, row)
            elif kind == "next":
                self._sample(s, row, deltas)
            else:
                spec_rows.setdefault(id(s), []).append(row)
        for s, _ in plan:
            if id(s) in drafts:
                self._verify(s, drafts[id(s)], spec_rows[id(s)], deltas)
        return list(deltas.values())

    # ------------------------------------------------------------------------ speculation
    def _speculable(self, s: Sequence_, n: int) -> int:
        """How many tokens to propose for s this step (0: none)."""
        p = s.request.params
        if (n != 1 or s.n_computed != len(s.ids) - 1 or not s.output
                or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty):
            return 0
        k = min(self.cfg.num_speculative_tokens, p.max_tokens - len(s.output) - 1,
                self.max_model_len - len(s.ids) - 1)
        while k > 0 and self._blocks_needed(s, 1 + k) > self.pool.num_free:
            k -= 1
        return max(0, k)

    def _propose(self, plan: list[tuple[Sequence_, int]]) -> dict[int, list[int]]:
        """Proposed tokens per speculating sequence, blocks for them allocated. Each sequence's room is
        judged after the blocks the ones before it took, so proposals never outgrow the pool."""
        out: dict[int, list[int]] = {}
        want = []
        for s, n in plan:
            k = self._speculable(s, n)
            if k <= 0:
                continue
            if self.cfg.speculative == "ngram":
                d = ngram_proposal(s.ids, k, self.cfg.ngram_min, self.cfg.ngram_max)
                if d:
                    self._grow(s, 1 + len(d))
                    out[id(s)] = d
            else:
                self._grow(s, 1 + k)  # the draft writes its KV for the proposals too
                want.append((s, k))
        if want:
            out = self._draft_proposals(want)
        for d in out.values():
            self.stats["spec_proposed"] += len(d)
        return out

    def _draft_proposals(self, want: list[tuple[Sequence_, int]]) -> dict[int, list[int]]:
        """k greedy tokens per sequence from the draft model, all sequences batched in each draft step."""
        d: dict[int, list[int]] = {id(s): [] for s, _ in want}
        limit = min(self.vocab_limit or self.model.cfg.vocab_size, self.model.cfg.vocab_size)
        for _ in range(max(k for _, k in want)):
            act = [s for s, k in want if len(d[id(s)]) < k]
            tokens, positions, slots, segments, rows = [], [], [], [], []
            for s in act:
                seq = s.ids + d[id(s)]
                a, b = s.draft_computed, len(seq)
                start = len(tokens)
                tokens.extend(seq[a:b])
                positions.extend(range(a, b))
                slots.append(self.draft.slots(s, b, a))
                segments.append((start, b - a, b, s))
                rows.append(start + b - a - 1)
            logits = self.draft.forward(tokens, positions, slots, segments, rows)
            for s, row in zip(act, logits):
                s.draft_computed = len(s.ids) + len(d[id(s)])
                d[id(s)].append(int(row[:limit].argmax()))
        return d

    def _verify(self, s: Sequence_, proposal: list[int], rows: list[torch.Tensor], deltas: dict) -> None:
        """Keep a prefix of the proposal, then one token of the model's own.

        Greedy requests keep the longest prefix the model's argmax agrees with, then its argmax: exactly
        plain greedy decoding. Sampled requests use speculative sampling for a deterministic proposal
        (`speculative_accept`): each proposed token is kept with the model's probability of it, the
        first rejected one is replaced by a draw from the model's distribution without it, and after a
        fully kept proposal one more token is drawn; every token is then distributed as in plain sampling.
        """
        raws = [self._masked(r) for r in rows]
        sp = s.request.params.sampling()
        if sp.greedy:
            target = [int(x.argmax()) for x in raws]
            j = 0
            while j < len(proposal) and proposal[j] == target[j]:
                j += 1
            tokens = proposal[:j] + [target[j]]
        else:
            probs = [process_logits(x.view(1, -1), sp).softmax(-1).view(-1) for x in raws]
            tokens = speculative_accept(probs, proposal, s.generator)
            j = len(tokens) - 1
        self.stats["spec_accepted"] += j
        s.n_computed += 1 + j  # the KV of the last token and of the j kept ones is right
        s.draft_computed = min(s.draft_computed, s.n_computed)
        for i, tok in enumerate(tokens):
            if self._emit(s, tok, raws[i], deltas):
                return
        self._name_full_blocks(s)

    def _record_prompt_logprob(self, req: Request, p: int, row: torch.Tensor) -> None:
        lp = self._logprobs(row, req.prompt[p], req.params.prompt_logprobs)
        req.prompt_logprobs[p] = lp

    def _logprobs(self, row: torch.Tensor, token: int, top: Optional[int]) -> TokenLogprob:
        """Log-probabilities over the tokenizer's vocabulary (padded embedding rows excluded)."""
        row = row.float()
        if self.vocab_limit is not None and self.vocab_limit < row.shape[-1]:
            row = row[: self.vocab_limit]
        logp = torch.log_softmax(row, dim=-1)
        out = TokenLogprob(token, float(logp[token]))
        if top:
            v, i = torch.topk(logp, top)
            out.top = list(zip(i.tolist(), v.tolist()))
        return out

    def _sample(self, s: Sequence_, row: torch.Tensor, deltas: dict) -> None:
        req, p = s.request, s.request.params
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
            req.cached_tokens = s.cached_tokens
            self.stats["cached_tokens"] += s.cached_tokens
        if p.score_next and req.next_logprobs is None:  # the arithmetic of _logprobs, so equal to prompt logprobs
            x = row.float()
            if self.vocab_limit is not None and self.vocab_limit < x.shape[-1]:
                x = x[: self.vocab_limit]
            logp = torch.log_softmax(x, dim=-1)
            best = int(torch.topk(logp, 1)[1][0])
            req.next_logprobs = {int(t): (float(logp[t]), int(t) == best) for t in p.score_next}
        if p.max_tokens == 0:  # prompt logprobs only
            for t in req.seqs:
                self._finish(t, "length")
                deltas[(req.id, t.index)] = SeqDelta(req.id, t.index, [], "", [], True, "length")
            return
        targets = [s]
        if s.index == 0 and not s.output and len(req.seqs) > 1:
            targets += self._fork(s)  # the other n-1 samples draw their first token from the same logits
        for t in targets:
            self._sample_one(t, row, deltas)

    def _fork(self, parent: Sequence_) -> list[Sequence_]:
        """Start the request's other n-1 sequences from parent's computed prompt: full blocks shared,
        the partial last block copied. A child that finds no free block waits and prefills like a new
        request (hitting the prefix cache)."""
        bs, forked = self.pool.block_size, []
        full = parent.n_computed // bs
        for child in parent.request.seqs[1:]:
            if child.status != WAITING or child in self.waiting:
                continue
            if len(parent.blocks) - full > self.pool.num_free or len(self.running) >= self.cfg.max_num_seqs:
                self.waiting.append(child)
                continue
            for b in parent.blocks[:full]:
                self.pool.share(b)
            child.blocks = list(parent.blocks[:full])
            for b in parent.blocks[full:]:
                nb = self.pool.allocate(child.blocks[-1] if child.blocks else None)
                for r in (self.runner, self.draft):
                    if r is not None:
                        r.copy_block(b, nb)
                child.blocks.append(nb)
            child.n_computed, child.n_hashed, child.hashes = parent.n_computed, parent.n_hashed, list(parent.hashes)
            child.draft_computed = parent.draft_computed
            child.cached_tokens = parent.cached_tokens
            child.status = RUNNING
            self.running.append(child)
            forked.append(child)
        return forked

    def _masked(self, row: torch.Tensor) -> torch.Tensor:
        """fp32 logits with the ids the tokenizer does not know (padded embedding rows) at -inf."""
        x = row.float().clone()
        if self.vocab_limit is not None and self.vocab_limit < x.shape[-1]:
            x[self.vocab_limit:] = float("-inf")
        return x

    def _sample_one(self, s: Sequence_, row: torch.Tensor, deltas: dict) -> None:
        p = s.request.params
        raw = x = self._masked(row)
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            x = x.clone()
            if p.repetition_penalty != 1.0:
                seen = torch.zeros_like(x, dtype=torch.bool)
                seen[torch.tensor(s.ids, device=x.device)] = True
                x = apply_repetition_penalty(x.view(1, -1), seen.view(1, -1), p.repetition_penalty).view(-1)
            if (p.presence_penalty or p.frequency_penalty) and s.output:
                counts = torch.bincount(torch.tensor(s.output, device=x.device), minlength=x.shape[-1]).to(x.dtype)
                x = x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(x.dtype)
        sp = p.sampling()
        if sp.greedy:
            tok = int(x.argmax())
        else:
            tok = int(sample_from_logits(process_logits(x.view(1, -1), sp), s.generator)[0])
        self._emit(s, tok, raw, deltas)

    def _emit(self, s: Sequence_, tok: int, raw: torch.Tensor, deltas: dict) -> bool:
        """Append a chosen token (raw: its step's masked logits, for logprobs); True if s finished."""
        p = s.request.params
        s.ids.append(tok)
        lp = self._logprobs(raw, tok, p.logprobs) if p.logprobs is not None else None
        if lp is not None:
            s.logprobs.append(lp)
        self.stats["generated_tokens"] += 1
        text = s.stream.push(tok) if s.stream is not None else ""
        reason = None
        if (not p.ignore_eos and tok in self.eos_ids) or tok in p.stop_token_ids:
            reason = "stop"
        elif s.stream is not None and s.stream.stopped:
            reason = "stop"
        elif len(s.output) >= p.max_tokens or len(s.ids) >= self.max_model_len:
            reason = "length"
        if reason is not None:
            if s.stream is not None:
                text += s.stream.flush()
            self._finish(s, reason)
        s.text += text
        key = (s.request.id, s.index)
        d = deltas.get(key)
        if d is None:
            deltas[key] = SeqDelta(s.request.id, s.index, [tok], text, [lp] if lp else [], s.finished, reason)
        else:  # several tokens in one step (speculative decoding)
            d.token_ids.append(tok)
            d.text += text
            if lp:
                d.logprobs.append(lp)
            d.finished, d.finish_reason = s.finished, reason
        return s.finished


    # ------------------------------------------------------------------------------- batch use
    def generate(self, prompts: Sequence[Sequence[int]], params: RequestParams | Sequence[RequestParams],
                 progress: Optional[Callable[[int], None]] = None) -> list[Request]:
        """Run prompts to completion (offline batch); requests in prompt order."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        reqs = [self.add_request(p, rp) for p, rp in zip(prompts, plist)]
        while self.has_unfinished():
            out = self.step()
            if progress is not None:
                progress(sum(1 for d in out if d.finished))
        for r in reqs:
            self.release(r.id)
        return reqs

    def kv_usage(self) -> dict:
        """Blocks in use and the share of their slots that hold no token (internal fragmentation)."""
        used, bs = self.pool.num_used, self.pool.block_size
        # a slot holds a token once it is computed or being computed in this step (blocks are allocated
        # for the step's tokens before its forward runs)
        held = sum(min(len(s.ids), len(s.blocks) * bs) for s in self.running)
        slots = sum(len(s.blocks) for s in self.running) * bs
        return {"blocks_total": self.pool.num_blocks, "blocks_used": used,
                "waste": (1 - held / slots) if slots else 0.0}

    def spec_acceptance(self) -> Optional[float]:
        """Accepted / proposed speculative tokens so far (None before any proposal)."""
        p = self.stats["spec_proposed"]
        return self.stats["spec_accepted"] / p if p else None


# ------------------------------------------------------------------------------ the model runner
def kv_bytes_per_block(model: nn.Module, block_size: int) -> int:
    """Bytes one KV block takes for `model`: keys and values of every layer, in the weights' dtype."""
    c = model.cfg
    return 2 * c.n_layer * block_size * c.n_kv_head * c.head_dim * next(model.parameters()).element_size()


class ModelRunner:
    """One model and its paged KV cache: runs a step's flattened tokens (the engine has one for the
    model it serves and one for a draft model). Block ids and slots are the engine's, so a draft's
    cache is addressed through the same block tables as the target's."""

    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, invariant: bool,
                 pack: Optional[bool], max_num_seqs: int, tile: int = 0):
        mcfg = model.cfg
        if getattr(mcfg, "mask", "causal") != "causal" or getattr(model, "n_out", None) is not None:
            raise EmberError("engine: serves causal language models only (this checkpoint has "
                             f"mask={mcfg.mask!r}, head outputs {model.n_out}).")
        if model.tok_embeddings is None or model.output is None:
            raise EmberError("engine: the model must hold its embedding and head (not a pipeline stage).")
        self.model = model.eval()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.invariant, self.bs = invariant, block_size
        self.tile = tile if invariant else 0
        if pack is None:
            pack = p.device.type == "cpu" and not invariant and max_num_seqs <= PACK_MAX_SEQS
        if pack and invariant:
            raise EmberError("engine: pack=True is for batch-1 decoding; it cannot be batch-invariant. "
                             "HINT: set batch_invariant=False or leave pack unset.")
        set_rowwise(model, invariant)  # quantized linears: the row-independent kernels at every row count
        self.decoders: Optional[list] = None
        if pack:
            pack_for_decode(model)
            decoders = [BlockDecoder.build(b, max(2, torch.get_num_threads())) or QuantBlockDecoder.build(b)
                        for b in model.layers.values()]
            self.decoders = decoders if all(d is not None for d in decoders) else None
        else:
            unpack(model)  # row-major weights: the layout every batch size shares
        self.H, self.K, self.D = mcfg.n_head, mcfg.n_kv_head, mcfg.head_dim
        # weight slices per product, fixed for the runner's life (the arithmetic depends on it)
        self.parts = max(2, torch.get_num_threads()) if self.device.type == "cpu" else 0
        self.row_multiple = invariant_rows(
            (mcfg.n_embd, mcfg.ffn_hidden, self.H * self.D, self.K * self.D, model.output.out_features),
            torch.get_num_threads())
        slots = num_blocks * block_size
        # never read before written: a sequence attends over its own written slots only
        self.k_cache = [torch.empty(slots, self.K, self.D, dtype=self.dtype, device=self.device)
                        for _ in range(mcfg.n_layer)]
        self.v_cache = [torch.empty_like(k) for k in self.k_cache]

    def copy_block(self, src: int, dst: int) -> None:
        bs = self.bs
        for kc, vc in zip(self.k_cache, self.v_cache):
            kc[dst * bs:(dst + 1) * bs] = kc[src * bs:(src + 1) * bs]
            vc[dst * bs:(dst + 1) * bs] = vc[src * bs:(src + 1) * bs]

    def forward(self, tokens: list[int], positions: list[int], slots: list[int],
                 segments: list[tuple[int, int, int, Sequence_]], rows: list[int]) -> torch.Tensor:
        """Logits (len(rows), V) at the given rows of this step's flattened tokens."""
        model, dev = self.model, self.device
        N = len(tokens)
        if N == 1 and self.decoders is not None and not self.invariant:
            return self._forward_one(tokens[0], positions[0], int(slots[0][0]), segments[0][2], segments[0][3])
        Np = _round_up(N, self.row_multiple) if self.invariant else N
        tok = torch.zeros(1, Np, dtype=torch.long, device=dev)
        tok[0, :N] = torch.tensor(tokens, device=dev)
        pos = torch.zeros(1, Np, dtype=torch.long, device=dev)
        pos[0, :N] = torch.tensor(positions, device=dev)
        slot = torch.cat(slots)
        x = model.tok_embeddings(tok)
        if model.pos_embeddings is not None:
            x = x + model.pos_embeddings(pos)
        rope = model.rope[pos].unsqueeze(-2) if model.rope is not None else None  # (1, Np, 1, 2D)
        gathers = self._gathers(segments)
        for li, layer in enumerate(model.layers.values()):
            a = layer.attention
            h = layer.attention_norm(x)
            q = self._linear(a.wq, h).view(1, Np, -1, self.D)
            k = self._linear(a.wk, h).view(1, Np, -1, self.D)
            v = self._linear(a.wv, h).view(1, Np, -1, self.D)
            if a.rope:
                q, k = apply_rope(q, rope), apply_rope(k, rope)
            kc, vc = self.k_cache[li], self.v_cache[li]
            kc.index_copy_(0, slot, k[0, :N].to(kc.dtype))
            vc.index_copy_(0, slot, v[0, :N].to(vc.dtype))
            y = torch.zeros(Np, self.H * self.D, dtype=q.dtype, device=dev)
            self._attend(q[0], kc, vc, gathers, y)
            x = x + self._linear(a.wo, y.view(1, Np, -1))
            x = x + self._mlp(layer.feed_forward, layer.ffn_norm(x))
        x = model.norm(x)[0]
        if not rows:
            return x.new_zeros(0, model.output.out_features)
        idx = torch.tensor(rows, dtype=torch.long, device=dev)
        hr = x[idx]
        if self.invariant and len(rows) % self.row_multiple:
            hr = torch.cat([hr, hr.new_zeros(_round_up(len(rows), self.row_multiple) - len(rows), hr.shape[-1])])
        return self._linear(model.output, hr)[: len(rows)]

    def _forward_one(self, token: int, pos: int, slot: int, ctx: int, s: Sequence_) -> torch.Tensor:
        """One token of one sequence (ctx tokens of context, its own included) through the blocks'
        `BlockDecoder`s (packed weights): logits (1, V)."""
        model, dev = self.model, self.device
        src = self.source(s, ctx)
        x = model.tok_embeddings(torch.tensor([[token]], device=dev))
        if model.pos_embeddings is not None:
            x = x + model.pos_embeddings.weight[pos].view(1, 1, -1)
        rope = model.rope[pos] if model.rope is not None else None
        K, D = self.K, self.D
        for li, dec in enumerate(self.decoders):
            kc, vc = self.k_cache[li], self.v_cache[li]

            def kv(k: torch.Tensor, v: torch.Tensor, kc=kc, vc=vc) -> tuple[torch.Tensor, torch.Tensor]:
                kc[slot] = k.view(K, D)
                vc[slot] = v.view(K, D)
                return self.context(kc, src, ctx), self.context(vc, src, ctx)

            x = dec(x, rope, kv)
        return decode_linear(model.output, model.norm(x).view(1, -1))

    def _linear(self, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """m(x); a plain Linear on CPU as `split_linear` over a fixed number of weight slices (faster
        than one GEMM for few rows, and the same arithmetic for every row count that is a multiple of 4)."""
        if self.parts and plain_linear(m):
            return split_linear(x, m.weight, m.bias, parts=self.parts)
        return m(x)

    def _mlp(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if type(mlp) is SwiGLU:
            return self._linear(mlp.w2, F.silu(self._linear(mlp.w1, x)) * self._linear(mlp.w3, x))
        if type(mlp) is GeluMLP:
            return self._linear(mlp.w2, F.gelu(self._linear(mlp.w1, x), approximate="tanh"))
        return mlp(x)

    def slots(self, s: Sequence_, stop: int, start: int = 0) -> torch.Tensor:
        """Cache slots of s's positions start..stop-1 (stop - start,)."""
        bs = self.bs
        first = start // bs
        table = torch.tensor(s.blocks[first: (stop + bs - 1) // bs], device=self.device)
        flat = (table.view(-1, 1) * bs + torch.arange(bs, device=self.device)).view(-1)
        return flat[start - first * bs: stop - first * bs]

    def source(self, s: Sequence_, ctx: int):
        """Where s's first ctx keys and values lie: the first slot (an int) when its blocks are consecutive
        (attention then reads a view of the cache), else their slots (ctx,) to gather."""
        bs, b = self.bs, s.blocks
        nb = (ctx + bs - 1) // bs
        b0 = b[0]
        if b[nb - 1] - b0 == nb - 1 and all(b[i] == b0 + i for i in range(1, nb)):
            return b0 * bs
        return self.slots(s, ctx)

    def context(self, cache: torch.Tensor, src, ctx: int) -> torch.Tensor:
        """(1, K, ctx, D) keys or values of one sequence."""
        x = cache[src:src + ctx] if isinstance(src, int) else cache[src]
        return x.view(1, ctx, self.K, self.D).transpose(1, 2)

    def _gathers(self, segments: list) -> dict:
        """What attention reads, built once per step: per segment (start, n, ctx, source of its context);
        without batch invariance, the single-token segments whose blocks are not consecutive also as one
        padded batch: their rows, the (B, S) slots (padding reads slot 0) and the (B, 1, 1, S) mask."""
        out: dict = {"segments": [], "decode": None}
        decodes = []
        for start, n, ctx, s in segments:
            src = self.source(s, ctx)
            if n == 1 and not self.invariant and not isinstance(src, int):
                decodes.append((start, ctx, src))
            else:
                out["segments"].append((start, n, ctx, src))
        if len(decodes) == 1:
            out["segments"].append((decodes[0][0], 1, decodes[0][1], decodes[0][2]))
        elif decodes:
            S = max(c for _, c, _ in decodes)
            idx = torch.zeros(len(decodes), S, dtype=torch.long, device=self.device)
            mask = torch.zeros(len(decodes), 1, 1, S, dtype=torch.bool, device=self.device)
            for b, (_, ctx, slots) in enumerate(decodes):
                idx[b, :ctx], mask[b, ..., :ctx] = slots, True
            rows = torch.tensor([start for start, _, _ in decodes], device=self.device)
            out["decode"] = (rows, idx, mask)
        return out

    def _attend(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, gathers: dict, y: torch.Tensor) -> None:
        """Causal attention of each segment's queries q[start:start+n] (n, H, D) over its cached keys."""
        gqa = self.H != self.K
        if gathers["decode"] is not None:  # single-token queries over gathered keys: one padded call
            rows, idx, mask = gathers["decode"]
            B, S = idx.shape
            Kb = kc[idx].view(B, S, self.K, self.D).transpose(1, 2)  # (B, K, S, D)
            Vb = vc[idx].view(B, S, self.K, self.D).transpose(1, 2)
            o = F.scaled_dot_product_attention(q[rows].unsqueeze(2), Kb, Vb, attn_mask=mask, enable_gqa=gqa)
            y[rows] = o.reshape(B, -1)
        for start, n, ctx, src in gathers["segments"]:
            if self.tile:
                self._attend_tiled(q, kc, vc, src, start, n, ctx, y)
                continue
            K, V = self.context(kc, src, ctx), self.context(vc, src, ctx)  # (1, K, ctx, D)
            if n == 1 or self.invariant:
                first = ctx - n  # position of the first query
                for i in range(n):  # one query at a time, the same strides whatever n is
                    L = first + i + 1
                    qi = q[start + i].view(1, self.H, 1, self.D)
                    o = F.scaled_dot_product_attention(qi, K[:, :, :L], V[:, :, :L], enable_gqa=gqa)
                    y[start + i] = o.reshape(-1)
                continue
            qs = q[start:start + n].transpose(0, 1).unsqueeze(0)  # (1, H, n, D)
            qp = torch.arange(ctx - n, ctx, device=q.device).view(-1, 1)
            mask = (torch.arange(ctx, device=q.device).view(1, -1) <= qp).view(1, 1, n, ctx)
            o = F.scaled_dot_product_attention(qs, K, V, attn_mask=mask, enable_gqa=gqa)  # (1, H, n, D)
            y[start:start + n] = o[0].transpose(0, 1).reshape(n, -1)


    def _attend_tiled(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, src, start: int, n: int,
                      ctx: int, y: torch.Tensor) -> None:
        """Batch-invariant attention by tiles of T positions: the queries at positions [jT, jT + T) that
        this step computes attend in one call, over keys padded with zeros to (j + 1) T and masked
        causally, with the query rows padded to a multiple of 4 (at least 4). Every call that holds
        position p then sees the same key length, the same memory layout (a fresh zero-padded copy)
        and a row count >= 4, and the CPU kernel computes a row the same way for any row count >= 4
        (checked in tests/test_infer_engine.py), so p's output does not depend on which other
        positions of its tile came in the same call (a decode step, a prefill chunk, a prefix-cache
        hit that starts mid-tile)."""
        T, H, D, Kh = self.tile, self.H, self.D, self.K
        gqa = H != Kh
        first = ctx - n
        Lmax = ((ctx - 1) // T + 1) * T
        raw_k = kc[src:src + ctx] if isinstance(src, int) else kc[src]  # (ctx, Kh, D)
        raw_v = vc[src:src + ctx] if isinstance(src, int) else vc[src]
        kb, vb = raw_k.new_zeros(Lmax, Kh, D), raw_v.new_zeros(Lmax, Kh, D)
        kb[:ctx], vb[:ctx] = raw_k, raw_v
        keys = torch.arange(Lmax, device=q.device).view(1, -1)
        p = first
        while p < ctx:
            j = p // T
            hi = min((j + 1) * T, ctx)
            r, L = hi - p, (j + 1) * T
            M = max(ROW_MULTIPLE, _round_up(r, ROW_MULTIPLE))
            qt = q.new_zeros(M, H, D)
            qt[:r] = q[start + p - first: start + hi - first]
            pos = torch.zeros(M, 1, dtype=torch.long, device=q.device)  # padding rows see key 0 only
            pos[:r, 0] = torch.arange(p, hi, device=q.device)
            mask = (keys[:, :L] <= pos).view(1, 1, M, L)
            kt = kb[:L].unsqueeze(0).transpose(1, 2)  # (1, Kh, L, D): strides depend on L only
            vt = vb[:L].unsqueeze(0).transpose(1, 2)
            o = F.scaled_dot_product_attention(qt.transpose(0, 1).unsqueeze(0), kt, vt, attn_mask=mask,
                                               enable_gqa=gqa)  # (1, H, M, D)
            y[start + p - first: start + hi - first] = o[0, :, :r].transpose(0, 1).reshape(r, -1)
            p = hi


def speculative_accept(probs: list[torch.Tensor], proposal: list[int],
                       generator: Optional[torch.Generator]) -> list[int]:
    """Speculative sampling for a deterministic proposal (prompt lookup, a greedy draft): `probs[i]` is
    the model's distribution (V,) at proposal position i (one more than the proposal). Token i is kept
    with probability probs[i][d_i]; the first rejected one is replaced by a draw from probs[i] with d_i
    removed (renormalised), which makes each emitted token distributed exactly as probs[i]; a fully kept
    proposal is followed by a draw from the last distribution. Returns the tokens to emit."""
    out = []
    for i, d in enumerate(proposal):
        p = probs[i]
        u = float(torch.rand((), generator=generator, device=p.device))
        if u < float(p[d]):
            out.append(d)
            continue
        rest = p.clone()
        rest[d] = 0.0
        total = float(rest.sum())
        if total <= 0.0:  # all mass on d (cannot happen after a rejection, kept for rounding)
            out.append(d)
            return out
        out.append(int(torch.multinomial(rest / total, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(probs[len(proposal)], 1, generator=generator)))
    return out


def ngram_proposal(ids: Sequence[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Prompt lookup: the k tokens that followed the latest earlier occurrence of the sequence's last n
    tokens (the longest n in [n_min, n_max] that occurs), or [] when none does."""
    L = len(ids)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        tail = list(ids[L - n:])
        for i in range(L - n - 1, -1, -1):  # latest first; the tail itself (i = L - n) is skipped
            if ids[i] == tail[0] and list(ids[i:i + n]) == tail:
                return list(ids[i + n:i + n + k])
    return []


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m
