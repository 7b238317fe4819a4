"""`TokenLoader`: memory-mapped, rank-aware, seeded, resumable (inputs, targets) windows for pretraining.

Sampling scheme (T = block_size, B = batch_size, R = dp_size, r = dp_rank):

* Each split is a list of shards (memory-mapped, never read whole). A *window* is T + 1 consecutive
  tokens of one shard; inputs are its first T tokens and targets its last T (shifted by one).
  Windows may cross document boundaries (documents are separated by EOS), like nanoGPT.
* Epoch e draws a shift s_e in [0, T) and cuts every shard of n tokens into the non-overlapping
  windows starting at s_e, s_e + T, s_e + 2T, ... (as many as fit), so window boundaries move from
  epoch to epoch. All windows of all shards are shuffled by a permutation seeded with (seed, e).
* Rank r takes positions r, r + R, r + 2R, ... of that permutation, truncated to the same length on
  every rank: within an epoch the ranks' samples are disjoint and together cover all windows (but
  fewer than R left over).
* Each rank's stream is its epoch-0 list, then its epoch-1 list, ...; a batch is the next B windows of
  the stream (a batch may straddle an epoch boundary). The whole state is (epoch, position), so
  `state_dict()` / `load_state_dict()` continue exactly the same sequence.
* Shards are checked when first opened (`verify=True`: header digest, the manifest's sha256, every id
  below vocab_size); with `verify=False` each batch's ids are still checked against the vocabulary.
* `iter_eval(max_batches)` is fixed: shift 0, windows in file order, strided by rank, first
  `max_batches` batches; every call yields the same batches.
* `data_dir` may be a URL (`s3://...`, any fsspec URL): the manifest and tokenizer are read into a
  local cache, each shard is fetched (and checked against the manifest's sha256) when a batch first
  needs it; resume and rank-awareness are the same as for a local directory.

`MixtureLoader` draws each row from one of several datasets with given weights (`--data.mix`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ember.data import cache, remote, shards
from ember.errors import EmberError

STATE_VERSION = 1


class TokenLoader:
    """Batches of (inputs (B, T) int64, targets (B, T) int64) from a prepared data dir."""

    resumes_across_dp_sizes = True  # load_state_dict re-cuts a state saved with another dp_size

    def __init__(self, data_dir: str | Path, split: str, block_size: int, batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, verify: bool = True):
        if not 0 <= dp_rank < dp_size:
            raise EmberError(f"TokenLoader: dp_rank {dp_rank} not in [0, {dp_size}). HINT: check the parallel dims")
        if block_size < 1 or batch_size < 1:
            raise EmberError(f"TokenLoader: block_size {block_size} and batch_size {batch_size} must be >= 1")
        if remote.is_url(str(data_dir)):  # a dataset at a URL: read through the local cache, shards on first use
            data_dir = cache.cached_dataset(str(data_dir))
        self.data_dir, self.split = Path(data_dir), split
        self.block_size, self.batch_size = block_size, batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.manifest = shards.read_manifest(self.data_dir)
        self.vocab_size: int = self.manifest["vocab_size"]
        self.eos_id: int = self.manifest["eos_id"]
        self.tokenizer_dir = self.data_dir / self.manifest.get("tokenizer", "tokenizer")
        self.verify = verify
        self.files = shards.split_files(self.data_dir, split, self.manifest)
        self.lengths = np.array([int(e["tokens"]) for e in self.files], np.int64)
        self._shards: list[np.ndarray | None] = [None] * len(self.files)
        self.streaming = cache.source_of(self.data_dir) is not None
        if not self.streaming:  # local shards are all opened (and checked) now: bad data fails at the start
            for i in range(len(self.files)):
                self.shard(i)
        if self.lengths.sum() < block_size + 1 or self._windows_per_shard(0).sum() < dp_size:
            raise EmberError(f"{self.data_dir}: split '{split}' has {int(self.lengths.sum()):,} tokens, too few for "
                             f"{dp_size} rank(s) of windows of block_size + 1 = {block_size + 1}. HINT: lower "
                             "block_size, or prepare more data (or a larger --split.val-fraction for val)")
        self.epoch, self.pos = 0, 0
        self._order_epoch, self._order = -1, np.empty((0, 2), np.int64)

    def shard(self, i: int) -> np.ndarray:
        """Shard `i`, memory-mapped on first use (fetched into the cache first for a dataset at a URL)."""
        if self._shards[i] is None:
            self._shards[i] = self._open(self.files[i])
        return self._shards[i]

    def _open(self, entry: dict) -> np.memmap:
        """Memory-map one shard; with `verify` (the default) read it once to check checksums and ids."""
        cache.ensure_shard(self.data_dir, entry)
        tokens = shards.read_shard(self.data_dir / entry["file"], verify=self.verify, sha256=entry.get("sha256"))
        if len(tokens) != entry["tokens"]:
            raise EmberError(f"{self.data_dir / entry['file']}: {len(tokens)} tokens, manifest says "
                             f"{entry['tokens']}. {shards.HINT}")
        return tokens

    # ------------------------------------------------------------------ window bookkeeping
    def _windows_per_shard(self, shift: int) -> np.ndarray:
        return np.maximum(0, (self.lengths - shift - 1) // self.block_size)

    def _epoch_windows(self, epoch: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(shift, per-shard window counts, this rank's window ids for `epoch`, in order)."""
        rng = np.random.default_rng([self.seed, epoch])
        shift = int(rng.integers(self.block_size))
        counts = self._windows_per_shard(shift)
        if counts.sum() < self.dp_size:  # tiny split: fall back to the unshifted cut
            shift, counts = 0, self._windows_per_shard(0)
        perm = rng.permutation(int(counts.sum()))
        per_rank = len(perm) // self.dp_size
        return shift, counts, perm[self.dp_rank::self.dp_size][:per_rank]

    def _locate(self, window_ids: np.ndarray, counts: np.ndarray, shift: int) -> np.ndarray:
        """Window ids (N,) -> (N, 2) rows of (shard index, start offset)."""
        ends = np.cumsum(counts)
        shard = np.searchsorted(ends, window_ids, side="right")
        local = window_ids - (ends[shard] - counts[shard])
        return np.stack([shard, shift + local * self.block_size], axis=1).astype(np.int64)

    def _epoch_plan(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            shift, counts, ids = self._epoch_windows(epoch)
            self._order, self._order_epoch = self._locate(ids, counts, shift), epoch
        return self._order

    def _gather(self, places: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.block_size
        buf = np.stack([np.asarray(self.shard(s)[o:o + T + 1], dtype=np.int64) for s, o in places.tolist()])  # (B, T+1)
        if int(buf.max()) >= self.vocab_size:  # unverified shards: never let a bad id reach the embedding
            for (s, o), row in zip(places.tolist(), buf):
                shards.check_ids(row, self.vocab_size, self.data_dir / self.files[s]["file"], start=o)
        t = torch.from_numpy(buf)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()  # (B, T), (B, T)

    # ------------------------------------------------------------------ public API
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets), each (B, T) int64; targets[:, i] == inputs[:, i + 1]."""
        return self.take(self.batch_size)

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next `n` windows of this rank's stream as (inputs, targets), each (n, T)."""
        if n == 0:
            empty = torch.empty((0, self.block_size), dtype=torch.int64)
            return empty, empty.clone()
        parts, got = [], 0
        while got < n:
            plan = self._epoch_plan(self.epoch)
            take = plan[self.pos:self.pos + n - got]
            parts.append(take)
            got += len(take)
            self.pos += len(take)
            if self.pos >= len(plan):
                self.epoch, self.pos = self.epoch + 1, 0
        return self._gather(np.concatenate(parts))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Everything needed to continue the exact sequence (plus settings that must match)."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "pos": self.pos, "seed": self.seed,
                "split": self.split, "block_size": self.block_size, "batch_size": self.batch_size,
                "dp_rank": self.dp_rank, "dp_size": self.dp_size, "tokens": int(self.lengths.sum())}

    def load_state_dict(self, sd: dict) -> None:
        """Resume from `state_dict()`; the settings that define the sequence must be the same.

        A state saved with another dp_size continues the same global sample sequence: within an epoch the
        R ranks together have consumed the first pos x R windows of the permutation, so this rank starts at
        pos x R / R_new (keep batch_size x dp_size, the global batch, the same for identical batches; the
        batch that straddles an epoch end may differ, as each rank's epoch is cut to len // R windows)."""
        for key in ("seed", "split", "block_size", "tokens"):
            if key in sd and sd[key] != self.state_dict()[key]:
                raise EmberError(f"loader state: {key} is {sd[key]!r} in the checkpoint but {self.state_dict()[key]!r} "
                                 "now, so the sample sequence cannot be continued. HINT: resume with the same "
                                 "data dir and loader settings")
        epoch, pos = int(sd["epoch"]), int(sd["pos"])
        old_dp = int(sd.get("dp_size", self.dp_size))
        if old_dp != self.dp_size:
            consumed = pos * old_dp  # windows of this epoch's permutation taken by all ranks together
            if consumed % self.dp_size:
                raise EmberError(f"loader state: {consumed} windows of epoch {epoch} were consumed by {old_dp} "
                                 f"rank(s), which {self.dp_size} ranks cannot split evenly. HINT: resume with a "
                                 f"data-parallel size that divides {consumed} (keep batch_size x dp_size the same)")
            pos = consumed // self.dp_size
            if pos >= len(self._epoch_plan(epoch)):
                epoch, pos = epoch + 1, 0
        self.epoch, self.pos = epoch, pos

    def num_windows(self) -> int:
        """Windows this rank sees per epoch (epoch 0)."""
        return len(self._epoch_windows(0)[2])

    def iter_eval(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed, deterministic set of batches (same on every call; does not touch the train state)."""
        counts = self._windows_per_shard(0)
        total = int(counts.sum())
        ids = np.arange(total)[self.dp_rank::self.dp_size][: total // self.dp_size]
        places = self._locate(ids, counts, 0)
        for b, i in enumerate(range(0, len(places), self.batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield self._gather(places[i:i + self.batch_size])


# --------------------------------------------------------------------------- mixtures
def parse_mix(spec: str, flag: str = "--data.mix") -> list[tuple[str, float]]:
    """'DIR_OR_URL:WEIGHT,...' -> [(source, weight normalised to sum 1)]; a clear error for bad input."""
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        src, sep, w = part.rpartition(":")
        try:
            weight = float(w) if sep else float("nan")
        except ValueError:
            weight = float("nan")
        if not src or not weight > 0 or weight == float("inf"):
            raise EmberError(f"{flag} {spec!r}: '{part}' is not SOURCE:WEIGHT with a weight > 0. HINT: e.g. "
                             f"{flag} data/prepared/web:0.7,data/prepared/code:0.3")
        out.append((src, weight))
    if len(out) < 1:
        raise EmberError(f"{flag} {spec!r}: no sources. HINT: e.g. {flag} data/prepared/web:0.7,data/prepared/code:0.3")
    names = [s for s, _ in out]
    if len(set(names)) != len(names):
        raise EmberError(f"{flag} {spec!r}: a source is named twice. HINT: give each dataset once, with its total weight")
    total = sum(w for _, w in out)
    return [(s, w / total) for s, w in out]


class MixtureLoader:
    """Batches from several prepared datasets (the same tokenizer), each row drawn from dataset k with
    probability weights[k], as litgpt's and torchtitan's weighted dataset mixes.

    Each source is an ordinary `TokenLoader` (rank-aware, its own shuffled stream). Batch number n of
    rank r picks its rows' sources with a generator seeded (seed, n, r), then takes that many windows
    from each source's stream, so the sequence is deterministic and the state is (n, every source's
    state): `load_state_dict` continues it exactly. The sources' row counts differ by rank, so a
    state is tied to its data-parallel size (a resume on another size restarts the data order)."""

    resumes_across_dp_sizes = False

    def __init__(self, sources: list[tuple[str, float]], split: str, block_size: int, batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, verify: bool = True):
        if not sources:
            raise EmberError("MixtureLoader: no sources. HINT: pass DIR:WEIGHT pairs")
        self.names = [s for s, _ in sources]
        self.weights = np.array([w for _, w in sources], np.float64)
        self.weights /= self.weights.sum()
        self.loaders = [TokenLoader(s, split, block_size, batch_size, dp_rank, dp_size, seed, verify)
                        for s, _ in sources]
        first = self.loaders[0]
        for name, ld in zip(self.names[1:], self.loaders[1:]):
            if (ld.vocab_size, ld.eos_id) != (first.vocab_size, first.eos_id):
                raise EmberError(f"mixture: {name} has vocab {ld.vocab_size} / eos {ld.eos_id} but {self.names[0]} "
                                 f"has {first.vocab_size} / {first.eos_id}; a mixture needs one tokenizer. HINT: "
                                 f"prepare every dataset with --tokenizer {self.names[0]}/tokenizer")
        self.split, self.block_size, self.batch_size = split, block_size, batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.vocab_size, self.eos_id = first.vocab_size, first.eos_id
        self.data_dir, self.tokenizer_dir = first.data_dir, first.tokenizer_dir
        self.step = 0
        self.last_sources = np.empty(0, np.int64)
        """Which source each row of the last batch came from."""

    def _choice(self, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, n, self.dp_rank, 0x6D6978])
        return rng.choice(len(self.loaders), size=self.batch_size, p=self.weights)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        src = self._choice(self.step)
        x = torch.empty((self.batch_size, self.block_size), dtype=torch.int64)
        y = torch.empty_like(x)
        for k, ld in enumerate(self.loaders):
            rows = torch.from_numpy(np.flatnonzero(src == k))
            if len(rows):
                x[rows], y[rows] = ld.take(len(rows))
        self.step += 1
        self.last_sources = src
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "kind": "mixture", "step": self.step, "seed": self.seed,
                "sources": list(self.names), "weights": self.weights.tolist(), "dp_size": self.dp_size,
                "loaders": [ld.state_dict() for ld in self.loaders]}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("kind") != "mixture":
            raise EmberError("loader state: saved by a single-dataset run, resumed with --data.mix. HINT: resume "
                             "with the data settings of the saved run")
        for key, now in (("sources", list(self.names)), ("weights", self.weights.tolist()), ("seed", self.seed),
                         ("dp_size", self.dp_size)):
            if sd.get(key) != now:
                raise EmberError(f"loader state: mixture {key} is {sd.get(key)!r} in the checkpoint but {now!r} now, "
                                 "so the sample sequence cannot be continued. HINT: resume with the same --data.mix")
        for ld, s in zip(self.loaders, sd["loaders"]):
            ld.load_state_dict(s)
        self.step = int(sd["step"])

    def iter_eval(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each source's fixed eval batches, in proportion to its weight (at least one batch each)."""
        for w, ld in zip(self.weights, self.loaders):
            yield from ld.iter_eval(None if max_batches is None else max(1, round(max_batches * w)))
