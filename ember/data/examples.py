"""`ExampleLoader`: seeded, resumable, rank-aware batches over a list of examples (SFT, classification).

A subclass says how an epoch is cut into global batches (`_batches(epoch)`: lists of `global_batch` =
batch_size x dp_size example indices, the same on every rank for a given seed; rank r takes slice r of
each) and how a batch is collated (`collate`). So N ranks of batch B see exactly the examples one
process of batch N x B sees in each step. The state is (epoch, position) plus the settings that must
match on resume.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator, Optional

import numpy as np

from ember.errors import EmberError


class ExampleLoader(ABC):
    name = "examples"

    def __init__(self, examples: list, batch_size: int, pad_id: int, seed: int = 0, dp_rank: int = 0,
                 dp_size: int = 1):
        if not examples:
            raise EmberError(f"{self.name}: no usable example. HINT: check the records, fractions and lengths")
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.epoch, self.pos = 0, 0
        self._plan_epoch, self._plan = -1, []

    # ---------------------------------------------------------------- what a subclass defines
    @property
    def global_batch(self) -> int:
        return self.batch_size * self.dp_size

    def _batches(self, epoch: int) -> list[list[int]]:
        """All global batches of an epoch (every rank computes the same list)."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        g = self.global_batch
        return [perm[i:i + g].tolist() for i in range(0, len(perm) - g + 1, g)]

    @abstractmethod
    def collate(self, chosen: list) -> dict:
        """The batch of these examples (each loader has its own layout)."""

    def _extra_state(self) -> dict:
        return {}

    # ---------------------------------------------------------------- shared
    def _mine(self, epoch: int) -> list[list[int]]:
        """This rank's contiguous share of every global batch."""
        out = []
        for b in self._batches(epoch):
            k = len(b) // self.dp_size
            if k:
                out.append(b[self.dp_rank * k:(self.dp_rank + 1) * k])
        return out

    def next_batch(self) -> dict:
        if self._plan_epoch != self.epoch:
            self._plan, self._plan_epoch = self._mine(self.epoch), self.epoch
            if not self._plan:
                raise EmberError(f"{self.name}: {len(self.examples)} examples are too few for batches of "
                                 f"{self.batch_size} on {self.dp_size} rank(s). HINT: lower --train.batch-size")
        idx = self._plan[self.pos]
        self.pos += 1
        if self.pos >= len(self._plan):
            self.epoch, self.pos = self.epoch + 1, 0
        return self.collate([self.examples[i] for i in idx])

    def iter_eval(self, max_batches: Optional[int] = None) -> Iterator[dict]:
        """Fixed, padded batches in file order (strided by rank), the same every call."""
        mine = list(range(len(self.examples)))[self.dp_rank::self.dp_size]
        for b, i in enumerate(range(0, len(mine), self.batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield self.eval_collate([self.examples[j] for j in mine[i:i + self.batch_size]])

    def eval_collate(self, chosen: list) -> dict:
        return self.collate(chosen)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n": len(self.examples),
                "batch_size": self.batch_size, "dp_size": self.dp_size, **self._extra_state()}

    def load_state_dict(self, sd: dict) -> None:
        now = self.state_dict()
        for key in now:
            if key not in ("epoch", "pos") and sd.get(key) != now[key]:
                raise EmberError(f"{self.name} loader state: {key} is {sd.get(key)!r} in the checkpoint but "
                                 f"{now[key]!r} now. HINT: resume with the same data and batch settings")
        self.epoch, self.pos = int(sd["epoch"]), int(sd["pos"])
