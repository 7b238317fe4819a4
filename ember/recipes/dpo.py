"""Direct preference optimisation of a checkpoint on prompt + chosen + rejected pairs.

    ember dpo --checkpoint runs/smollm2 --data.path data/dpo_en_demo.json --lora.r 8 --dpo.beta 0.1
    ember dpo --checkpoint runs/sft/final --data.path pairs.jsonl --dpo.loss ipo      # full, frozen reference

A recipe on the shared run plumbing: the config, the data (ember.data.pref: TRL's prompt/chosen/rejected
or ShareGPT-style records, chat-templated, log-probs over completion tokens only) and the objective
(train.loss.DPOLoss: sigmoid / ipo / hinge / robust, label smoothing). The reference is the checkpoint
itself: with LoRA, the policy with its adapters disabled (no second copy in memory); without, a frozen
copy given to the Trainer (never in the optimizer or the checkpoints). Policy and reference run with
dropout off in the same dtype, and before the first step the step-0 invariants are checked: while the
policy equals the reference the loss is ln 2 and both rewards are 0; if not, the run stops and says why.
Metrics are named as TRL names them (rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies, logps/chosen, logps/rejected). Output as `ember finetune` writes it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from ember.data.pref import PrefDataConfig
from ember.errors import EmberError
from ember.log import log
from ember.peft.lora import LoRAConfig
from ember.train.loop import TrainConfig
from ember.train.loss import DPOConfig
from ember.train.run import RunConfig


@dataclass
class Config(RunConfig):
    """DPO (and IPO / hinge / robust) on preference pairs."""

    checkpoint: str = ""
    """The checkpoint to align (the reference model too)."""
    data: PrefDataConfig = field(default_factory=PrefDataConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=100, batch_size=4, lr=5e-6, min_lr=5e-7, warmup_steps=10, weight_decay=0.0, eval_every=50,
        eval_batches=8, log_every=5, save_every=50, keep_last=2))
    merge: bool = False
    """With LoRA: write merged full weights to run_dir/final (default: the adapter over the base)."""
    run_dir: str = "runs/dpo"
    """Where metrics.jsonl, config.yaml, checkpoints/ and final/ go (an old run is moved aside)."""


def main(cfg: Config) -> int:
    from ember.train.run import launch

    if not cfg.checkpoint or not cfg.data.path:
        raise EmberError("--checkpoint and --data.path are required. HINT: ember dpo --checkpoint DIR "
                         "--data.path pairs.jsonl")
    return launch(cfg, "dpo", _run)


def check_step0(loss_fn, model, batch: dict, cfg: DPOConfig, reference) -> dict:
    """At step 0 (policy == reference): loss ln 2 (sigmoid, no smoothing) and rewards 0, else say why."""
    import torch

    out = loss_fn(model, batch)
    n = out.weight
    chosen, rejected = float(out.metrics["rewards/chosen"]) / n, float(out.metrics["rewards/rejected"]) / n
    loss = float(out.loss.detach()) / n
    tol = 1e-4 * max(1.0, abs(float(out.metrics["logps/chosen"]) / n))
    ok = abs(chosen) <= tol and abs(rejected) <= tol
    if cfg.loss == "sigmoid" and cfg.label_smoothing == 0:
        ok = ok and abs(loss - math.log(2)) <= 1e-4
    if ok:
        return {"loss": loss, "rewards/chosen": chosen, "rewards/rejected": rejected}
    drop = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training]
    ref_dtype = next(reference.parameters()).dtype if reference is not None else None
    pol_dtype = next(p for p in model.parameters()).dtype
    if drop:
        why = f"dropout is on in the policy ({len(drop)} Dropout modules with p > 0): set --model dropout to 0"
    elif ref_dtype is not None and ref_dtype != pol_dtype:
        why = f"the policy computes in {pol_dtype} and the reference in {ref_dtype}"
    else:
        why = "the policy and the reference see different inputs or masks (or they are not the same weights)"
    raise EmberError(f"DPO step-0 check failed: rewards {chosen:.3g} / {rejected:.3g} (expected 0) and loss "
                     f"{loss:.6f} (expected ln 2 = 0.693147) while policy == reference: {why}")


def _run(cfg: Config, dims) -> int:
    import torch

    from ember.data.pref import PairLoader, load_pairs
    from ember.data.sft import SFTStats, split_examples
    from ember.infer.api import load_tokenizer
    from ember.io.checkpoint import load_checkpoint
    from ember.peft.lora import apply_lora
    from ember.recipes.finetune import _export
    from ember.train.loss import DPOLoss
    from ember.train.run import start_run

    base, meta = load_checkpoint(cfg.checkpoint)
    tok = load_tokenizer(cfg.checkpoint, meta, None)
    mcfg = dataclasses.replace(base.cfg, dropout=0.0)  # policy and reference: dropout off
    stats = SFTStats()
    pairs = load_pairs(cfg.data.path, tok, cfg.data, stats)
    train, val = split_examples(pairs, cfg.data)
    log(f"data: {stats.records} records -> {len(train)} train / {len(val)} val pairs ({stats.bad_records} bad "
        f"skipped, {stats.all_masked} without a completion skipped, {stats.truncated} truncated)")
    pad = tok.fill_id
    kw = dict(pad_id=pad, seed=cfg.data.seed, dp_rank=dims.dp_rank, dp_size=dims.dp_size)
    train_loader = PairLoader(train, cfg.train.batch_size, **kw)
    val_loader = PairLoader(val, cfg.train.batch_size, **kw) if val else None
    base_sd = base.state_dict()
    frozen = None if cfg.lora.r else {"reference": (mcfg, base_sd)}
    transform = (lambda m: apply_lora(m, cfg.lora, seed=cfg.train.seed)) if cfg.lora.r else None
    loss_fn = DPOLoss(cfg.dpo)
    tok_dir = Path(cfg.checkpoint) / "tokenizer"
    run = start_run(cfg, dims, mcfg, loss_fn, train_loader, val_loader, seq_len=cfg.data.max_length,
                    weights=base_sd, transform=transform, frozen=frozen,
                    meta={"tokenizer_dir": str(tok_dir) if tok_dir.is_dir() else None, "base": cfg.checkpoint})
    loss_fn.reference = run.trainer.frozen.get("reference")
    if run.resume_from is None:
        first = next(iter(val_loader.iter_eval(1))) if val_loader is not None else train_loader.collate(train[:4])
        run.trainer.model.train()
        with torch.no_grad():
            s0 = check_step0(loss_fn, run.trainer.model, first, cfg.dpo, loss_fn.reference)
        log(f"step-0 check passed: loss {s0['loss']:.6f} (ln 2 = 0.693147), rewards {s0['rewards/chosen']:.1e} / "
            f"{s0['rewards/rejected']:.1e}")
    summary = run.train()
    if summary["finished"]:
        val_res = run.trainer.final_eval()
        _export(cfg, run, base_sd, tok_dir if tok_dir.is_dir() else None, val_res)
    run.trainer.close()
    return run.exit_code()
