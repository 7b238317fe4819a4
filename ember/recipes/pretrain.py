"""Pretrain a model from scratch on token shards (default: the `small` preset on the bundled corpus, ~10 min on 2 CPU cores).

    ember pretrain                                       # bundled corpus, small model, CPU
    ember pretrain --config configs/pretrain/debug.yaml  # a one-minute try
    ember pretrain --resume                              # continue the run in --run-dir from its last checkpoint
    ember pretrain --nproc-per-node 2 --parallel.data-parallel fsdp   # starts torchrun itself

A recipe on the shared run plumbing (ember.train.run): this file is the config, the data (token
shards) and the objective (ember.train.loss.LMLoss); then final eval, export run_dir/final, samples
and the unigram baseline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ember.config import overrides_of, set_overrides
from ember.errors import EmberError
from ember.log import log
from ember.models import ModelConfig, pad_vocab, preset
from ember.train.loop import TrainConfig
from ember.train.loss import LossConfig
from ember.train.run import RunConfig

ModelOverrides = overrides_of(ModelConfig, "ModelOverrides", """Changes to the preset's architecture: any field of
ModelConfig (unset = the preset's value; vocab_size unset = the data's tokenizer, padded to a multiple of 64).""")


@dataclass
class DataConfig:
    """Which token shards to train on."""

    data_dir: Optional[str] = None
    """A prepared shard directory (`ember data prepare --out DIR`) or its URL (s3://, gs://, hf://, any
    fsspec URL: shards are fetched into a local cache as they are needed); None = the bundled corpus
    (prepared on first use)."""
    mix: str = ""
    """Several prepared datasets (same tokenizer) mixed with weights, e.g. 'data/prepared/web:0.7,
    s3://bucket/code:0.3': each row of a batch comes from a dataset with probability its weight
    (normalised); deterministic and exactly resumable. Replaces --data.data-dir."""
    block_size: Optional[int] = None
    """Training sequence length; None = the model's block_size."""
    verify: bool = True
    """Check every shard's checksum when it is first opened (one read of the data; turn off for huge corpora)."""


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
class Config(RunConfig):
    """Pretrain a decoder Transformer on token shards."""

    model_preset: str = "small"
    """Architecture preset (ember.models.PRESETS: tiny, small, gpt2, llama-3.2-1b, ...)."""
    model: ModelOverrides = field(default_factory=ModelOverrides)
    """Per-field changes to the preset (e.g. --model.n-layer 6)."""
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=450, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=30, eval_every=100, eval_batches=8,
        log_every=10, save_every=100, keep_last=2))
    run_dir: str = "runs/pretrain"
    """Where metrics.jsonl, config.yaml, checkpoints/ and final/ go. An old run there (without --resume) is
    moved aside to RUN_DIR.<time> when training starts (never deleted)."""
    samples: SampleConfig = field(default_factory=SampleConfig)


# ----------------------------------------------------------------------------------- pieces
def build_model_config(cfg: Config, data_vocab: Optional[int]) -> ModelConfig:
    """The preset with overrides; vocab from the data (padded to 64) unless given."""
    over = set_overrides(cfg.model)
    if "vocab_size" not in over and data_vocab is not None:
        over["vocab_size"] = pad_vocab(data_vocab)
    try:
        base = preset(cfg.model_preset)
        if "rope_scaling" in over:  # nested: merge with the preset's scaling (or the defaults)
            from ember.models import RopeScaling

            rs = base.rope_scaling.__dict__ if base.rope_scaling is not None else RopeScaling().__dict__
            over["rope_scaling"] = RopeScaling(**{**rs, **over["rope_scaling"]})
        mc = preset(cfg.model_preset, **over)
    except KeyError as e:
        raise EmberError(f"model_preset: {e.args[0]}. HINT: ember model info PRESET shows a preset") from None
    except ValueError as e:
        raise EmberError(f"model: {e}. HINT: fix the --model.* overrides") from None
    if data_vocab is not None and mc.vocab_size < data_vocab:
        raise EmberError(f"model.vocab_size={mc.vocab_size} is smaller than the tokenizer's {data_vocab}. "
                         "HINT: leave --model.vocab-size unset (it follows the data)")
    return mc


def _local(src: str) -> Path:
    """A dataset dir as given, or the local cache of one at a URL (manifest and tokenizer fetched now)."""
    from ember.data import cache, remote

    return cache.cached_dataset(src) if remote.is_url(src) else Path(src)


def _datasets(cfg: Config, dims) -> list[tuple[Path, float]]:
    """The prepared data as (local dir, weight): the --data.mix datasets, --data.data-dir, or the bundled
    corpus (rank 0 prepares it once, the others wait). Datasets at URLs are resolved to their cache once."""
    from ember.data.loader import parse_mix
    from ember.parallel import barrier

    if cfg.data.mix:
        if cfg.data.data_dir:
            raise EmberError("--data.data-dir and --data.mix both given. HINT: put every dataset in --data.mix "
                             "(DIR:WEIGHT,...) and drop --data.data-dir")
        return [(_local(src), w) for src, w in parse_mix(cfg.data.mix)]
    if cfg.data.data_dir:
        return [(_local(cfg.data.data_dir), 1.0)]
    from ember.data.bundled import prepare_default

    if dims.is_main:
        prepare_default()
    barrier(dims)
    return [(Path(prepare_default()), 1.0)]


def _loaders(cfg: Config, dims, datasets: list[tuple[Path, float]], block_size: int):
    from ember.data.loader import MixtureLoader, TokenLoader

    kw = dict(block_size=block_size, batch_size=cfg.train.batch_size, dp_rank=dims.dp_rank, dp_size=dims.dp_size,
              seed=cfg.train.seed, verify=cfg.data.verify)
    if cfg.data.mix:
        sources = [(str(d), w) for d, w in datasets]
        return MixtureLoader(sources, "train", **kw), MixtureLoader(sources, "val", **kw)
    return TokenLoader(datasets[0][0], "train", **kw), TokenLoader(datasets[0][0], "val", **kw)


def _samples(cfg: Config, final_dir: Path) -> None:
    """Generate a few samples from the exported checkpoint (rank 0)."""
    from ember.infer.generate import generate
    from ember.infer.sample import SamplingParams
    from ember.io.checkpoint import load_checkpoint
    from ember.tokenizer import Tokenizer

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


def _finish(cfg: Config, run, summary: dict, val: dict, datasets: list[tuple[Path, float]], tokenizer_dir) -> None:
    from ember.data.stats import train_unigram_entropy
    from ember.fileio import atomic_write_text

    trainer = run.trainer
    final_dir = run.export(tokenizer_dir, extra={"val_loss": val.get("loss")})
    if not run.dims.is_main:
        return
    log(f"final checkpoint: {final_dir}  (try: ember generate --checkpoint {final_dir})")
    if cfg.samples.num > 0 and tokenizer_dir is not None:
        _samples(cfg, final_dir)
    if cfg.data.mix:
        baseline = train_unigram_entropy([d for d, _ in datasets], [w for _, w in datasets])
    else:
        baseline = train_unigram_entropy(datasets[0][0])
    wall = summary["wall_s"]
    lines = [f"steps {trainer.step}, {trainer.tokens_seen:,} tokens, {wall / 60:.1f} min training",
             f"train loss {summary.get('train_loss') or float('nan'):.4f}",
             f"val loss {val.get('loss', float('nan')):.4f} (ppl {val.get('ppl', float('nan')):.1f})",
             f"unigram baseline {baseline:.4f} nats (a model that ignores context)",
             f"throughput {summary.get('tokens_per_s', 0):,.0f} tok/s (run average), MFU {100 * summary.get('mfu', 0):.1f}%"]
    log("done: " + "; ".join(lines))
    result = {"step": trainer.step, "tokens_seen": trainer.tokens_seen, "train_loss": summary.get("train_loss"),
              "val_loss": val.get("loss"), "val_ppl": val.get("ppl"), "unigram_entropy": baseline,
              "tokens_per_s": summary.get("tokens_per_s"), "mfu": summary.get("mfu"), "train_wall_s": wall}
    atomic_write_text(Path(cfg.run_dir) / "result.json", json.dumps(result, indent=2) + "\n")


# ----------------------------------------------------------------------------------- main
def main(cfg: Config) -> int:
    from ember.train.run import launch

    return launch(cfg, "pretrain", _run)


def _run(cfg: Config, dims) -> int:
    from ember.data.shards import read_manifest, tokenizer_dir
    from ember.train.loss import LMLoss
    from ember.train.run import start_run

    datasets = _datasets(cfg, dims)
    data_dir = datasets[0][0]
    vocab = int(read_manifest(data_dir)["vocab_size"])
    mcfg = build_model_config(cfg, vocab)
    seq_len = cfg.data.block_size or mcfg.block_size
    if seq_len > mcfg.block_size:
        raise EmberError(f"data.block_size={seq_len} exceeds the model's block_size {mcfg.block_size}. "
                         "HINT: lower --data.block-size or raise --model.block-size")
    train_loader, val_loader = _loaders(cfg, dims, datasets, seq_len)
    tok_dir = tokenizer_dir(data_dir)
    run = start_run(cfg, dims, mcfg, LMLoss(cfg.loss), train_loader, val_loader, seq_len=seq_len,
                    meta={"tokenizer_dir": str(tok_dir) if tok_dir else None})
    log(f"model: {cfg.model_preset}, {mcfg.num_params():,} params ({mcfg.num_params(embedding=False):,} "
        f"non-embedding), {mcfg.flops_per_token(seq_len) / 1e6:.1f} MFLOP/token; data: {cfg.data.mix or cfg.data.data_dir or data_dir}")
    summary = run.train()
    if summary["finished"]:
        val = run.trainer.final_eval()
        _finish(cfg, run, summary, val, datasets, tok_dir)
    run.trainer.close()
    return run.exit_code()
