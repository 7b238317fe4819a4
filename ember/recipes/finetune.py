"""Fine-tune a checkpoint on instruction data: full fine-tuning, or LoRA adapters (`--lora.r 8`).

    ember finetune --checkpoint runs/smollm2 --data.path data/alpaca_en_demo.json --lora.r 8
    ember finetune --checkpoint runs/pretrain/final --data.path chats.jsonl --lora.r 16 --lora.targets all-linear --merge
    ember chat --checkpoint runs/finetune/final

A recipe on the shared run plumbing (ember.train.run): the config, the data (ember.data.sft: Alpaca,
chat messages or prompt/completion records, rendered with the model's chat template, labels on the
assistant turns only) and the LM objective (ember.train.loss.LMLoss, which counts valid targets only).
Everything pretraining has works here: DDP/FSDP2, resume, signals, metrics, plots.

Output, run_dir/final/: with LoRA, an adapter checkpoint (ember.json naming the base checkpoint +
adapter/ in PEFT's format, which `peft.PeftModel.from_pretrained` loads onto the base's HF export);
with `--merge` (or full fine-tuning), full merged weights that `ember convert --to-hf` exports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ember.data.sft import SFTDataConfig
from ember.errors import EmberError
from ember.log import log
from ember.peft.lora import LoRAConfig
from ember.train.loop import TrainConfig
from ember.train.loss import LossConfig
from ember.train.run import RunConfig


@dataclass
class Config(RunConfig):
    """Fine-tune a checkpoint on instruction data (full, or LoRA with --lora.r)."""

    checkpoint: str = ""
    """The checkpoint to start from (ember pretrain's final/, or ember convert --from-hf / --from-gguf)."""
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=100, batch_size=8, lr=2e-4, min_lr=2e-5, warmup_steps=10, weight_decay=0.0, eval_every=50,
        eval_batches=8, log_every=5, save_every=50, keep_last=2))
    quant: Literal["none", "nf4"] = "none"
    """QLoRA: store the frozen base's block linears as NF4 (torchao) while the adapters train in fp32."""
    merge: bool = False
    """Write merged full weights to run_dir/final (default with LoRA: the adapter alone, plus a reference
    to the base checkpoint)."""
    run_dir: str = "runs/finetune"
    """Where metrics.jsonl, config.yaml, checkpoints/ and final/ go (an old run is moved aside)."""


def main(cfg: Config) -> int:
    from ember.train.run import launch

    if not cfg.checkpoint:
        raise EmberError("--checkpoint is required: the checkpoint to fine-tune. HINT: ember finetune "
                         "--checkpoint runs/pretrain/final --data.path data.jsonl")
    if not cfg.data.path:
        raise EmberError("--data.path is required: a JSON/JSONL/parquet file of instruction records")
    if cfg.quant != "none" and not cfg.lora.r:
        raise EmberError(f"--quant {cfg.quant} quantizes the frozen base of a LoRA run. HINT: add --lora.r 8")
    return launch(cfg, "finetune", _run)


def _data(cfg: Config, tok, dims):
    from ember.data.sft import SFTLoader, SFTStats, load_examples, split_examples

    stats = SFTStats()
    examples = load_examples(cfg.data.path, tok, cfg.data, stats)
    if cfg.data.val_path:
        train, val = examples, load_examples(cfg.data.val_path, tok, cfg.data, stats)
    else:
        train, val = split_examples(examples, cfg.data)
    log(f"data: {stats.records} records -> {len(train)} train / {len(val)} val examples "
        f"({stats.bad_records} bad records skipped, {stats.all_masked} with nothing to learn skipped, "
        f"{stats.truncated} truncated, {stats.dropped_long} too long dropped)")
    pad = tok.fill_id
    kw = dict(pad_id=pad, max_length=cfg.data.max_length, dp_rank=dims.dp_rank, dp_size=dims.dp_size)
    train_loader = SFTLoader(train, cfg.train.batch_size, pack=cfg.data.pack, seed=cfg.data.seed, **kw)
    val_loader = SFTLoader(val, cfg.train.batch_size, seed=cfg.data.seed, **kw) if val else None
    return train_loader, val_loader


def _run(cfg: Config, dims) -> int:
    from ember.infer.api import load_tokenizer
    from ember.io.checkpoint import load_checkpoint
    from ember.peft.lora import apply_lora
    from ember.train.loss import LMLoss
    from ember.train.run import start_run

    base, meta = load_checkpoint(cfg.checkpoint)
    tok = load_tokenizer(cfg.checkpoint, meta, None)
    mcfg = base.cfg
    if cfg.data.max_length > mcfg.block_size:
        raise EmberError(f"data.max_length={cfg.data.max_length} exceeds the model's context of {mcfg.block_size}. "
                         f"HINT: --data.max-length {mcfg.block_size}")
    train_loader, val_loader = _data(cfg, tok, dims)
    def transform(m):
        apply_lora(m, cfg.lora, seed=cfg.train.seed)
        if cfg.quant == "nf4":
            from ember.peft.qlora import nf4_bytes, quantize_base_nf4

            quantize_base_nf4(m)
            nbytes, params = nf4_bytes(m)
            log(f"QLoRA: {params:,} base weights in NF4, {nbytes / params:.3f} bytes each ({nbytes / 2 ** 20:.1f} MiB)")

    transform = transform if cfg.lora.r else None
    tok_dir = Path(cfg.checkpoint) / "tokenizer"
    run = start_run(cfg, dims, mcfg, LMLoss(cfg.loss), train_loader, val_loader, seq_len=cfg.data.max_length,
                    weights=base.state_dict(), transform=transform,
                    meta={"tokenizer_dir": str(tok_dir) if tok_dir.is_dir() else None, "base": cfg.checkpoint})
    trainable = sum(p.numel() for p in run.trainer.model.parameters() if p.requires_grad)
    log(f"fine-tuning {cfg.checkpoint}: {trainable:,} trainable of {mcfg.num_params():,} parameters "
        f"({'LoRA r=%d on %s' % (cfg.lora.r, ','.join(cfg.lora.roles())) if cfg.lora.r else 'full'})")
    summary = run.train()
    if summary["finished"]:
        val = run.trainer.final_eval()
        _export(cfg, run, base.state_dict(), tok_dir if tok_dir.is_dir() else None, val)
    run.trainer.close()
    return run.exit_code()


def _export(cfg: Config, run, base_sd: dict, tok_dir: Optional[Path], val: dict) -> None:
    """run_dir/final: the adapter checkpoint (LoRA) or merged full weights (--merge / full fine-tuning)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ember.io.adapter import save_adapter
    from ember.io.checkpoint import save_adapter_checkpoint, save_state_dict
    from ember.models import from_state_dict
    from ember.peft.lora import apply_lora, merge_lora

    # collective: every rank takes part; with LoRA only the adapters (the frozen base is the checkpoint's)
    trained = get_model_state_dict(run.trainer.model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=bool(cfg.lora.r)))
    trained = {k: v for k, v in trained.items() if not k.startswith("value_head.")}  # PPO's critic stays behind
    if not run.dims.is_main:
        return
    final = Path(cfg.run_dir) / "final"
    extra = {"step": run.trainer.step, "val_loss": val.get("loss"), "base": str(Path(cfg.checkpoint).resolve())}
    mcfg = _model_cfg(run)
    if not cfg.lora.r:
        save_state_dict(trained, mcfg, final, tokenizer_dir=tok_dir, extra=extra)
        log(f"final checkpoint (full weights): {final}")
        return
    quant = getattr(cfg, "quant", "none")  # also serves ember dpo, which has no QLoRA
    base = _trained_base(base_sd, quant)
    plain = from_state_dict(mcfg, dict(base))
    apply_lora(plain, cfg.lora)
    adapter = {k.replace("_orig_mod.", "").replace("module.", ""): v for k, v in trained.items() if ".lora_" in k}
    missing = plain.load_state_dict(adapter, strict=False).missing_keys
    assert not any(".lora_" in k for k in missing), "adapter tensors missing from the trained model"
    extra["base_quant"] = quant
    if cfg.merge:
        save_adapter(plain, mcfg, cfg.lora, final.with_name("final.adapter"), base=cfg.checkpoint)
        unmerged = None
        if quant == "nf4":
            unmerged = _qlora_model(mcfg, base_sd, plain, cfg)
        merge_lora(plain)
        save_state_dict(plain.state_dict(), mcfg, final, tokenizer_dir=tok_dir, extra=extra)
        log(f"final checkpoint (adapter merged): {final}; the adapter alone (PEFT format): {final}.adapter")
        if unmerged is not None:
            _parity_report(cfg, run, unmerged, plain, base_sd, final)
        return
    save_adapter_checkpoint(final, mcfg, cfg.checkpoint,
                            lambda d: save_adapter(plain, mcfg, cfg.lora, d, base=cfg.checkpoint),
                            tokenizer_dir=tok_dir, extra=extra)
    log(f"final checkpoint (LoRA adapter over {cfg.checkpoint}): {final}  (try: ember chat --checkpoint {final})")


def _trained_base(base_sd: dict, quant: str) -> dict:
    """The base weights the adapter was trained against: NF4 round-tripped block linears under QLoRA."""
    if quant != "nf4":
        return base_sd
    from ember.peft.qlora import dequantized_base

    return dequantized_base(base_sd)


def _qlora_model(mcfg, base_sd: dict, adapted, cfg: Config):
    """The training-time model: the base with NF4 block linears, plus the trained adapter."""
    from ember.models import from_state_dict
    from ember.peft.lora import apply_lora, lora_state_dict
    from ember.peft.qlora import quantize_base_nf4

    m = from_state_dict(mcfg, {k: v.clone() for k, v in base_sd.items()})
    apply_lora(m, cfg.lora)
    quantize_base_nf4(m)
    m.load_state_dict(lora_state_dict(adapted), strict=False)
    return m.eval()


def _parity_report(cfg: Config, run, qlora, merged, base_sd: dict, final: Path) -> None:
    """parity.json beside the merged checkpoint: adapter-on-NF4-base vs merged (and vs merging into the
    original full-precision base), max |dlogit| and held-out perplexity."""
    import json
    import math

    import torch

    from ember.fileio import atomic_write_text
    from ember.models import from_state_dict
    from ember.peft.lora import apply_lora, lora_state_dict, merge_lora
    from ember.train.loss import LMLoss

    naive = from_state_dict(merged.cfg, {k: v.clone() for k, v in base_sd.items()})
    apply_lora(naive, cfg.lora)
    naive.load_state_dict(lora_state_dict(qlora), strict=False)
    merge_lora(naive)
    models = {"qlora (adapter on NF4 base)": qlora, "merged into dequantized base": merged.eval(),
              "merged into original fp32 base": naive.eval()}
    loader = run.trainer.val_loader or run.trainer.train_loader
    batches = list(loader.iter_eval(8)) if hasattr(loader, "iter_eval") else [loader.next_batch()]
    lm, rep, ref_logits = LMLoss(), {}, None
    with torch.no_grad():
        for name, m in models.items():
            tot = w = 0.0
            dmax = 0.0
            for i, b in enumerate(batches):
                out = lm(m, b)
                tot, w = tot + float(out.loss), w + out.weight
                logits = m(b["input_ids"])
                if name == "qlora (adapter on NF4 base)":
                    ref_logits = (ref_logits or []) + [logits]
                else:
                    dmax = max(dmax, float((logits - ref_logits[i]).abs().max()))
            rep[name] = {"held_out_ppl": math.exp(min(tot / max(w, 1), 50)), "max_abs_dlogit_vs_qlora": dmax}
    atomic_write_text(final.parent / "final.parity.json", json.dumps(rep, indent=2) + "\n")
    for name, r in rep.items():
        log(f"  {name:32s} held-out ppl {r['held_out_ppl']:.4f}  max |dlogit| vs qlora {r['max_abs_dlogit_vs_qlora']:.2e}")


def _model_cfg(run):
    from ember.models import ModelConfig

    return ModelConfig.from_dict(run.trainer.ckpt_meta["model_config"])
