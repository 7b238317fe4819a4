"""Pretrain a model from scratch on token shards (default: the `small` preset on the bundled corpus, ~10 min on 2 CPU cores).

    ember pretrain                                       # bundled corpus, small model, CPU
    ember pretrain --config configs/pretrain/debug.yaml  # a one-minute try
    ember pretrain --resume                              # continue the run in --run-dir from its last checkpoint
    ember pretrain --nproc-per-node 2 --parallel.data-parallel fsdp   # starts torchrun itself

Flow: init_distributed -> log config -> data -> model on meta -> parallelize -> materialize ->
AdamW + schedule -> (resume) -> train loop -> final eval -> checkpoint + export run_dir/final ->
samples -> unigram baseline vs val loss.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from ember.errors import EmberError
from ember.log import log, warn
from ember.models import ModelConfig, preset
from ember.parallel import ParallelConfig, launched_by_torchrun
from ember.train.loop import TrainConfig


@dataclass
class ModelOverrides:
    """Changes to the preset's architecture (unset = the preset's value)."""

    vocab_size: Optional[int] = None
    """Embedding rows; None = the data's tokenizer vocabulary, padded up to a multiple of 64."""
    n_layer: Optional[int] = None
    """Number of Transformer blocks."""
    n_embd: Optional[int] = None
    """Residual stream width."""
    n_head: Optional[int] = None
    """Query heads."""
    n_kv_head: Optional[int] = None
    """Key/value heads (GQA/MQA)."""
    ffn_hidden: Optional[int] = None
    """MLP hidden width."""
    block_size: Optional[int] = None
    """Context length (positions); also the training sequence length unless data.block_size is set."""
    dropout: Optional[float] = None
    """Dropout probability (training only)."""
    norm: Optional[Literal["layernorm", "rmsnorm"]] = None
    """Normalisation layer."""
    pos_emb: Optional[Literal["learned", "rope"]] = None
    """Learned positions or RoPE."""
    mlp: Optional[Literal["gelu", "swiglu"]] = None
    """MLP type."""
    bias: Optional[bool] = None
    """Biases in linears and LayerNorm."""
    tie_embeddings: Optional[bool] = None
    """Share the embedding with the output head."""
    rope_theta: Optional[float] = None
    """RoPE base frequency."""
    init_std: Optional[float] = None
    """Std of the weight init."""


@dataclass
class DataConfig:
    """Which token shards to train on."""

    data_dir: Optional[str] = None
    """A prepared shard directory (`ember data prepare --out DIR`); None = the bundled corpus (prepared on first use)."""
    block_size: Optional[int] = None
    """Training sequence length; None = the model's block_size."""


@dataclass
class SampleConfig:
    """Text generated from the trained model at the end of the run."""

    num: int = 3
    """Number of samples printed (0 = none)."""
    max_new_tokens: int = 64
    """Tokens per sample."""
    temperature: float = 0.8
    """Sampling temperature (0 = greedy)."""
    top_k: int = 40
    """Sample among the k most likely tokens."""
    prompts: list[str] = field(default_factory=lambda: ["KING HENRY:", "To be, or not to be", "The "])
    """Prompts, used in turn."""


@dataclass
class Config:
    """Pretrain a decoder Transformer on token shards."""

    model_preset: str = "small"
    """Architecture preset (ember.models.PRESETS: tiny, small, gpt2, llama-3.2-1b, ...)."""
    model: ModelOverrides = field(default_factory=ModelOverrides)
    """Per-field changes to the preset (e.g. --model.n-layer 6)."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=450, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=30, eval_every=100, eval_batches=8,
        log_every=10, save_every=100, keep_last=2))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run_dir: str = "runs/pretrain"
    """Where metrics.jsonl, config.yaml, checkpoints/ and final/ go. An old run there (without --resume) is
    moved aside to RUN_DIR.<time>."""
    resume: bool = False
    """Continue the run in run_dir from its latest checkpoint (same config)."""
    resume_from: Optional[str] = None
    """Continue from this training checkpoint directory (run_dir/checkpoints/step_XXXXXXX)."""
    stop_at: Optional[int] = None
    """Stop after this step with a checkpoint, as if interrupted (the schedule still follows max_steps)."""
    samples: SampleConfig = field(default_factory=SampleConfig)
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (cuda if available)."""
    nproc_per_node: int = 1
    """Processes on this machine; > 1 re-launches this command under torchrun (torch.distributed.run)."""


# ----------------------------------------------------------------------------------- helpers
def pad_vocab(n: int, multiple: int = 64) -> int:
    return multiple * math.ceil(n / multiple)


def build_model_config(cfg: Config, data_vocab: Optional[int]) -> ModelConfig:
    """The preset with overrides; vocab from the data (padded to 64) unless given."""
    over = {k: v for k, v in dataclasses.asdict(cfg.model).items() if v is not None}
    if "vocab_size" not in over and data_vocab is not None:
        over["vocab_size"] = pad_vocab(data_vocab)
    try:
        mc = preset(cfg.model_preset, **over)
    except KeyError as e:
        raise EmberError(f"model_preset: {e.args[0]}. HINT: ember model info PRESET shows a preset") from None
    except ValueError as e:
        raise EmberError(f"model: {e}. HINT: fix the --model.* overrides") from None
    if data_vocab is not None and mc.vocab_size < data_vocab:
        raise EmberError(f"model.vocab_size={mc.vocab_size} is smaller than the tokenizer's {data_vocab}. "
                         "HINT: leave --model.vocab-size unset (it follows the data)")
    return mc


def unigram_entropy(token_counts: torch.Tensor) -> float:
    """Entropy in nats of the unigram distribution given by token counts: the loss of a model that ignores context."""
    p = token_counts.double() / token_counts.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def _relaunch(cfg: Config) -> int:
    """Run this same config under torchrun with nproc_per_node processes (the resolved config goes via YAML)."""
    from ember.config import save_yaml

    _prepare_run_dir(cfg, is_main=True)  # move an old run aside now: the ranks read launch.yaml from run_dir
    launch = Path(cfg.run_dir) / "launch.yaml"
    save_yaml(dataclasses.replace(cfg, nproc_per_node=1), launch)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.nproc_per_node}",
           "-m", "ember", "pretrain", "--config", str(launch)]
    log("launching: " + " ".join(cmd))
    return subprocess.call(cmd)


def _prepare_run_dir(cfg: Config, is_main: bool) -> None:
    run_dir = Path(cfg.run_dir)
    resuming = cfg.resume or cfg.resume_from
    old = [p for p in ("metrics.jsonl", "checkpoints", "final") if (run_dir / p).exists()]
    if is_main and old and not resuming:
        aside = run_dir.with_name(f"{run_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        log(f"{run_dir} held a previous run: moved it to {aside} (pass --resume to continue it instead)")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)


def _resume_path(cfg: Config) -> Optional[Path]:
    from ember.train.state import latest_checkpoint

    if cfg.resume_from:
        return Path(cfg.resume_from)
    if not cfg.resume:
        return None
    found = latest_checkpoint(cfg.run_dir)
    if found is None:
        raise EmberError(f"--resume: no checkpoint in {cfg.run_dir}/checkpoints. HINT: check --run-dir, "
                         "or start without --resume")
    return found


# ----------------------------------------------------------------------------------- main
def main(cfg: Config) -> int:
    if cfg.nproc_per_node > 1 and not launched_by_torchrun():
        return _relaunch(cfg)
    from ember.parallel import destroy_distributed, init_distributed

    dims = init_distributed(cfg.device)
    try:
        return _run(cfg, dims)
    finally:
        destroy_distributed()


def _data_dir(cfg: Config, dims) -> Path:
    """The prepared data: --data.data-dir, or the bundled corpus (rank 0 prepares it once, the others wait)."""
    from ember.parallel import barrier

    if cfg.data.data_dir:
        return Path(cfg.data.data_dir)
    from ember.data.bundled import prepare_default

    if dims.is_main:
        prepare_default()
    barrier(dims)
    return Path(prepare_default())


def _loaders(cfg: Config, dims, data_dir: Path, block_size: int):
    from ember.data.loader import TokenLoader

    kw = dict(block_size=block_size, batch_size=cfg.train.batch_size, dp_rank=dims.dp_rank, dp_size=dims.dp_size,
              seed=cfg.train.seed)
    return TokenLoader(data_dir, "train", **kw), TokenLoader(data_dir, "val", **kw)


def _tokenizer_dir(data_dir: Path) -> Optional[Path]:
    from ember.data.shards import read_manifest

    tok = read_manifest(data_dir).get("tokenizer")
    return (data_dir / tok) if tok and (data_dir / tok).is_dir() else None


def _build_trainer(cfg: Config, dims, mcfg: ModelConfig, train_loader, val_loader, tokenizer_dir, seq_len: int):
    from ember.config import to_dict
    from ember.models import Transformer
    from ember.parallel import materialize, parallelize
    from ember.train.loop import Trainer
    from ember.train.optim import build_optimizer, build_scheduler

    tc = cfg.train
    with torch.device("meta"):
        model = Transformer(mcfg)
    model = parallelize(model, dims, cfg.parallel)
    materialize(model, dims, seed=tc.seed)
    torch.manual_seed(tc.seed + 1 + dims.rank)  # dropout streams: distinct per rank, fixed per seed
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, tc.betas, tc.eps)
    scheduler = build_scheduler(optimizer, tc)
    meta = {"model_config": mcfg.to_dict(), "config": to_dict(cfg),
            "tokenizer_dir": str(tokenizer_dir) if tokenizer_dir else None}
    return Trainer(model, optimizer, scheduler, train_loader, val_loader, tc, dims, parallel=cfg.parallel,
                   run_dir=cfg.run_dir, flops_per_token=mcfg.flops_per_token(seq_len), ckpt_meta=meta)


def _check_resume(ckpt: Path, mcfg: ModelConfig) -> None:
    from ember.train.state import read_trainer_meta

    saved = read_trainer_meta(ckpt).get("model_config")
    if saved and saved != mcfg.to_dict():
        diff = sorted(k for k in saved if saved.get(k) != mcfg.to_dict().get(k))
        raise EmberError(f"{ckpt}: the checkpoint's model differs from this run's in {diff}. "
                         "HINT: resume with the same --model-preset / --model.* flags (see RUN_DIR/config.yaml)")


def train_unigram_entropy(data_dir: Path) -> float:
    """Unigram entropy (nats) of the train split's tokens: the loss of the best context-free model."""
    import numpy as np

    from ember.data.shards import read_manifest, read_shard, split_files

    m = read_manifest(data_dir)
    counts = np.zeros(int(m["vocab_size"]), dtype=np.int64)
    for entry in split_files(data_dir, "train", m):
        counts += np.bincount(np.asarray(read_shard(Path(data_dir) / entry["file"])), minlength=len(counts))[:len(counts)]
    return unigram_entropy(torch.from_numpy(counts))


def _samples(cfg: Config, final_dir: Path) -> None:
    """Generate a few samples from the exported checkpoint (rank 0)."""
    from ember.infer.generate import generate
    from ember.infer.sample import SamplingParams
    from ember.tokenizer import Tokenizer
    from ember.train.checkpoint import load_checkpoint

    model, _ = load_checkpoint(final_dir)
    tok = Tokenizer.load(final_dir / "tokenizer")
    prompts = [cfg.samples.prompts[i % len(cfg.samples.prompts)] for i in range(cfg.samples.num)]
    ids = [tok.encode(p) or [tok.eos_id] for p in prompts]
    n_new = min(cfg.samples.max_new_tokens, model.cfg.block_size - max(len(i) for i in ids))
    params = SamplingParams(temperature=cfg.samples.temperature, top_k=cfg.samples.top_k)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    outs = generate(model, ids, n_new, params, stop_ids=[tok.eos_id], generator=gen, vocab_limit=tok.vocab_size)
    for prompt, out in zip(prompts, outs):
        out = out[:-1] if out and out[-1] == tok.eos_id else out
        log(f"--- sample (prompt {prompt!r}) ---\n{prompt}{tok.decode(out)}")


def _finish(cfg: Config, dims, trainer, summary: dict, val: dict, data_dir: Path, tokenizer_dir, wall: float) -> None:
    from ember.train.state import export_final

    final_dir = Path(cfg.run_dir) / "final"
    export_final(trainer.model, final_dir, tokenizer_dir,
                 extra={"step": trainer.step, "tokens_seen": trainer.tokens_seen, "val_loss": val.get("loss")})
    if not dims.is_main:
        return
    log(f"final checkpoint: {final_dir}  (try: ember generate --checkpoint {final_dir})")
    if cfg.samples.num > 0 and tokenizer_dir is not None:
        _samples(cfg, final_dir)
    baseline = train_unigram_entropy(data_dir)
    lines = [f"steps {trainer.step}, {trainer.tokens_seen:,} tokens, {wall / 60:.1f} min training",
             f"train loss {summary.get('train_loss') or float('nan'):.4f}",
             f"val loss {val.get('loss', float('nan')):.4f} (ppl {val.get('ppl', float('nan')):.1f})",
             f"unigram baseline {baseline:.4f} nats (a model that ignores context)",
             f"throughput {summary.get('tokens_per_s', 0):,.0f} tok/s (run average), MFU {100 * summary.get('mfu', 0):.1f}%"]
    log("done: " + "; ".join(lines))
    from ember.fileio import atomic_write_text
    import json

    result = {"step": trainer.step, "tokens_seen": trainer.tokens_seen, "train_loss": summary.get("train_loss"),
              "val_loss": val.get("loss"), "val_ppl": val.get("ppl"), "unigram_entropy": baseline,
              "tokens_per_s": summary.get("tokens_per_s"), "mfu": summary.get("mfu"), "train_wall_s": wall}
    atomic_write_text(Path(cfg.run_dir) / "result.json", json.dumps(result, indent=2) + "\n")


def _run(cfg: Config, dims) -> int:
    from ember.parallel import barrier
    from ember.train.log import log_run_start

    _prepare_run_dir(cfg, dims.is_main)
    barrier(dims)
    data_dir = _data_dir(cfg, dims)
    from ember.data.shards import read_manifest

    vocab = int(read_manifest(data_dir)["vocab_size"])
    mcfg = build_model_config(cfg, vocab)
    seq_len = cfg.data.block_size or mcfg.block_size
    if seq_len > mcfg.block_size:
        raise EmberError(f"data.block_size={seq_len} exceeds the model's block_size {mcfg.block_size}. "
                         "HINT: lower --data.block-size or raise --model.block-size")
    log_run_start(cfg, cfg.run_dir, world_size=dims.world_size, device=str(dims.device))
    log(f"model: {cfg.model_preset}, {mcfg.num_params():,} params ({mcfg.num_params(embedding=False):,} "
        f"non-embedding), {mcfg.flops_per_token(seq_len) / 1e6:.1f} MFLOP/token; data: {data_dir}")
    train_loader, val_loader = _loaders(cfg, dims, data_dir, seq_len)
    tokenizer_dir = _tokenizer_dir(data_dir)
    trainer = _build_trainer(cfg, dims, mcfg, train_loader, val_loader, tokenizer_dir, seq_len)
    ckpt = _resume_path(cfg)
    if ckpt is not None:
        _check_resume(ckpt, mcfg)
        trainer.resume(ckpt)
    t0 = time.perf_counter()
    try:
        summary = trainer.fit(until=cfg.stop_at)
    except KeyboardInterrupt:
        if dims.world_size == 1 and trainer.step > 0:  # multi-rank: the ranks may be mid-collective
            trainer.save()
            log(f"\ninterrupted: saved step {trainer.step}; run the same command with --resume to continue")
        raise
    if trainer.step > 0:
        trainer.save()
    if trainer.step < cfg.train.max_steps:
        log(f"stopped at step {trainer.step} (--stop-at): to continue, run the same command with --resume")
        trainer.close()
        return 0
    val = trainer.final_eval()
    trainer.close()
    _finish(cfg, dims, trainer, summary, val, data_dir, tokenizer_dir, time.perf_counter() - t0)
    return 0
