"""Tensor and sequence parallelism for the Transformer: the plan as data, applied with DTensor.

The plan is a table `module name -> ParallelStyle` (torch.distributed.tensor.parallel), one for the
model's top level and one applied to every block. Megatron-LM's split:

    block                      without sequence parallel            with sequence parallel (SP)
    attention_norm, ffn_norm   replicated                           SequenceParallel (sharded on T)
    attention / feed_forward   -                                    input gathered: Shard(1) -> Replicate
    wq, wk, wv, w1, w3         ColwiseParallel (heads / hidden split)
    wo, w2                     RowwiseParallel -> all-reduce        RowwiseParallel -> reduce-scatter to Shard(1)

    top level
    tok_embeddings             RowwiseParallel over the vocabulary (rows), output replicated
    layers["0"]                -                                    input split: Replicate -> Shard(1)
    norm                       replicated                           SequenceParallel, output gathered
    output (the LM head)       ColwiseParallel over the vocabulary: logits stay vocab-sharded DTensors
                               (loss_parallel) or are gathered; a classifier / reward head is replicated

Between blocks the residual stream is a local (B, T/tp, C) tensor under SP (activation memory / tp),
a full (B, T, C) one without. Attention heads split evenly: n_head and n_kv_head must divide by tp
(checked by `check_tp`: KV heads are not replicated). A tied embedding stays one parameter: the
embedding's and the head's weights have the same placement (Shard(0) over the vocabulary).

The positional and mask logic of the model sees the full sequence: the sequence is split only at the
first block's input, so RoPE tables, masks and learned positions need nothing TP-specific.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ember.errors import EmberError


def check_tp(cfg, tp: int, n_out: Optional[int] = None) -> None:
    """An EmberError naming the field when a model config cannot be split over tp processes."""
    if tp <= 1:
        return
    bad = [(name, getattr(cfg, name)) for name in ("n_head", "n_kv_head", "ffn_hidden")
           if getattr(cfg, name) % tp]
    if n_out is None and cfg.vocab_size % tp:
        bad.append(("vocab_size", cfg.vocab_size))
    if bad:
        fields = ", ".join(f"model.{k}={v}" for k, v in bad)
        raise EmberError(f"--parallel.tp {tp}: {fields} not divisible by {tp} (each tensor-parallel rank takes "
                         f"an equal share of the heads, the MLP's hidden units and the vocabulary). HINT: pick a tp "
                         f"that divides them, or pad the vocabulary (--model.vocab-size a multiple of {tp})")


def gathered_sequence_parallel():
    """SequenceParallel whose output is gathered back into a full local tensor (the final norm: what
    follows it, the LM head, a classifier's pooling or a fused loss, sees the whole sequence)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import SequenceParallel

    class GatheredSequenceParallel(SequenceParallel):
        @staticmethod
        def _prepare_output_fn(use_local_output, mod, outputs, device_mesh):
            return outputs.redistribute(placements=[Replicate()]).to_local()

    return GatheredSequenceParallel()


def _sequence_split(tp_mesh):
    """x (B, T, C), the same on every TP rank -> this rank's (B, T/tp, C); its backward all-gathers the
    gradient (each rank holds its chunk's only)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def split(x: torch.Tensor) -> torch.Tensor:
        d = DTensor.from_local(x, tp_mesh, [Replicate()], run_check=False)
        return d.redistribute(placements=[Shard(1)]).to_local()
    return split


def _sequence_gather(tp_mesh):
    """(B, T/tp, C) sequence shards -> the whole (B, T, C) on every TP rank (backward: this rank's chunk)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def gather(x: torch.Tensor) -> torch.Tensor:
        return DTensor.from_local(x, tp_mesh, [Shard(1)], run_check=False).redistribute(
            placements=[Replicate()]).to_local()
    return gather


def block_plan(sequence_parallel: bool, mlp: str) -> dict:
    """module name (inside a Block) -> ParallelStyle."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel)

    mlp_in = ["feed_forward.w1"] + (["feed_forward.w3"] if mlp == "swiglu" else [])
    plan: dict = {f"attention.{n}": ColwiseParallel() for n in ("wq", "wk", "wv")}
    plan.update({n: ColwiseParallel() for n in mlp_in})
    if not sequence_parallel:
        plan["attention.wo"] = RowwiseParallel()
        plan["feed_forward.w2"] = RowwiseParallel()
        return plan
    plan["attention_norm"] = SequenceParallel()
    plan["ffn_norm"] = SequenceParallel()
    # Attention.forward(x, rope, mask, is_causal, input_pos, kv_len): only x is gathered
    plan["attention"] = PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None, None),
                                           desired_input_layouts=(Replicate(), None, None, None, None, None))
    plan["feed_forward"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    plan["attention.wo"] = RowwiseParallel(output_layouts=Shard(1))
    plan["feed_forward.w2"] = RowwiseParallel(output_layouts=Shard(1))
    return plan


def top_plan(model: nn.Module, sequence_parallel: bool, loss_parallel: bool) -> dict:
    """module name (top level) -> ParallelStyle. The LM head is vocab-split; other heads are replicated."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if model.norm is not None and sequence_parallel:
        plan["norm"] = gathered_sequence_parallel()
    if model.output is not None and model.n_out is None:
        plan["output"] = (ColwiseParallel(output_layouts=Shard(-1), use_local_output=False) if loss_parallel
                          else ColwiseParallel(output_layouts=Replicate()))
    return plan


def apply_tp(model: nn.Module, tp_mesh, sequence_parallel: bool = True, loss_parallel: bool = True) -> None:
    """Split `model` (a Transformer, on meta or materialized) over tp_mesh in place.

    Sets `model._ember_loss_parallel` when the head's logits come out as vocab-sharded DTensors (the
    Trainer then runs the objective under `torch.distributed.tensor.parallel.loss_parallel`).
    """
    from torch.distributed.tensor.parallel import parallelize_module

    tp = tp_mesh.size()
    check_tp(model.cfg, tp, model.n_out)
    tied = (model.output is not None and model.tok_embeddings is not None
            and model.output.weight is model.tok_embeddings.weight)
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan(sequence_parallel, model.cfg.mlp))
    parallelize_module(model, tp_mesh, top_plan(model, sequence_parallel, loss_parallel))
    if tied:  # both are Shard(0) over the vocabulary: share the embedding's DTensor again
        model.output.weight = model.tok_embeddings.weight
    if sequence_parallel and len(model.layers):
        first = next(iter(model.layers.values()))
        split = _sequence_split(tp_mesh)

        def pre_hook(module, args):
            x = args[0]
            if x.shape[1] % tp:
                raise EmberError(f"sequence parallel over {tp} ranks: sequence length {x.shape[1]} is not "
                                 f"divisible by {tp}. HINT: use a block size (or padded length) that divides by "
                                 "--parallel.tp, or pass --parallel.no-sequence-parallel")
            return (split(x), *args[1:])

        first.register_forward_pre_hook(pre_hook)
        if model.norm is None and model.output is None:
            # a pipeline stage before the last: hand the next stage the whole sequence (its positions,
            # masks and RoPE are computed from the sequence length it receives)
            last = list(model.layers.values())[-1]
            gather = _sequence_gather(tp_mesh)
            last.register_forward_hook(lambda module, args, out: gather(out))
    model._ember_loss_parallel = loss_parallel and model.output is not None and model.n_out is None
    model._ember_tp = tp
