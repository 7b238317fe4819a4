"""`ember plan MODEL --gpus N --gpu h100|h200|a100|cpu --seq-len T --global-batch B`: which layouts fit, and how fast.

    ember plan llama-3-8b --gpus 8 --gpu h100 --seq-len 8192 --global-batch 16
    ember plan gpt3-175b --gpus 1024 --gpu a100 --seq-len 2048 --global-batch 1536 --tp 8 --pp 8
    ember plan llama-3-70b --gpus 8 --gpu h100 --seq-len 8192 --global-batch 8 --offload --json

For every layout ember can run (data parallel replicate x shard, tensor, pipeline degree and schedule,
microbatch size, activation checkpointing, precision, CPU offload) it prints the memory per GPU broken
down (parameters, gradients, optimizer state, activations, temporary and communication buffers) and a
step-time estimate (compute at a stated efficiency, each collective over the link it crosses, the
pipeline bubble), ranked fastest first among those that fit. Nothing is built: it is arithmetic
(parallel/plan.py, where the rules are written out); the model-state bytes equal a built model's
local tensors and the activation bytes what autograd saves (tests/test_parallel_layouts.py).
"""

from __future__ import annotations

import json as jsonlib
from dataclasses import dataclass
from typing import Annotated, Literal, Optional

import tyro

from ember.errors import EmberError
from ember.log import log


@dataclass
class Config:
    """Rank the training layouts of a model on N GPUs by memory and step time."""

    model: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="PRESET_OR_DIR")] = "gpt2"
    """A preset name (gpt2, llama-3-8b, llama-3-70b, gpt3-175b, ...) or a checkpoint directory."""
    gpus: int = 8
    """Number of accelerators (tensor parallelism stays within a node)."""
    gpu: Literal["h100", "h200", "a100", "cpu"] = "h100"
    """Accelerator type: its memory, peak FLOP/s per precision and link bandwidths (parallel/plan.HARDWARE)."""
    seq_len: Optional[int] = None
    """Tokens per sequence; default the model's block_size."""
    global_batch: Optional[int] = None
    """Sequences per optimizer step over all GPUs; default one per GPU."""
    mfu: Optional[float] = None
    """Fraction of peak FLOP/s the executed FLOPs run at (recomputation included); default the GPU's
    (0.40 H100/H200, 0.45 A100, 0.5 CPU)."""
    gpu_memory_gib: Optional[float] = None
    """Override the GPU's memory (e.g. 96 for H100s with 96 GB)."""
    precision: Literal["all", "bf16", "fp8", "fp32"] = "all"
    """Only layouts of this precision (all = every precision the GPU runs: bf16 and fp8 on H100/H200)."""
    offload: bool = False
    """Also weigh FSDP2 CPU offload of parameters, gradients and optimizer state."""
    tp: Optional[int] = None
    """Only layouts with this tensor-parallel degree."""
    pp: Optional[int] = None
    """Only layouts with this pipeline-parallel degree."""
    dp_shard: Optional[int] = None
    """Only layouts with this FSDP shard degree (1 = replicas only)."""
    ac: Optional[Literal["none", "selective", "full"]] = None
    """Only layouts with this activation checkpointing."""
    microbatch: Optional[int] = None
    """Only layouts with this many sequences per microbatch."""
    pp_schedule: Optional[Literal["1f1b", "interleaved-1f1b", "zbv"]] = None
    """Only layouts with this pipeline schedule."""
    published: bool = False
    """Instead of planning MODEL: put the published runs ember checks itself against (Megatron-LM's GPT-3
    175B, torchtitan's Llama 3 8B / 70B / 405B, and layouts known not to fit) through the plan and
    print its verdict, memory and throughput beside theirs."""
    top: int = 10
    """Rows to print (--json prints every layout)."""
    json: bool = False
    """Print JSON (every layout, ranked) instead of a table."""


FILTERS = ("tp", "pp", "dp_shard", "ac", "microbatch", "pp_schedule")
"""Config fields that keep only the layouts whose field of the same name has the given value."""


def _check(cfg: Config) -> None:
    if cfg.gpus <= 0:
        raise EmberError(f"--gpus: expected a positive integer, got {cfg.gpus}")
    for name in ("seq_len", "global_batch", "tp", "pp", "dp_shard", "microbatch", "gpu_memory_gib"):
        v = getattr(cfg, name)
        if v is not None and v <= 0:
            raise EmberError(f"--{name.replace('_', '-')}: expected a positive number, got {v}")
    if cfg.mfu is not None and not 0 < cfg.mfu <= 1:
        raise EmberError(f"--mfu: expected a fraction in (0, 1], got {cfg.mfu}")
    if cfg.top <= 0:
        raise EmberError(f"--top: expected a positive integer, got {cfg.top}")


def _keep(cfg: Config):
    given = {n: getattr(cfg, n) for n in FILTERS if getattr(cfg, n) is not None}

    def keep(lay) -> bool:  # a schedule filter does not drop the layouts without a pipeline
        return all(getattr(lay, n) == v for n, v in given.items() if not (n == "pp_schedule" and lay.pp == 1))
    return keep


def _filters(cfg: Config) -> str:
    return ", ".join(f"--{n.replace('_', '-')} {getattr(cfg, n)}" for n in FILTERS if getattr(cfg, n) is not None)


def _gib(n: float) -> str:
    from ember.parallel.plan import GiB

    return f"{n / GiB:.1f}"


def _print_table(rows, title: str, notes: list[str], top: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped: a fixed width, so the output does not depend on the caller
        console.width = 180
    t = Table(title=title)
    for col, just in [("#", "right"), ("dp | tp | pp", "left"), ("mb", "right"), ("AC", "left"), ("prec", "left"),
                      ("params", "right"), ("grads", "right"), ("optim", "right"), ("activ", "right"),
                      ("temp", "right"), ("total GiB", "right"), ("fits", "left"), ("step s", "right"),
                      ("tok/s/GPU", "right"), ("MFU", "right"), ("bubble", "right")]:
        t.add_column(col, justify=just)
    for i, r in enumerate(rows[:top], 1):
        m, lay = r.memory, r.layout
        layout = lay.describe() + (" +offload" if lay.offload else "")
        t.add_row(str(i), layout, str(lay.microbatch), lay.ac, lay.precision, _gib(m["parameters"]),
                  _gib(m["gradients"]), _gib(m["optimizer"]), _gib(m["activations"]), _gib(m["temporary"]),
                  _gib(m["total"]), "yes" if r.fits else "[red]no[/red]", f"{r.step_s:.2f}",
                  f"{r.tokens_per_s / lay.world:,.0f}", f"{100 * r.mfu:.1f}%",
                  f"{100 * r.time['bubble_fraction']:.0f}%")
    console.print(t)
    for line in notes:
        console.print(line, highlight=False)


def _published(cfg: Config) -> int:
    from ember.parallel.plan import check_published

    checks = check_published(cfg.mfu)
    if cfg.json:
        log(jsonlib.dumps([{"name": c["run"].name, "source": c["run"].source, "model": c["run"].model,
                            "gpu": c["run"].gpu, "gpus": c["run"].gpus, "layout": c["row"].to_dict()["layout"],
                            "feasible_reported": c["run"].feasible, "fits_planned": c["row"].fits,
                            "agrees": c["agrees"], "memory_bytes": c["row"].memory,
                            "tokens_per_gpu_s_planned": c["tokens_per_gpu_s"],
                            "tokens_per_gpu_s_reported": c["run"].tokens_per_gpu_s,
                            "memory_gib_reported": c["run"].memory_gib} for c in checks], indent=2))
        return 0 if all(c["agrees"] for c in checks) else 1
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console.width = 180
    t = Table(title="ember plan --published: the plan against published runs")
    for col in ("run", "GPUs", "layout", "AC", "reported", "planned", "agrees", "GiB/GPU planned",
                "GiB reported", "tok/s/GPU planned", "tok/s/GPU reported"):
        t.add_column(col, justify="left" if col in ("run", "layout", "AC") else "right")
    for c in checks:
        run, row = c["run"], c["row"]
        t.add_row(run.name, f"{run.gpus} x {run.gpu}" + (f" {run.gpu_memory_gib:g} GB" if run.gpu_memory_gib else ""),
                  run.layout.describe() + f" mb {run.layout.microbatch}", run.layout.ac,
                  "runs" if run.feasible else "OOM", "fits" if row.fits else "OOM",
                  "yes" if c["agrees"] else "[red]NO[/red]", _gib(row.memory["total"]),
                  f"{run.memory_gib:g}" if run.memory_gib else "-", f"{c['tokens_per_gpu_s']:,.0f}",
                  f"{run.tokens_per_gpu_s:,.0f}" if run.tokens_per_gpu_s else "-")
    console.print(t)
    console.print("Sources: " + "; ".join(f"{c['run'].name}: {c['run'].source}" for c in checks), highlight=False)
    console.print("Throughput at the default efficiency of each GPU (--mfu to change it); bf16.", highlight=False)
    return 0 if all(c["agrees"] for c in checks) else 1


def main(cfg: Config) -> int:
    from ember.parallel.plan import GiB, HARDWARE, RESERVED_FRACTION, plan
    from ember.recipes.model_info import resolve

    if cfg.published:
        return _published(cfg)

    model_cfg, source = resolve(cfg.model)
    _check(cfg)
    hw = HARDWARE[cfg.gpu]
    seq = cfg.seq_len or model_cfg.block_size
    batch = cfg.global_batch or cfg.gpus
    precisions = None if cfg.precision == "all" else (cfg.precision,)
    if precisions and precisions[0] not in hw.peak_flops:
        raise EmberError(f"--precision {cfg.precision}: the {cfg.gpu} has no {cfg.precision} peak in ember's table "
                         f"(it runs {', '.join(hw.precisions)}). HINT: --precision {hw.precisions[0]}")
    memory = int(cfg.gpu_memory_gib * GiB) if cfg.gpu_memory_gib else None
    rows = plan(model_cfg, hw, cfg.gpus, seq, batch, cfg.mfu, memory, cfg.offload, precisions, _keep(cfg))
    if not rows:
        filt = _filters(cfg)
        raise EmberError(f"no layout of {cfg.gpus} GPUs runs {cfg.model} with --global-batch {batch}"
                         + (f" and {filt}" if filt else "") + ": the data-parallel degree must divide the global "
                         "batch, tp the heads, KV heads, MLP width and vocabulary (and stay within a node of "
                         f"{hw.per_node}), pp at most the layers + 2 with at least as many microbatches as stages. "
                         "HINT: a global batch that is a multiple of the GPU count, or fewer filters")
    fits = [r for r in rows if r.fits]
    capacity = (memory or hw.memory_bytes) * (1 - RESERVED_FRACTION)
    header = {"model": cfg.model, "source": source, "gpu": cfg.gpu, "gpus": cfg.gpus, "seq_len": seq,
              "global_batch": batch, "mfu": cfg.mfu or hw.mfu, "gpu_memory_bytes": memory or hw.memory_bytes,
              "usable_bytes": capacity, "layouts": len(rows), "fit": len(fits)}
    if cfg.json:
        log(jsonlib.dumps({**header, "plans": [r.to_dict() for r in rows]}, indent=2))
        return 0
    title = (f"ember plan: {cfg.model} on {cfg.gpus} x {cfg.gpu}, seq {seq}, global batch {batch} "
             f"({len(fits)} of {len(rows)} layouts fit in {capacity / GiB:.1f} GiB usable per GPU)")
    notes = [f"Filters: {_filters(cfg)}." if _filters(cfg) else "",
             f"Step time at {100 * (cfg.mfu or hw.mfu):.0f}% of the {cfg.gpu}'s peak for the FLOPs executed "
             f"(--mfu); MFU counts model FLOPs only (6N + attention), so full AC's recomputation lowers it. "
             f"{100 * RESERVED_FRACTION:.0f}% of memory is kept for the CUDA context, NCCL and fragmentation."]
    if not fits:
        best = rows[0]
        notes.insert(0, f"[red]No layout fits.[/red] The smallest needs {best.memory['total'] / GiB:.1f} GiB per GPU "
                        f"({best.layout.describe()}, {best.layout.ac} AC, microbatch {best.layout.microbatch}). "
                        "HINT: more GPUs, --offload, a shorter --seq-len or a smaller --global-batch")
    _print_table(fits or rows, title, [n for n in notes if n], cfg.top)
    return 0
