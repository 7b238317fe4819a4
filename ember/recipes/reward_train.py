"""Train a reward model on preference pairs: a scalar head on the last real token, Bradley-Terry loss.

    ember reward train --checkpoint runs/sft/final --data.path data/dpo_en_demo.json --train.layers last-2
    ember reward score --checkpoint runs/reward/final --prompt "Is the sky blue?" --completion "Yes."

A recipe on the shared run plumbing: the config, the data (ember.data.pref, the same records as
`ember dpo`) and the objective (train.loss.RewardLoss: -log sigmoid(r_chosen - r_rejected - margin),
optional reward centering; metrics accuracy and margin). `--train.layers last-N|all|lora` as for
classifiers. run_dir/final/ is a checkpoint with head kind "reward", so loading it returns a reward model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ember.data.pref import PrefDataConfig
from ember.errors import EmberError
from ember.log import log
from ember.peft.lora import LoRAConfig
from ember.recipes.classify_train import ClsTrainConfig
from ember.train.loss import RewardConfig
from ember.train.run import RunConfig


@dataclass
class Config(RunConfig):
    """Train a reward model (scalar head) on preference pairs."""

    checkpoint: str = ""
    """The checkpoint whose body the reward model starts from (usually the SFT model)."""
    data: PrefDataConfig = field(default_factory=PrefDataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(r=8, targets=["q", "v"]))
    """Adapters, used with --train.layers lora."""
    train: ClsTrainConfig = field(default_factory=lambda: ClsTrainConfig(
        max_steps=100, batch_size=4, lr=1e-4, min_lr=1e-5, warmup_steps=10, weight_decay=0.0, eval_every=50,
        eval_batches=8, log_every=5, save_every=50, keep_last=1, layers="all"))
    run_dir: str = "runs/reward"
    """Where metrics.jsonl, config.yaml, checkpoints/ and final/ go (an old run is moved aside)."""


def main(cfg: Config) -> int:
    from ember.train.run import launch

    if not cfg.checkpoint or not cfg.data.path:
        raise EmberError("--checkpoint and --data.path are required. HINT: ember reward train --checkpoint DIR "
                         "--data.path pairs.jsonl")
    return launch(cfg, "reward train", _run)


def _run(cfg: Config, dims) -> int:
    import torch

    from ember.data.pref import PairLoader, load_pairs
    from ember.data.sft import SFTStats, split_examples
    from ember.infer.api import load_tokenizer
    from ember.io.checkpoint import load_checkpoint
    from ember.peft.lora import apply_lora, merge_lora
    from ember.recipes.classify_train import _freeze
    from ember.train.loss import RewardLoss
    from ember.train.run import start_run

    base, meta = load_checkpoint(cfg.checkpoint)
    tok = load_tokenizer(cfg.checkpoint, meta, None)
    stats = SFTStats()
    train, val = split_examples(load_pairs(cfg.data.path, tok, cfg.data, stats), cfg.data)
    log(f"data: {stats.records} records -> {len(train)} train / {len(val)} val pairs")
    pad = tok.fill_id
    kw = dict(pad_id=pad, seed=cfg.data.seed, dp_rank=dims.dp_rank, dp_size=dims.dp_size, reward=True)
    train_loader = PairLoader(train, cfg.train.batch_size, **kw)
    val_loader = PairLoader(val, cfg.train.batch_size, **kw) if val else None

    def transform(model):
        model.set_head(1, generator=torch.Generator().manual_seed(cfg.train.seed))
        _freeze(model, cfg.train.layers)
        if cfg.train.layers == "lora":
            apply_lora(model, cfg.lora, seed=cfg.train.seed)
            model.output.requires_grad_(True)

    tok_dir = Path(cfg.checkpoint) / "tokenizer"
    run = start_run(cfg, dims, base.cfg, RewardLoss(cfg.reward), train_loader, val_loader,
                    seq_len=cfg.data.max_length, weights=base.state_dict(), transform=transform,
                    meta={"tokenizer_dir": str(tok_dir) if tok_dir.is_dir() else None})
    summary = run.train()
    if summary["finished"]:
        res = run.trainer.final_eval()
        if cfg.train.layers == "lora":
            merge_lora(run.trainer.model)
        final = run.export(tok_dir if tok_dir.is_dir() else None, head={"kind": "reward"},
                           extra={"val": res, "base": str(cfg.checkpoint), "max_length": cfg.data.max_length})
        if dims.is_main:
            log(f"final reward model: {final}; val accuracy {res.get('accuracy', float('nan')):.4f}, margin "
                f"{res.get('margin', float('nan')):.4f}  (try: ember reward score --checkpoint {final} ...)")
    run.trainer.close()
    return run.exit_code()
