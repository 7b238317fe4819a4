"""Memory and step-time planning of training layouts (`ember plan`): arithmetic only, nothing is built.

For a model config, a GPU type, a GPU count, a sequence length and a global batch, `plan()` lists the
layouts (data-parallel replicate x shard, tensor, pipeline degree, microbatch size, activation
checkpointing, precision, CPU offload), each with its memory per GPU broken down and a step-time
estimate, ranked by time. The rules mirror how ember lays a model out (parallel/tp.py, pp.py, fsdp.py):

Model state per rank (exact: `rank_state_bytes` equals the local tensors of a built model)
    parameters   fp32 master weights: every parameter this rank's pipeline stages hold, its
                 tensor-parallel shard (column-parallel weights split on dim 0, row-parallel on dim 1,
                 the vocabulary split on dim 0, norms and positions replicated), then FSDP2's
                 `torch.chunk` of dim 0 over dp_shard (ceil(rows / dp_shard) rows on the first ranks)
    gradients    the same shapes, fp32
    optimizer    AdamW: exp_avg + exp_avg_sq (fp32, same shapes) + one 4-byte step per tensor
    (Local tensor bytes; FSDP2 pads an uneven shard's storage by less than one row per tensor.)

Activations per microbatch (the tensors autograd saves for backward, `torch.autograd.graph.
saved_tensors_hooks`; `activation_bytes` matches a measurement of ember's model, see tests)
    per block and token, without checkpointing, in fp32 (a = 4; in bf16 the RMSNorms keep fp32 copies):
        GELU/LayerNorm  a*(4C + (H+2K)D + HD + 2F) + 4H (attention log-sum-exp, fp32) + 16 (norm stats)
        SwiGLU/RMSNorm  a*(6C + (H+2K)D + (H+K)D + HD + 4F) + 4H + 8   (RoPE saves q, k once more)
      the fused q/k/v weight (C x (H+2K)D) is saved once per block when the projection is fused;
    full AC         the block input only (a*C per token) + one block recomputed during backward
    selective AC    block input + matmul and attention outputs ((H+2K)D + 2C + F or 2F + HD, + 4H)
    tensor parallel q/k/v, attention and MLP terms / tp; with sequence parallel the norms / tp
                    too, but the gathered norm outputs the projections read stay whole (a*C twice)
    the head        fp32 log-softmax of the logits (b*T*V*4, / tp under loss_parallel) or, on one
                    process without a wrapper, the fused head+CE's saved gradients (b*T*C*4 + V*C*4)
    pipeline        a rank keeps `in_flight` microbatches of activations: gpipe all m, 1f1b and zbv
                    pp, interleaved pp * (1 + (pp - 1) / (pp * v)) (Korthikanti et al. 2022, 4.2.3)

Temporary and communication buffers
    FSDP2           two units (the largest block) all-gathered in the compute dtype (current + prefetch)
                    and their unsharded fp32 gradients before the reduce-scatter; under PP (no reshard
                    after forward) the stage's whole unsharded parameters; with gradient accumulation
                    the unsharded fp32 gradients of the stage (kept between micro-steps)
    DDP             gradient buckets: a second fp32 copy of every gradient
    the head        the logits' gradient in backward (as large as the saved log-softmax)

Step time = (compute + tensor-parallel collectives + pipeline sends) * (1 + bubble) + the part of the
data-parallel collectives that does not overlap compute + the optimizer step.
    compute         training FLOPs (6 N + attention; full AC adds the blocks' forward again) / (GPUs x
                    peak x mfu); float8 runs the block linears FP8_LINEAR_SPEEDUP x faster
    collectives     ring volumes over the link they cross: NVLink inside a node, the NIC across nodes
                    (all-gather / reduce-scatter (n-1)/n x bytes, all-reduce 2 (n-1)/n x bytes)
    bubble          gpipe / 1f1b (pp-1)/m; interleaved (pp-1)/(v m); zbv 0 once m >= 2 pp
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from ember.models.config import ModelConfig
from ember.models.layers import _FUSE_QKV_MIN_ROWS
from ember.parallel.pp import stage_ids, stage_layers, stages_per_rank


# ------------------------------------------------------------------------------------------- hardware
@dataclass(frozen=True)
class Hardware:
    """One accelerator type and its links (peaks from the vendors' data sheets, dense, no sparsity)."""

    name: str
    memory_bytes: int
    peak_flops: dict  # compute dtype -> FLOP/s
    hbm_bytes_s: float  # memory bandwidth
    intra_bytes_s: float  # per GPU, one direction, inside a node (NVLink)
    inter_bytes_s: float  # per GPU, one direction, between nodes (NIC)
    per_node: int
    mfu: float  # default model-FLOPs utilisation assumed for compute
    host_bytes_s: float = 25e9  # PCIe to host memory (CPU offload)

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(p for p in ("bf16", "fp8", "fp32") if p in self.peak_flops)


GiB = 2 ** 30
HARDWARE = {
    # H100 SXM: 989 TFLOP/s bf16, 1979 fp8, 3.35 TB/s HBM3, NVLink4 450 GB/s per direction, 400 Gb/s NIC
    "h100": Hardware("h100", 80 * GiB, {"bf16": 989e12, "fp8": 1979e12}, 3.35e12, 450e9, 50e9, 8, 0.40),
    # H200: the H100's compute with 141 GB of HBM3e at 4.8 TB/s
    "h200": Hardware("h200", 141 * 10 ** 9, {"bf16": 989e12, "fp8": 1979e12}, 4.8e12, 450e9, 50e9, 8, 0.40),
    # A100 SXM 80 GB: 312 TFLOP/s bf16 (no fp8), 2.0 TB/s, NVLink3 300 GB/s per direction, 200 Gb/s NIC
    "a100": Hardware("a100", 80 * GiB, {"bf16": 312e12}, 2.0e12, 300e9, 25e9, 8, 0.45),
    # a 2-core laptop-class CPU with gloo over shared memory: fp32 only (bf16 GEMMs are ~50x slower)
    "cpu": Hardware("cpu", 24 * GiB, {"fp32": 120e9}, 23e9, 2e9, 2e9, 64, 0.5),
}
FP8_LINEAR_SPEEDUP = 1.5
"""Assumed speed-up of the block linears under float8 (the peak doubles; scaling and casts take part)."""
RESERVED_FRACTION = 0.08
"""Memory kept free for the CUDA context, NCCL buffers and allocator fragmentation."""
AC_MODES = ("none", "selective", "full")


# --------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    microbatch: int = 1
    """Sequences per forward on one data-parallel rank (a pipeline microbatch, or a grad-accumulation step)."""
    ac: str = "none"
    precision: str = "fp32"
    data_parallel: str = "fsdp"  # fsdp | ddp | none
    pp_schedule: str = "1f1b"
    pp_virtual_stages: int = 2
    sequence_parallel: bool = True
    offload: bool = False
    loss_parallel: bool = True
    """Under tp > 1: the cross-entropy on vocabulary shards (language-model objectives without PP)."""

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def act_bytes(self) -> int:
        """Bytes per activation element: fp32, else the 2-byte compute dtype (bf16; fp8 keeps bf16 activations)."""
        return 4 if self.precision == "fp32" else 2

    @property
    def logit_shards(self) -> int:
        """How many ranks the logits are split over: tp under loss_parallel (never under PP), else 1."""
        return self.tp if (self.tp > 1 and self.loss_parallel and self.pp == 1) else 1

    def describe(self) -> str:
        dp = (f"fsdp {self.dp_shard}" if self.dp_replicate == 1 else
              f"ddp {self.dp_replicate}" if self.dp_shard == 1 else f"hsdp {self.dp_replicate}x{self.dp_shard}")
        if self.dp == 1:
            dp = "-"
        pp = f"{self.pp} {self.pp_schedule}" if self.pp > 1 else "-"
        return f"dp {dp} | tp {self.tp if self.tp > 1 else '-'} | pp {pp}"


def ember_data_parallel(layout: Layout) -> str:
    """What ember runs for these degrees (parallel/parallelize.resolve_data_parallel): FSDP2 whenever
    tp or pp > 1 (DDP does not take DTensors); DDP for pure replicas; nothing on one dp rank."""
    if layout.dp == 1:
        return "none"
    if layout.tp > 1 or layout.pp > 1 or layout.dp_shard > 1:
        return "fsdp"
    return layout.data_parallel if layout.data_parallel in ("ddp", "fsdp") else "fsdp"


# ---------------------------------------------------------------------------------- parameter shapes
def _block_params(cfg: ModelConfig, i: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, tensor-parallel split) of block i: 'row' = dim 0 split, 'col' = dim 1, '' = replicated."""
    C, D, F = cfg.n_embd, cfg.head_dim, cfg.ffn_hidden
    q, kv = cfg.n_head * D, cfg.n_kv_head * D
    p = f"layers.{i}."
    out: list = []
    norm_shapes = [("weight", (C,))] + ([("bias", (C,))] if cfg.norm == "layernorm" and cfg.bias else [])
    for norm in ("attention_norm", "ffn_norm"):
        out += [(f"{p}{norm}.{n}", s, "") for n, s in norm_shapes]
    lins = [("attention.wq", q, C, "row"), ("attention.wk", kv, C, "row"), ("attention.wv", kv, C, "row"),
            ("attention.wo", C, q, "col"), ("feed_forward.w1", F, C, "row")]
    if cfg.mlp == "swiglu":
        lins.append(("feed_forward.w3", F, C, "row"))
    lins.append(("feed_forward.w2", C, F, "col"))
    for name, n_out, n_in, split in lins:
        out.append((f"{p}{name}.weight", (n_out, n_in), split))
        if cfg.bias:
            out.append((f"{p}{name}.bias", (n_out,), "row" if split == "row" else ""))
    return out


def stage_params(cfg: ModelConfig, has_embedding: bool, blocks: list[int], has_head: bool) -> list:
    """(name, shape, split) of one pipeline stage's parameters (a whole model: every part). A tied head on
    a stage without the embedding is its own copy (parallel/pp.split_part)."""
    C, V = cfg.n_embd, cfg.vocab_size
    out: list = []
    if has_embedding:
        out.append(("tok_embeddings.weight", (V, C), "row"))
        if cfg.pos_emb == "learned":
            out.append(("pos_embeddings.weight", (cfg.block_size, C), ""))
    for i in blocks:
        out += _block_params(cfg, i)
    if has_head:
        out.append(("norm.weight", (C,), ""))
        if cfg.norm == "layernorm" and cfg.bias:
            out.append(("norm.bias", (C,), ""))
        if not (cfg.tie_embeddings and has_embedding):
            out.append(("output.weight", (V, C), "row"))
    return out


def _chunk_rows(n: int, parts: int, index: int) -> int:
    """Rows of `torch.chunk(t, parts)[index]` for a dim of n (0 where chunk makes fewer pieces)."""
    size = -(-n // parts)
    return max(0, min(n, (index + 1) * size) - index * size)


def local_shape(shape: tuple[int, ...], split: str, tp: int, dp_shard: int, shard_index: int) -> tuple[int, ...]:
    """The shape a rank holds: tensor-parallel split first, then FSDP2's chunk of dim 0."""
    s = list(shape)
    if tp > 1 and split == "row":
        s[0] //= tp
    elif tp > 1 and split == "col":
        s[1] //= tp
    if dp_shard > 1:
        s[0] = _chunk_rows(s[0], dp_shard, shard_index)
    return tuple(s)


def rank_stages(cfg: ModelConfig, layout: Layout, pp_rank: int = 0) -> tuple[list, list[int]]:
    """(every stage's (has embedding, blocks, has head), the stage indices pipeline rank `pp_rank` holds)."""
    if layout.pp == 1:
        return stage_layers(cfg.n_layer, 1), [0]
    v = stages_per_rank(layout.pp_schedule, layout.pp_virtual_stages)
    return (stage_layers(cfg.n_layer, layout.pp * v),
            stage_ids(pp_rank, layout.pp, layout.pp_schedule, layout.pp_virtual_stages))


def stage_tp_params(cfg: ModelConfig, layout: Layout, pp_rank: int = 0) -> int:
    """Parameters of a pipeline rank's stages after the tensor-parallel split, before FSDP sharding."""
    layers, mine = rank_stages(cfg, layout, pp_rank)
    return sum(math.prod(local_shape(s, sp, layout.tp, 1, 0)) for st in mine for _, s, sp in stage_params(cfg, *layers[st]))


def rank_params(cfg: ModelConfig, layout: Layout, pp_rank: int = 0, shard_index: int = 0) -> list:
    """(name, local shape) of every parameter tensor a rank holds."""
    layers, mine = rank_stages(cfg, layout, pp_rank)
    shard = layout.dp_shard if ember_data_parallel(layout) == "fsdp" else 1
    out = []
    for s in mine:
        for name, shape, split in stage_params(cfg, *layers[s]):
            out.append((name, local_shape(shape, split, layout.tp, shard, shard_index)))
    return out


def rank_state_bytes(cfg: ModelConfig, layout: Layout, pp_rank: int = 0, shard_index: int = 0) -> dict:
    """Exact model-state bytes of one rank: fp32 parameters, fp32 gradients, AdamW state.

    One exception to "gradients = parameters": under tensor parallelism without FSDP2, torch's
    vocabulary-sharded embedding backward returns the gradient of an untied token embedding whole
    (Replicate), V x C on every rank; FSDP2 reduce-scatters it back to the shard."""
    params = rank_params(cfg, layout, pp_rank, shard_index)
    n = sum(math.prod(s) for _, s in params)
    grads = 4 * n
    if layout.tp > 1 and ember_data_parallel(layout) != "fsdp" and not cfg.tie_embeddings:
        local = dict(params).get("tok_embeddings.weight")
        if local is not None:
            grads += 4 * (cfg.vocab_size * cfg.n_embd - math.prod(local))
    return {"parameters": 4 * n, "gradients": grads, "optimizer": 8 * n + 4 * len(params)}


def max_rank_state(cfg: ModelConfig, layout: Layout) -> tuple[dict, int]:
    """The largest rank's model state (shard 0 holds the most rows) and its pipeline rank."""
    best, best_rank = None, 0
    for r in range(layout.pp):
        s = rank_state_bytes(cfg, layout, r, 0)
        if best is None or sum(s.values()) > sum(best.values()):
            best, best_rank = s, r
    return best, best_rank


# ---------------------------------------------------------------------------------------- activations
def _norm_bytes(cfg: ModelConfig, a: int) -> tuple[float, float]:
    """(bytes per token a norm saves, including its input; of which the output the next matmul reads)."""
    C = cfg.n_embd
    if cfg.norm == "rmsnorm":
        if a == 4:
            return 12 * C + 4, 4 * C  # x, rsqrt, x * rsqrt, the weighted output
        return 8 * C + 4, 2 * C  # x in fp32, rsqrt, x * rsqrt in fp32 then cast, the output
    return 2 * a * C + 8, a * C  # input, mean, rstd, the output


def block_activation_bytes(cfg: ModelConfig, tokens: int, a: int, tp: int = 1, sp: bool = True,
                           ac: str = "none", fused_qkv: bool = True) -> float:
    """Bytes one block saves for backward over `tokens` tokens (see the module docstring)."""
    C, H, K, D, F = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.ffn_hidden
    seq_div = tp if (tp > 1 and sp) else 1
    if ac == "full":
        return tokens * a * C / seq_div
    qkv = (H + 2 * K) * D
    mlp_saved = 2 if cfg.mlp == "gelu" else 4
    if ac == "selective":
        mm = a * (qkv + C + (1 if cfg.mlp == "gelu" else 2) * F + C + H * D) + 4 * H
        return tokens * (a * C / seq_div + mm / tp)
    fused = fused_qkv and tp == 1 and tokens >= _FUSE_QKV_MIN_ROWS
    # fused, the rotated q and k are a copy beside the saved q/k/v output; unfused they replace q and k
    rope = (H + K) * D if (cfg.pos_emb == "rope" and fused) else 0
    sharded = a * (qkv + rope + H * D + mlp_saved * F) + 4 * H
    norm, normed = _norm_bytes(cfg, a)  # two norms; their inputs: the block input, the mid-block residual
    if tp > 1 and sp:  # the norms run on sequence shards; the projections keep the gathered output
        norms = 2 * (norm - normed) / tp + 2 * normed
    else:
        norms = 2 * norm
    const = cfg.n_embd * qkv * a if fused else 0
    return tokens * (sharded / tp + norms) + const


def top_activation_bytes(cfg: ModelConfig, batch: int, seq: int, a: int, tp: int = 1, sp: bool = True,
                         first: bool = True, last: bool = True, fused_loss: bool = False,
                         loss_parallel: bool = True) -> float:
    """Bytes saved outside the blocks: token ids and positions (first stage), the final norm and the
    loss (last stage)."""
    N, C, V = batch * seq, cfg.n_embd, cfg.vocab_size
    total = 0.0
    if first:
        total += 8 * N + (8 * seq if cfg.pos_emb == "learned" else 0)
    if cfg.pos_emb == "rope":
        total += 4 * seq * 2 * cfg.head_dim  # the RoPE rows of this sequence, shared by the blocks
    if last:
        norm, normed = _norm_bytes(cfg, a)
        if fused_loss:  # the fused head+CE keeps d(hidden) and d(weight), not the final norm's output
            total += N * (norm - normed) + 4 * N * C + 4 * V * C
        else:  # the final norm (its input and output), the log-softmax, the targets
            total += N * norm + 4 * N * V / (tp if (tp > 1 and loss_parallel) else 1) + 8 * N + 4
    return total


def in_flight(layout: Layout, microbatches: int, pp_rank: int = 0) -> float:
    """Microbatches whose activations a pipeline rank holds at its peak: gpipe all of them; 1f1b
    pp - rank (the first rank most); zbv pp on every rank (the V balances them); interleaved the first
    rank's pp (1 + (pp - 1) / (pp v)) (Korthikanti et al. 2022, 4.2.3), taken for every rank."""
    if layout.pp == 1:
        return 1
    if layout.pp_schedule == "gpipe":
        return microbatches
    if layout.pp_schedule == "interleaved-1f1b":
        v = layout.pp_virtual_stages
        return min(microbatches * v, layout.pp * (1 + (layout.pp - 1) / (layout.pp * v)))
    if layout.pp_schedule == "zbv":
        return min(layout.pp, microbatches)
    return min(layout.pp - pp_rank, microbatches)


def bubble(layout: Layout, microbatches: int) -> float:
    p, m = layout.pp, microbatches
    if p == 1:
        return 0.0
    if layout.pp_schedule == "interleaved-1f1b":
        return (p - 1) / (layout.pp_virtual_stages * m)
    if layout.pp_schedule == "zbv":
        return 0.0 if m >= 2 * p else (p - 1) / (2 * m)
    return (p - 1) / m


def fused_loss_used(layout: Layout) -> bool:
    """The fused head+CE runs on one unwrapped process only (train/fused_loss.can_fuse)."""
    return ember_data_parallel(layout) == "none" and layout.tp == 1 and layout.pp == 1


def activation_bytes(cfg: ModelConfig, layout: Layout, batch: int, seq: int, pp_rank: int = 0,
                     loss_parallel: Optional[bool] = None, fused_loss: Optional[bool] = None) -> float:
    """Bytes one microbatch of `batch` sequences leaves for backward on a rank of pipeline rank
    `pp_rank` (all its stages). `loss_parallel` / `fused_loss` None: what the layout runs
    (`Layout.logit_shards`, `fused_loss_used`)."""
    a = layout.act_bytes
    layers, mine = rank_stages(cfg, layout, pp_rank)
    lp = layout.logit_shards > 1 if loss_parallel is None else loss_parallel
    fused = fused_loss_used(layout) if fused_loss is None else fused_loss
    n_blocks = sum(len(layers[s][1]) for s in mine)
    out = n_blocks * block_activation_bytes(cfg, batch * seq, a, layout.tp, layout.sequence_parallel, layout.ac)
    out += top_activation_bytes(cfg, batch, seq, a, layout.tp, layout.sequence_parallel,
                                any(layers[s][0] for s in mine), any(layers[s][2] for s in mine), fused, lp)
    return out


# ----------------------------------------------------------------------------------------------- plan
@dataclass
class PlanRow:
    layout: Layout
    memory: dict  # bytes per GPU: parameters, gradients, optimizer, activations, temporary, total
    step_s: float
    tokens_per_s: float
    mfu: float
    fits: bool
    microbatches: int
    time: dict = field(default_factory=dict)  # seconds: compute, tp, pp, dp_exposed, optimizer, bubble

    def to_dict(self) -> dict:
        return {"layout": asdict(self.layout), "describe": self.layout.describe(), "memory_bytes": self.memory,
                "step_s": self.step_s, "tokens_per_s": self.tokens_per_s, "mfu": self.mfu, "fits": self.fits,
                "microbatches": self.microbatches, "time_s": self.time}


def rank_memory(cfg: ModelConfig, layout: Layout, seq: int, microbatches: int, pp_rank: int = 0) -> dict:
    """Bytes on one GPU of pipeline rank `pp_rank` (FSDP shard 0, the largest): model state, activations
    of the microbatches in flight, temporary and communication buffers (see the module docstring)."""
    a = layout.act_bytes
    dpm = ember_data_parallel(layout)
    state = rank_state_bytes(cfg, layout, pp_rank, 0)
    if layout.offload:
        state = {k: 0 for k in state}  # sharded parameters, gradients and optimizer state live in host memory
    activations = activation_bytes(cfg, layout, layout.microbatch, seq, pp_rank) * in_flight(layout, microbatches, pp_rank)
    layers, mine = rank_stages(cfg, layout, pp_rank)
    tokens = layout.microbatch * seq
    block_p = sum(math.prod(local_shape(s, sp, layout.tp, 1, 0)) for _, s, sp in _block_params(cfg, 0))
    stage_p_tp = stage_tp_params(cfg, layout, pp_rank)
    temp = 0.0
    if layout.ac != "none":  # one block recomputed in backward
        temp += block_activation_bytes(cfg, tokens, a, layout.tp, layout.sequence_parallel, "none")
    if dpm == "fsdp":
        temp += 2 * block_p * (a + 4)
        if layout.pp > 1:
            temp += stage_p_tp * a  # reshard_after_forward is off under PP
        if microbatches > 1 and layout.pp == 1:
            temp += stage_p_tp * 4  # unsharded gradients kept across accumulation micro-steps
    elif dpm == "ddp":
        temp += stage_p_tp * 4
    if any(layers[s][2] for s in mine) and not fused_loss_used(layout):  # the logits' gradient
        temp += 4 * tokens * cfg.vocab_size / layout.logit_shards
    memory = {**state, "activations": activations, "temporary": temp}
    memory["total"] = sum(memory.values())
    return memory


def evaluate(cfg: ModelConfig, layout: Layout, hw: Hardware, seq: int, global_batch: int,
             mfu: Optional[float] = None, memory_bytes: Optional[int] = None) -> PlanRow:
    """Memory per GPU (the fullest rank) and step time of one layout (global_batch sequences of seq tokens
    per step). `mfu`: the fraction of peak at which the FLOPs executed run (recomputation included)."""
    mfu = hw.mfu if mfu is None else mfu
    capacity = (memory_bytes or hw.memory_bytes) * (1 - RESERVED_FRACTION)
    local_batch = global_batch // layout.dp
    microbatches = max(1, local_batch // layout.microbatch)
    a = layout.act_bytes
    dpm = ember_data_parallel(layout)
    # --- memory: the first and last pipeline ranks (most in flight; the head) and the largest state
    state, state_rank = max_rank_state(cfg, layout)
    memory = max((rank_memory(cfg, layout, seq, microbatches, r) for r in {0, layout.pp - 1, state_rank}),
                 key=lambda m: m["total"])
    layers, mine = rank_stages(cfg, layout, state_rank)
    n_blocks = sum(len(layers[s][1]) for s in mine)
    tokens = layout.microbatch * seq
    stage_p_tp = stage_tp_params(cfg, layout, state_rank)
    # --- time
    flops_tok = cfg.flops_per_token(seq)
    n_block_mm = cfg.n_layer * sum(math.prod(s) for n, s, _ in _block_params(cfg, 0) if n.endswith("weight") and len(s) == 2)
    block_flops = 6 * n_block_mm + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq
    recompute = block_flops / 3 if layout.ac == "full" else 0.0
    peak = hw.peak_flops.get("bf16" if layout.precision == "fp8" else layout.precision)
    lin = 6 * n_block_mm
    eff = flops_tok + recompute - (lin * (1 - 1 / FP8_LINEAR_SPEEDUP) if layout.precision == "fp8" else 0)
    tokens_step = global_batch * seq
    compute = tokens_step * eff / (layout.world * peak * mfu)
    link_tp = hw.intra_bytes_s if layout.tp <= hw.per_node else hw.inter_bytes_s
    tp_bytes = 0.0
    if layout.tp > 1:
        tp_bytes = n_blocks * microbatches * 8 * (layout.tp - 1) / layout.tp * tokens * cfg.n_embd * a
    tp_time = tp_bytes / link_tp
    pp_time = 0.0
    if layout.pp > 1:
        link = hw.intra_bytes_s if layout.world <= hw.per_node else hw.inter_bytes_s
        pp_time = 2 * microbatches * len(mine) * tokens * cfg.n_embd * a / link
    b = bubble(layout, microbatches)
    dp_time = 0.0
    if dpm != "none":
        inner = layout.tp * layout.dp_shard
        link = hw.intra_bytes_s if inner <= hw.per_node else hw.inter_bytes_s
        ds = layout.dp_shard
        if dpm == "fsdp" and ds > 1:
            gathers = 1 if layout.pp > 1 else (2 * microbatches)
            dp_time += (gathers * a + 4) * stage_p_tp * (ds - 1) / ds / link
        r = layout.dp_replicate if dpm == "fsdp" else layout.dp
        if r > 1:
            link_r = hw.intra_bytes_s if layout.world <= hw.per_node else hw.inter_bytes_s
            dp_time += 2 * (r - 1) / r * stage_p_tp / max(1, ds if dpm == "fsdp" else 1) * 4 / link_r
    dp_exposed = max(0.0, dp_time - compute)
    local_p = state["parameters"] / 4
    opt_time = local_p * 28 / (hw.hbm_bytes_s if not layout.offload else hw.host_bytes_s / 2)
    if layout.offload:
        opt_time += local_p * (a + 4) / hw.host_bytes_s
    step = (compute + tp_time + pp_time) * (1 + b) + dp_exposed + opt_time
    model_flops = tokens_step * flops_tok
    row = PlanRow(layout, memory, step, tokens_step / step, model_flops / (step * layout.world * peak),
                  memory["total"] <= capacity, microbatches,
                  {"compute": compute, "tensor_parallel": tp_time, "pipeline_p2p": pp_time, "bubble_fraction": b,
                   "data_parallel_exposed": dp_exposed, "optimizer": opt_time})
    return row


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


PLAN_SCHEDULES = ("1f1b", "interleaved-1f1b", "zbv")
"""Pipeline schedules `ember plan` weighs (gpipe holds every microbatch: never better than 1f1b)."""


def layouts(cfg: ModelConfig, hw: Hardware, gpus: int, global_batch: int, offload: bool = False,
            precisions: Optional[tuple[str, ...]] = None) -> list[Layout]:
    """Every layout ember can run on `gpus` GPUs for this model and batch: tp within a node and dividing
    the heads, KV heads, MLP width and vocabulary (parallel/tp.check_tp); pp up to the layer count;
    data parallelism as full FSDP, FSDP within a node x replicas across nodes (HSDP), or replicas;
    every microbatch size dividing the local batch; each AC mode and precision; CPU offload (FSDP only)."""
    out = []
    precisions = precisions or hw.precisions
    for tp in _divisors(gpus):
        if tp > hw.per_node or (tp > 1 and (cfg.n_head % tp or cfg.n_kv_head % tp or cfg.ffn_hidden % tp
                                            or cfg.vocab_size % tp)):
            continue
        for pp in _divisors(gpus // tp):
            if pp > cfg.n_layer + 2:
                continue
            dp = gpus // (tp * pp)
            if global_batch % dp:
                continue
            local = global_batch // dp
            shards = sorted({dp, min(dp, max(1, hw.per_node // tp))} | ({1} if dp > 1 else set()))
            for ds in shards:
                if dp % ds:
                    continue
                schedules = PLAN_SCHEDULES if pp > 1 else ("1f1b",)
                for sched, mb, ac, prec in itertools.product(schedules, _divisors(local), AC_MODES, precisions):
                    m = local // mb
                    n_st = pp * stages_per_rank(sched, 2)
                    if pp > 1 and (m < n_st or n_st > cfg.n_layer + 2):
                        continue
                    for off in ((False, True) if offload and ds > 1 else (False,)):
                        out.append(Layout(dp // ds, ds, tp, pp, mb, ac, prec,
                                          "fsdp" if ds > 1 or tp > 1 or pp > 1 else "ddp", sched, 2, True, off))
    return out


def plan(cfg: ModelConfig, hw: Hardware, gpus: int, seq: int, global_batch: int, mfu: Optional[float] = None,
         memory_bytes: Optional[int] = None, offload: bool = False,
         precisions: Optional[tuple[str, ...]] = None, keep: Optional[Callable[[Layout], bool]] = None) -> list[PlanRow]:
    """Every layout (those `keep` accepts), evaluated, ranked: those that fit first, fastest first; then
    the ones that do not fit, smallest first."""
    rows = [evaluate(cfg, lay, hw, seq, global_batch, mfu, memory_bytes)
            for lay in layouts(cfg, hw, gpus, global_batch, offload, precisions) if keep is None or keep(lay)]
    rows.sort(key=lambda r: (not r.fits, r.step_s if r.fits else r.memory["total"]))
    return rows


# ---------------------------------------------------------------------------------- published runs
@dataclass(frozen=True)
class PublishedRun:
    """A training layout someone ran and reported, for `ember plan --published`."""

    name: str
    source: str
    model: str  # an ember preset
    gpu: str
    gpus: int
    seq: int
    global_batch: int
    layout: Layout
    feasible: bool  # what the authors saw: it ran (True) or it does not fit (False)
    tokens_per_gpu_s: Optional[float] = None  # their throughput, where reported
    memory_gib: Optional[float] = None  # their peak memory per GPU, where reported
    gpu_memory_gib: Optional[float] = None  # when their GPUs differ from HARDWARE[gpu]


PUBLISHED = (
    PublishedRun("Megatron-LM GPT-3 175B", "Narayanan et al. 2021 (SC21), PTD-P: TP 8 x PP 8 x DP 16, interleaved",
                 "gpt3-175b", "a100", 1024, 2048, 1536,
                 Layout(16, 1, 8, 8, 1, "full", "bf16", "ddp", "interleaved-1f1b", 2), True),
    PublishedRun("torchtitan Llama 3 8B", "torchtitan docs/performance.md: FSDP 64, selective op AC, local batch 1",
                 "llama-3-8b", "a100", 64, 8192, 64, Layout(1, 64, 1, 1, 1, "selective", "bf16"), True, 2973),
    PublishedRun("torchtitan Llama 3 70B", "torchtitan docs/performance.md: FSDP 64, full AC, local batch 1",
                 "llama-3-70b", "a100", 64, 8192, 64, Layout(1, 64, 1, 1, 1, "full", "bf16"), True, 331),
    PublishedRun("torchtitan Llama 3.1 8B", "torchtitan docs/performance.md Table 1: FSDP 8, selective AC, local "
                 "batch 2, H100 96 GB at 500 W", "llama-3-8b", "h100", 8, 8192, 16,
                 Layout(1, 8, 1, 1, 2, "selective", "bf16"), True, 5762, 82.4, 96),
    PublishedRun("torchtitan Llama 3.1 405B", "torchtitan docs/performance.md: FSDP 16 x TP 8, full AC, local batch 2, "
                 "H100 94 GB", "llama-3.1-405b", "h100", 128, 8192, 32, Layout(1, 16, 8, 1, 2, "full", "bf16"),
                 True, 109, None, 94),
    PublishedRun("405B with FSDP only", "torchtitan docs/performance.md: 1-D FSDP on 128 H100s ran out of memory",
                 "llama-3.1-405b", "h100", 128, 8192, 32, Layout(1, 128, 1, 1, 1, "full", "bf16"), False,
                 None, None, 94),
    PublishedRun("70B, data parallel only", "replicas: each 80 GB GPU would hold the whole 70B state (16 B per parameter)",
                 "llama-3-70b", "h100", 8, 8192, 8, Layout(8, 1, 1, 1, 1, "full", "bf16", "ddp"), False),
    PublishedRun("70B, FSDP on one node", "70B x 16 B of state over 8 x 80 GB",
                 "llama-3-70b", "h100", 8, 8192, 8, Layout(1, 8, 1, 1, 1, "full", "bf16"), False),
)


def check_published(mfu: Optional[float] = None) -> list[dict]:
    """Each published run through `evaluate`: does ember's plan agree on feasibility, and how do its
    memory and throughput compare with the reported ones."""
    from ember.models import preset

    out = []
    for run in PUBLISHED:
        hw = HARDWARE[run.gpu]
        memory = int(run.gpu_memory_gib * GiB) if run.gpu_memory_gib else None
        row = evaluate(preset(run.model), run.layout, hw, run.seq, run.global_batch, mfu, memory)
        out.append({"run": run, "row": row, "agrees": row.fits == run.feasible,
                    "tokens_per_gpu_s": row.tokens_per_s / run.layout.world})
    return out
