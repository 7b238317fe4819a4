"""Parameters, FLOPs per token and training memory of a model preset or a checkpoint directory.

    ember model info gpt2
    ember model info llama-3-70b --seq-len 4096 --json
    ember model info runs/pretrain/step_001000        # a checkpoint dir (reads its ember.json)

The model is built on the meta device (no memory, instant even for llama-3-70b) and its parameters
are counted from the built modules (tied embeddings counted once).
"""

from __future__ import annotations

import json as jsonlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import torch
import tyro

from ember.errors import EmberError
from ember.log import log
from ember.models import PRESETS, ModelConfig, Transformer, preset

# Memory convention, in bytes per parameter (activations excluded):
#   fp32: weights 4 + grads 4 + AdamW moments (m, v in fp32) 8                     = 16 B/param
#   bf16: weights 2 + grads 2 + fp32 master weights 4 + AdamW moments (fp32) 8     = 16 B/param
BYTES_PER_PARAM = {
    "fp32": {"weights": 4, "gradients": 4, "master_weights": 0, "adamw_moments": 8},
    "bf16": {"weights": 2, "gradients": 2, "master_weights": 4, "adamw_moments": 8},
}
MEMORY_CONVENTION = ("fp32: fp32 weights + fp32 grads + 2 fp32 AdamW moments. "
                     "bf16: bf16 weights + bf16 grads + fp32 master weights + 2 fp32 AdamW moments. "
                     "Activations excluded.")


@dataclass
class Config:
    """Parameters, FLOPs per token and training memory of a preset or checkpoint."""

    model: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="PRESET_OR_DIR")] = "tiny"
    """A preset name (tiny, gpt2, llama-3-8b, ...) or a checkpoint directory holding ember.json."""
    seq_len: Optional[int] = None
    """Sequence length used for the attention FLOPs; default the model's block_size."""
    json: bool = False
    """Print the numbers as JSON instead of tables."""


# --------------------------------------------------------------------------------- computation
def _param_groups(model: Transformer) -> dict[str, int]:
    """Parameter counts by component, shared tensors counted once."""
    groups = {"embedding": 0, "attention": 0, "mlp": 0, "norm": 0, "head": 0}
    seen = set()
    for name, p in model.named_parameters():  # named_parameters() already yields a tied tensor once
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.startswith(("tok_embeddings.", "pos_embeddings.")):
            key = "embedding"
        elif name.startswith("output."):
            key = "head"
        elif ".attention." in name:
            key = "attention"
        elif ".feed_forward." in name:
            key = "mlp"
        else:
            key = "norm"
        groups[key] += p.numel()
    return groups


def model_stats(cfg: ModelConfig, seq_len: Optional[int] = None) -> dict:
    """Counts, FLOPs per token and memory for `cfg` (the model is built on the meta device)."""
    T = seq_len or cfg.block_size
    with torch.device("meta"):
        model = Transformer(cfg)
    total, non_emb = model.num_params(), model.num_params(embedding=False)
    # matmul params: every weight a token's activations are multiplied by, incl. a tied head
    n_matmul = non_emb + (cfg.vocab_size * cfg.n_embd if cfg.tie_embeddings else 0)
    attn_fwd = 4 * cfg.n_layer * cfg.n_head * cfg.head_dim * T  # QK^T and AV, 2 FLOPs per MAC
    memory = {}
    for dtype, per in BYTES_PER_PARAM.items():
        parts = {k: v * total for k, v in per.items()}
        memory[dtype] = {**parts, "total": sum(parts.values())}
    return {
        "config": cfg.to_dict(),
        "params": {"total": total, "embedding": total - non_emb, "non_embedding": non_emb,
                   "matmul": n_matmul, "by_component": _param_groups(model)},
        "flops_per_token": {"seq_len": T, "train": cfg.flops_per_token(T),
                            "forward": 2 * n_matmul + attn_fwd,
                            "train_formula": "6 * N_matmul + 12 * n_layer * n_head * head_dim * seq_len",
                            "forward_formula": "2 * N_matmul + 4 * n_layer * n_head * head_dim * seq_len"},
        "memory_bytes": memory,
        "memory_convention": MEMORY_CONVENTION,
    }


# --------------------------------------------------------------------------------- resolving
def resolve(name_or_dir: str) -> tuple[ModelConfig, str]:
    """(ModelConfig, where it came from) for a preset name or a checkpoint directory."""
    path = Path(name_or_dir)
    is_ckpt = (path / "ember.json").is_file()
    if is_ckpt or (name_or_dir not in PRESETS and (path.exists() or "/" in name_or_dir)):
        from ember.io.checkpoint import model_config, read_meta  # lazy: only this branch needs it

        meta = read_meta(path)  # errors name ember.json and say how to fix it
        return model_config(meta, path), f"checkpoint {path} ({meta.get('dtype', '?')} weights)"
    try:
        return preset(name_or_dir), f"preset {name_or_dir}"
    except KeyError as e:
        raise EmberError(f"'{name_or_dir}': not a checkpoint directory, and {e.args[0]}. "
                         "HINT: pass a preset name or a directory holding ember.json") from None


# --------------------------------------------------------------------------------- output
def _num(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _bytes(n: float) -> str:
    for div, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def _arch_rows(cfg: ModelConfig) -> list[tuple[str, str]]:
    K, H = cfg.n_kv_head, cfg.n_head
    kind = "MHA" if K == H else ("MQA" if K == 1 else f"GQA ({H // K} q heads per kv head)")
    pos = cfg.pos_emb if cfg.pos_emb == "learned" else f"rope (theta {cfg.rope_theta:g})"
    if cfg.rope_scaling is not None:
        pos += f", llama3 scaling x{cfg.rope_scaling.factor:g}"
    return [("layers", str(cfg.n_layer)), ("width (n_embd)", str(cfg.n_embd)),
            ("heads (q / kv)", f"{H} / {K}  {kind}"), ("head_dim", str(cfg.head_dim)),
            ("mlp", f"{cfg.mlp}, hidden {cfg.ffn_hidden}"), ("norm", cfg.norm), ("positions", pos),
            ("vocab", str(cfg.vocab_size)), ("block_size", str(cfg.block_size)),
            ("tied embeddings", str(cfg.tie_embeddings)), ("bias", str(cfg.bias)), ("mask", cfg.mask)]


def _print_tables(stats: dict, cfg: ModelConfig, source: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped: a fixed width, so the output does not depend on the caller
        console.width = 100
    arch = Table(title="ember model info", show_header=False)
    for k, v in [("source", source), *_arch_rows(cfg)]:
        arch.add_row(k, v)
    console.print(arch)

    p = stats["params"]
    params = Table(title="parameters (tied embeddings counted once)")
    params.add_column("group")
    params.add_column("count", justify="right")
    params.add_column("exact", justify="right")
    rows = [("total", p["total"]), ("embedding (token + position)", p["embedding"]),
            ("non-embedding", p["non_embedding"])]
    rows += [(f"  {k}", v) for k, v in p["by_component"].items() if k != "embedding"]
    for k, v in rows:
        params.add_row(k, _num(v), f"{v:,}")
    console.print(params)

    f = stats["flops_per_token"]
    flops = Table(title=f"FLOPs per token at seq_len {f['seq_len']}")
    flops.add_column("pass")
    flops.add_column("FLOPs/token", justify="right")
    flops.add_column("formula")
    flops.add_row("training (fwd + bwd)", _num(f["train"]), f["train_formula"])
    flops.add_row("inference forward", _num(f["forward"]), f["forward_formula"])
    console.print(flops)

    m = stats["memory_bytes"]
    mem = Table(title="training memory, excluding activations")
    mem.add_column("")
    for dtype in m:
        mem.add_column(dtype, justify="right")
    for key in ("weights", "gradients", "master_weights", "adamw_moments", "total"):
        mem.add_row(key.replace("_", " "), *(_bytes(m[d][key]) for d in m))
    console.print(mem)
    console.print(f"Convention: {stats['memory_convention']} N_matmul = non-embedding params + a tied head "
                  f"({_num(p['matmul'])}).", highlight=False)


def main(cfg: Config) -> int:
    if cfg.seq_len is not None and cfg.seq_len <= 0:
        raise EmberError(f"--seq-len: expected a positive integer, got {cfg.seq_len}")
    model_cfg, source = resolve(cfg.model)
    stats = model_stats(model_cfg, cfg.seq_len)
    if cfg.json:
        log(jsonlib.dumps({"source": source, **stats}, indent=2))
    else:
        _print_tables(stats, model_cfg, source)
    return 0
