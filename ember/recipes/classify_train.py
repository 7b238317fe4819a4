"""Train a text classifier from a checkpoint: the LM head replaced by a classifier over the last real token.

    ember classify train --checkpoint runs/smollm2 --data.path data/sms-spam.csv --data.text-field text \\
        --data.label-field spam --data.balance --train.layers last-2
    ember classify eval --checkpoint runs/classify/final --split test
    ember classify predict --checkpoint runs/classify/final --text "WINNER! Claim your prize now"

A recipe on the shared run plumbing: the config, the data (ember.data.cls: CSV/JSONL/parquet, seeded
stratified train/val/test splits, optional balancing) and the objective (train.loss.ClassifierLoss:
cross-entropy at the last real token; padding is never pooled). `--train.layers`: `last-N` trains the
last N blocks, the final norm and the head; `all` everything; `lora` adapters (`--lora.*`) and the head.
run_dir/final/ is a classifier checkpoint (head kind "classifier" with its class names; LoRA merged),
with the data settings it was trained with, so `classify eval` finds the same test split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ember.data.cls import ClsDataConfig
from ember.errors import EmberError
from ember.log import log
from ember.peft.lora import LoRAConfig
from ember.train.loop import TrainConfig
from ember.train.run import RunConfig


@dataclass
class ClsTrainConfig(TrainConfig):
    """The training loop, plus which weights a classifier trains."""

    layers: str = "last-2"
    """Which weights train: last-N (the last N blocks, the final norm and the head), all, or lora."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.layers in ("all", "lora") or (self.layers.startswith("last-") and self.layers[5:].isdigit())):
            raise ValueError(f"train.layers={self.layers!r}: expected last-N (e.g. last-2), all or lora")


@dataclass
class Config(RunConfig):
    """Train a classifier head (and some layers) on labelled text."""

    checkpoint: str = ""
    """The checkpoint whose body the classifier starts from (a language model)."""
    data: ClsDataConfig = field(default_factory=ClsDataConfig)
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(r=8, targets=["q", "v"]))
    """Adapters, used with --train.layers lora."""
    train: ClsTrainConfig = field(default_factory=lambda: ClsTrainConfig(
        max_steps=200, batch_size=8, lr=1e-4, min_lr=1e-5, warmup_steps=10, weight_decay=0.0, eval_every=50,
        eval_batches=20, log_every=10, save_every=100, keep_last=1))
    run_dir: str = "runs/classify"
    """Where metrics.jsonl, config.yaml, checkpoints/ and final/ go (an old run is moved aside)."""


def main(cfg: Config) -> int:
    from ember.train.run import launch

    if not cfg.checkpoint or not cfg.data.path:
        raise EmberError("--checkpoint and --data.path are required. HINT: ember classify train --checkpoint DIR "
                         "--data.path FILE --data.text-field T --data.label-field L")
    return launch(cfg, "classify train", _run)


def load_splits(data: ClsDataConfig, tok, names=None, which: tuple = ("train", "val", "test")):
    """(class names, {split: [(ids, class)]}) of a data config (the same split every time); `which` may also
    name "all": every record in file order."""
    from ember.data.cls import encode, label_names, read_labelled, split_labelled

    records = read_labelled(data.path, data.text_field, data.label_field)
    names = names or label_names([label for _, label in records])
    unknown = sorted({str(lab) for _, lab in records} - set(names))
    if unknown:
        raise EmberError(f"{data.path}: labels {unknown[:5]} are not among the classifier's classes {names}")
    splits = split_labelled(records, names, data)
    index = {n: i for i, n in enumerate(names)}
    splits["all"] = [(t, index[str(lab)]) for t, lab in records]
    return names, {k: encode(tok, splits[k], data.max_length) for k in which}


def _freeze(model, layers: str) -> None:
    """requires_grad for what --train.layers trains (the head always)."""
    if layers == "all":
        return
    model.requires_grad_(False)
    if layers.startswith("last-"):
        n = int(layers[5:])
        blocks = list(model.layers.values())
        for b in blocks[len(blocks) - n:]:
            b.requires_grad_(True)
        if model.norm is not None:
            model.norm.requires_grad_(True)
    model.output.requires_grad_(True)


def _run(cfg: Config, dims) -> int:
    import torch

    from ember.config import to_dict
    from ember.data.cls import ClsLoader
    from ember.infer.api import load_tokenizer
    from ember.io.checkpoint import load_checkpoint
    from ember.peft.lora import apply_lora, merge_lora
    from ember.train.loss import ClassifierLoss
    from ember.train.run import start_run

    base, meta = load_checkpoint(cfg.checkpoint)
    tok = load_tokenizer(cfg.checkpoint, meta, None)
    names, splits = load_splits(cfg.data, tok)
    log(f"classes {names}: {len(splits['train'])} train / {len(splits['val'])} val / {len(splits['test'])} test")
    pad = tok.fill_id
    kw = dict(pad_id=pad, seed=cfg.data.seed, dp_rank=dims.dp_rank, dp_size=dims.dp_size)
    train = ClsLoader(splits["train"], cfg.train.batch_size, **kw)
    val = ClsLoader(splits["val"], cfg.train.batch_size, **kw) if splits["val"] else None

    def transform(model):
        model.set_head(len(names), generator=torch.Generator().manual_seed(cfg.train.seed))
        _freeze(model, cfg.train.layers)
        if cfg.train.layers == "lora":
            apply_lora(model, cfg.lora, seed=cfg.train.seed)
            model.output.requires_grad_(True)

    tok_dir = Path(cfg.checkpoint) / "tokenizer"
    run = start_run(cfg, dims, base.cfg, ClassifierLoss(), train, val, seq_len=cfg.data.max_length,
                    weights=base.state_dict(), transform=transform,
                    meta={"tokenizer_dir": str(tok_dir) if tok_dir.is_dir() else None})
    trainable = sum(p.numel() for p in run.trainer.model.parameters() if p.requires_grad)
    log(f"classifier over {cfg.checkpoint}: {trainable:,} trainable parameters ({cfg.train.layers})")
    summary = run.train()
    if summary["finished"]:
        res = run.trainer.final_eval()
        model = run.trainer.model
        if cfg.train.layers == "lora":
            merge_lora(model)  # a classifier checkpoint holds full weights
        head = {"kind": "classifier", "num_classes": len(names), "labels": names}
        final = run.export(tok_dir if tok_dir.is_dir() else None, head=head,
                           extra={"val": res, "data": to_dict(cfg.data), "base": str(cfg.checkpoint),
                                  "train_wall_s": summary["wall_s"]})
        if dims.is_main:
            log(f"final classifier: {final}; val accuracy {res.get('accuracy', float('nan')):.4f}; training took "
                f"{summary['wall_s'] / 60:.1f} min  (try: ember classify eval --checkpoint {final} --split test)")
    run.trainer.close()
    return run.exit_code()
