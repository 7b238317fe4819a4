"""Pipeline parallelism: the Transformer cut into stages by layer, run by torch.distributed.pipelining.

    stages   the embedding, every block and the head count as one layer each (n_layer + 2 units),
             cut into pp x v contiguous stages of near-equal unit counts (`stage_layers`)
    ranks    gpipe / 1f1b: one stage per pipeline rank; interleaved-1f1b: v stages per rank, rank r
             holding stages r, r + pp, ...; zbv (zero bubble, V shape): two stages per rank, r and
             2 pp - 1 - r, so the first and the last stage share rank 0
    a part   each stage is a Transformer with the blocks it does not own deleted and tok_embeddings /
             norm / output set to None where it is not first / last: parameter names (and so DCP
             checkpoint keys) are those of the whole model, so checkpoints move between layouts

The loss handed to the schedule is already normalised (`cross-entropy sum / (step weight / dp)`, the
Trainer's loss contract), and the schedules run with scale_grads=False: gradients have the scale of a
run without pipelining, also with gradient accumulation and uneven masks.

Tied embeddings (GPT-2, Llama-3.2, SmolLM2): the first stage holds the embedding, the last a copy as
its head, initialised equal; after backward their gradients are summed over the pipeline group
(Megatron-LM's approach), so both copies take the same optimizer update (on one rank when it holds
both, as zbv's rank 0 does). The copy is left out of the gradient norm (counted once) and, like the
embedding, out of weight decay.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from ember.errors import EmberError


def stages_per_rank(schedule: str, virtual: int) -> int:
    if schedule in ("gpipe", "1f1b"):
        return 1
    if schedule == "zbv":
        return 2
    return virtual


def stage_ids(pp_rank: int, pp: int, schedule: str, virtual: int = 2) -> list[int]:
    """The global stage indices this pipeline rank holds, in order."""
    v = stages_per_rank(schedule, virtual)
    if schedule == "zbv":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(v)]


def stage_layers(n_layer: int, n_stages: int) -> list[tuple[bool, list[int], bool]]:
    """For each stage: (has the embedding, its block indices, has the head). Units (embedding, blocks,
    head) are split into contiguous runs whose sizes differ by at most one; the extra units go to
    the middle stages (the first and last already carry the embedding and head)."""
    units = n_layer + 2
    if n_stages > units:
        raise EmberError(f"pipeline: {n_stages} stages for {n_layer} blocks + embedding + head = {units} layers. "
                         "HINT: fewer stages (--parallel.pp, --parallel.pp-virtual-stages) or a deeper model")
    base, extra = divmod(units, n_stages)
    sizes = [base] * n_stages
    order = sorted(range(n_stages), key=lambda s: (s in (0, n_stages - 1), abs(s - (n_stages - 1) / 2)))
    for s in order[:extra]:
        sizes[s] += 1
    out, start = [], 0
    for size in sizes:
        idx = list(range(start, start + size))
        start += size
        out.append((0 in idx, [i - 1 for i in idx if 1 <= i <= n_layer], units - 1 in idx))
    return out


def split_part(model: nn.Module, has_embedding: bool, blocks: list[int], has_head: bool) -> nn.Module:
    """A stage's Transformer: a deep copy of `model` (on meta) without the parts it does not own."""
    part = copy.deepcopy(model)
    keep = {str(i) for i in blocks}
    for name in list(part.layers.keys()):
        if name not in keep:
            del part.layers[name]
    if not has_embedding:
        part.tok_embeddings = None
        part.pos_embeddings = None
    if not has_head:
        part.norm = None
        part.output = None
    elif not has_embedding and part.output is not None and model.cfg.tie_embeddings and model.n_out is None:
        # the head of a tied model on a stage without the embedding: an own parameter, initialised to the
        # embedding and kept equal by summing the two copies' gradients (PipelineModel.sync_tied_grads)
        part.output.weight = nn.Parameter(torch.empty_like(part.output.weight))
    part._ember_pp_part = True
    return part


class PipelineModel(nn.Module):
    """This rank's stage parts and the schedule that runs them; what the Trainer trains under PP.

    `parts` are Transformers (see `split_part`), each already parallelized (TP, FSDP2) and materialized.
    The Trainer calls `step(inputs, targets, loss_sum, denom)` (forward + backward of one batch through
    the schedule; returns the batch's summed loss on every rank) and `evaluate(...)` (forward only).
    """

    def __init__(self, parts: list[nn.Module], stage_idx: list[int], n_stages: int, dims, schedule: str,
                 microbatches: int):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.stage_idx, self.n_stages, self.dims = stage_idx, n_stages, dims
        self.schedule_name, self.microbatches = schedule, microbatches
        self.cfg = parts[0].cfg
        self.n_out = parts[0].n_out
        self._schedule = None
        self._loss_sum: Any = None
        self._sums: list[torch.Tensor] = []
        self._denom = 1.0
        self.pp_group = dims.pp_mesh.get_group()
        if self.tied:  # mark the head copy again (parallelize replaced the parameter objects)
            last = self._part_with("output")
            if last is not None and last.tok_embeddings is None:
                last.output.weight._ember_tied_copy = True

    # ---------------------------------------------------------------------------- tied embeddings
    def _part_with(self, attr: str) -> Optional[nn.Module]:
        for part in self.parts:
            if getattr(part, attr, None) is not None:
                return part
        return None

    @property
    def tied(self) -> bool:
        return bool(self.cfg.tie_embeddings and self.n_out is None)

    @torch.no_grad()
    def sync_tied_grads(self) -> None:
        """Sum the gradients of the embedding (first stage) and its head copy (last stage): on one rank
        when it holds both (zbv), else between the two ranks that hold them (a group per data/tensor-
        parallel coordinate). Collective over every rank."""
        if not self.tied:
            return
        from torch.distributed.tensor import DTensor

        first, last = self._part_with("tok_embeddings"), self._part_with("output")
        mods = (first.tok_embeddings if first is not None else None, last.output if last is not None else None)
        mine = [m.weight for m in mods if m is not None]
        for p in mine:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        local = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in mine]
        if self.schedule_name == "zbv":  # the V puts the first and the last stage on pipeline rank 0
            if len(mine) == 2:
                local[0].add_(local[1])
                local[1].copy_(local[0])
            return
        group = self._tied_group()  # every rank takes part in creating the groups
        if mine:
            dist.all_reduce(local[0], group=group)

    def _tied_group(self):
        """The process group {first-stage rank, last-stage rank} of this rank's (dp, tp) coordinate. Every
        rank creates every such group once (new_group is collective), in the same order."""
        if getattr(self, "_tied_pg", None) is None:
            grid = self.dims.mesh.mesh  # (pp, dp_replicate, dp_shard, tp) global ranks
            last_rank = (self.n_stages - 1) % grid.shape[0]  # loop-style schedules
            mine = None
            for coord in torch.cartesian_prod(*[torch.arange(n) for n in grid.shape[1:]]).reshape(-1, 3).tolist():
                ranks = [int(grid[0][tuple(coord)]), int(grid[last_rank][tuple(coord)])]
                g = dist.new_group(ranks)
                if dist.get_rank() in ranks:
                    mine = g
            self._tied_pg = mine
        return self._tied_pg

    def state_view(self) -> nn.Module:
        """One module over this rank's parts whose parameter names are the whole model's (layers.3...,
        tok_embeddings.weight, output.weight): what DCP saves and loads, so a checkpoint moves between
        pipeline and non-pipeline layouts."""
        if getattr(self, "_view", None) is None:
            view = nn.Module()
            view.layers = nn.ModuleDict({k: b for part in self.parts for k, b in part.layers.items()})
            for attr in ("tok_embeddings", "pos_embeddings", "norm", "output"):
                part = self._part_with(attr)
                if part is not None:
                    setattr(view, attr, getattr(part, attr))
            object.__setattr__(self, "_view", view)  # not a registered child (no second name for the weights)
        return self._view

    def norm_params(self) -> list[torch.Tensor]:
        """Parameters whose gradients count in the global norm (the tied head copy is counted once)."""
        return [p for p in self.parameters() if not getattr(p, "_ember_tied_copy", False)]

    # ---------------------------------------------------------------------------- the schedule
    def _build_schedule(self):
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import (Schedule1F1B, ScheduleGPipe,
                                                            ScheduleInterleaved1F1B, ScheduleZBVZeroBubble)

        stages = [PipelineStage(part, i, self.n_stages, self.dims.device, group=self.pp_group)
                  for part, i in zip(self.parts, self.stage_idx)]
        cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B,
               "zbv": ScheduleZBVZeroBubble}[self.schedule_name]
        arg = stages[0] if self.schedule_name in ("gpipe", "1f1b") else stages
        return cls(arg, n_microbatches=self.microbatches, loss_fn=self._loss, scale_grads=False)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self._loss_sum(logits, targets)
        self._sums.append(loss.detach())
        return loss / self._denom

    @property
    def holds_first(self) -> bool:
        return 0 in self.stage_idx

    @property
    def holds_last(self) -> bool:
        return self.n_stages - 1 in self.stage_idx

    def _run(self, inputs: torch.Tensor, targets: torch.Tensor, loss_sum, denom: float, train: bool) -> torch.Tensor:
        if inputs.shape[0] % self.microbatches:
            raise EmberError(f"pipeline: a batch of {inputs.shape[0]} sequences cannot be cut into "
                             f"--parallel.pp-microbatches {self.microbatches}. HINT: make --train.batch-size a "
                             "multiple of it")
        if self._schedule is None:
            self._schedule = self._build_schedule()
        self._loss_sum, self._denom, self._sums = loss_sum, denom, []
        args = (inputs,) if self.holds_first else ()
        kw = {"target": targets} if self.holds_last else {}
        if train:
            self._schedule.step(*args, **kw, return_outputs=False)
        else:
            self._schedule.eval(*args, **kw)
        # the last stage computes one loss per microbatch (the first call's shape inference may add one
        # more on placeholder inputs, before them)
        sums = self._sums[-self.microbatches:] if self.holds_last else []
        total = torch.stack(sums).sum() if sums else torch.zeros((), device=self.dims.device)
        from torch.distributed.tensor import DTensor

        total = (total.full_tensor() if isinstance(total, DTensor) else total).float().reshape(())
        dist.all_reduce(total, group=self.pp_group)  # only the last stage's rank holds a non-zero sum
        return total

    def step(self, inputs, targets, loss_sum, denom: float) -> torch.Tensor:
        """Forward and backward of one batch (microbatched); the summed loss (every pipeline rank)."""
        return self._run(inputs, targets, loss_sum, denom, train=True)

    @torch.no_grad()
    def evaluate(self, inputs, targets, loss_sum) -> torch.Tensor:
        return self._run(inputs, targets, loss_sum, 1.0, train=False)

    def forward(self, *args, **kwargs):
        raise EmberError("a pipeline-parallel model runs through its schedule (Trainer), not model(x). HINT: "
                         "load run_dir/final for inference")


def resolve_microbatches(cfg, dims) -> int:
    return cfg.pp_microbatches or dims.pp * stages_per_rank(cfg.pp_schedule, cfg.pp_virtual_stages)


def build_pipeline(mcfg, dims, cfg, seed: int) -> PipelineModel:
    """This rank's stages of a fresh model (seeded like a 1-process init), parallelized, in a PipelineModel."""
    from ember.log import log
    from ember.models import Transformer
    from ember.parallel.parallelize import check_config, materialize, parallelize

    check_config(cfg)
    if cfg.pp_schedule == "interleaved-1f1b" and cfg.pp_virtual_stages < 2:
        raise EmberError(f"--parallel.pp-virtual-stages {cfg.pp_virtual_stages}: interleaved-1f1b needs at least 2 "
                         "stages per rank. HINT: use --parallel.pp-schedule 1f1b for one")
    v = stages_per_rank(cfg.pp_schedule, cfg.pp_virtual_stages)
    n_stages = dims.pp * v
    layout = stage_layers(mcfg.n_layer, n_stages)
    mine = stage_ids(dims.pp_rank, dims.pp, cfg.pp_schedule, cfg.pp_virtual_stages)
    with torch.device("meta"):
        whole = Transformer(mcfg)
    parts = []
    for i in mine:
        part = split_part(whole, *layout[i])
        part = parallelize(part, dims, cfg, loss_parallel=False)
        materialize(part, dims, seed=seed)
        parts.append(part)
    micro = resolve_microbatches(cfg, dims)
    if cfg.pp_schedule != "gpipe" and micro < n_stages:
        raise EmberError(f"--parallel.pp-microbatches {micro}: {cfg.pp_schedule} needs at least as many microbatches "
                         f"as stages ({n_stages}). HINT: --parallel.pp-microbatches {n_stages} (and a "
                         f"--train.batch-size that is a multiple of it), or --parallel.pp-schedule gpipe")
    desc = "; ".join(f"stage {i}: " + "+".join((["embedding"] if layout[i][0] else [])
                                                + ([f"blocks {layout[i][1][0]}-{layout[i][1][-1]}"] if layout[i][1] else [])
                                                + (["head"] if layout[i][2] else [])) for i in mine)
    log(f"pipeline: {n_stages} stages ({cfg.pp_schedule}, {micro} microbatches), pipeline rank {dims.pp_rank}: {desc}")
    return PipelineModel(parts, mine, n_stages, dims, cfg.pp_schedule, micro)
