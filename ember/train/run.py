"""Run plumbing shared by every training recipe: a recipe is its config, its data and its `loss_fn`.

    cfg = parse(Config)                      # a dataclass that composes RunConfig's fields
    return launch(cfg, "pretrain", body)     # torchrun relaunch (--nproc-per-node), process group, teardown

    def body(cfg, dims):
        ...validate, load data (nothing is written yet)...
        run = start_run(cfg, dims, model_cfg, loss_fn, train_loader, val_loader, meta=...)
        summary = run.train()                # resume, fit, Ctrl-C / SIGTERM / --stop-at checkpoints
        if summary.finished: run.export(...)

Order of `start_run`: resume lookup and checks (config diff, model mismatch) -> the run directory is
claimed (an old run moved aside to RUN_DIR.<time>, only now that everything was validated) ->
config.yaml + run.json -> model on meta -> parallelize -> materialize -> AdamW + schedule -> Trainer.
Frozen models (`frozen=`) are materialized from their own weights and parallelized like the policy.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ember.errors import EmberError
from ember.fileio import check_writable
from ember.log import log, warn
from ember.models import ModelConfig, Transformer
from ember.parallel import ParallelConfig, ParallelDims
from ember.train.loop import Loader, TrainConfig, Trainer


@dataclass
class RunConfig:
    """What every training recipe has: the loop, parallelism, the run directory, resume and launch."""

    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run_dir: str = "runs/run"
    """Where metrics.jsonl, config.yaml, checkpoints/ and final/ go. An old run there (without --resume) is
    moved aside to RUN_DIR.<time> when training starts (never deleted)."""
    resume: bool = False
    """Continue the run in run_dir from its latest checkpoint."""
    resume_from: Optional[str] = None
    """Continue from this training checkpoint directory (run_dir/checkpoints/step_XXXXXXX)."""
    stop_at: Optional[int] = None
    """Stop after this step with a checkpoint, as if interrupted (the schedule still follows max_steps)."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (cuda if available)."""
    nproc_per_node: int = 1
    """Processes on this machine; > 1 re-launches this command under torchrun (torch.distributed.run)."""

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node={self.nproc_per_node}: expected at least 1 process")
        if self.stop_at is not None and self.stop_at < 1:
            raise ValueError(f"stop_at={self.stop_at}: expected a step >= 1 (or unset)")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device={self.device!r}: expected cpu, cuda, cuda:N or auto")


# ------------------------------------------------------------------------------------ launch
def launch(cfg: RunConfig, command: str, body: Callable[[Any, ParallelDims], int]) -> int:
    """Run `body(cfg, dims)` in a process group: relaunched under torchrun first when nproc_per_node > 1."""
    from ember.parallel import destroy_distributed, init_distributed, launched_by_torchrun

    if cfg.nproc_per_node > 1 and not launched_by_torchrun():
        return _relaunch(cfg, command)
    dims = init_distributed(cfg.device, parallel=cfg.parallel)
    try:
        return body(cfg, dims)
    finally:
        destroy_distributed()


def _relaunch(cfg: RunConfig, command: str) -> int:
    """Run the same resolved config under torchrun with nproc_per_node processes (it travels as YAML in a
    temporary file, so nothing is written to the run directory before the ranks validate it)."""
    from ember.config import save_yaml

    with tempfile.TemporaryDirectory(prefix="ember-launch-") as tmp:
        launch_yaml = Path(tmp) / "launch.yaml"
        save_yaml(dataclasses.replace(cfg, nproc_per_node=1), launch_yaml)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.nproc_per_node}",
               "-m", "ember", *command.split(), "--config", str(launch_yaml)]
        log("launching: " + " ".join(cmd))
        return subprocess.call(cmd)


# ------------------------------------------------------------------------------------ run directory
def _asides(run_dir: Path) -> list[Path]:
    return sorted(run_dir.parent.glob(f"{run_dir.name}.2*"), key=lambda p: p.name)


def claim_run_dir(run_dir: str | Path, resuming: bool, is_main: bool) -> Optional[Path]:
    """Make run_dir ready for a run; an old run there (not resuming) is moved aside. Returns the aside."""
    run_dir = Path(run_dir)
    aside = None
    old = [p for p in ("metrics.jsonl", "checkpoints", "final") if (run_dir / p).exists()]
    if is_main and old and not resuming:
        aside = run_dir.with_name(f"{run_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            aside, n = run_dir.with_name(f"{run_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
        run_dir.rename(aside)
        log(f"{run_dir} held a previous run: moved it to {aside} (pass --resume to continue it instead)")
    if is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EmberError(f"run_dir {run_dir}: cannot create it ({e.strerror}). HINT: pick a writable --run-dir") from None
    return aside


def find_resume(cfg: RunConfig) -> Optional[Path]:
    """The checkpoint to resume from (--resume-from, or the newest in run_dir with --resume)."""
    from ember.train.state import latest_checkpoint, read_trainer_meta

    if cfg.resume_from:
        read_trainer_meta(cfg.resume_from)  # a clear error when it is not a checkpoint
        return Path(cfg.resume_from)
    if not cfg.resume:
        return None
    found = latest_checkpoint(cfg.run_dir)
    if found is None:
        asides = [a for a in _asides(Path(cfg.run_dir)) if latest_checkpoint(a) is not None]
        where = (f" An earlier run was moved aside to {asides[-1]}: resume it with --run-dir {asides[-1]}, or "
                 f"--resume-from {latest_checkpoint(asides[-1])}." if asides else "")
        raise EmberError(f"--resume: no checkpoint in {cfg.run_dir}/checkpoints.{where} HINT: check --run-dir, "
                         "or start without --resume")
    return found


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


# keys that may differ on resume without meaning anything for the run's numbers
_RESUME_NEUTRAL = ("resume", "resume_from", "stop_at", "nproc_per_node", "device")


def config_changes(saved: dict, now: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, checkpoint value, current value) for every key that differs."""
    import json

    # as trainer.json stores them (tuples become lists)
    saved, now = (json.loads(json.dumps(d or {}, default=str)) for d in (saved, now))
    a, b = _flatten(saved), _flatten(now)
    keys = sorted(set(a) | set(b))
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k) and not k.startswith(_RESUME_NEUTRAL)]


def report_resume_changes(ckpt: Path, cfg: RunConfig) -> list[tuple[str, Any, Any]]:
    """Say which config keys differ from the checkpoint's run and that the current values win."""
    from ember.config import to_dict
    from ember.train.state import read_trainer_meta

    changes = config_changes(read_trainer_meta(ckpt).get("config") or {}, to_dict(cfg))
    if changes:
        rows = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, old, new in changes)
        warn(f"resuming {ckpt} with {len(changes)} config change(s); the new values win (the optimizer takes "
             f"this run's lr, schedule, weight decay, betas and eps):\n{rows}")
    return changes


def check_model_matches(ckpt: Path, mcfg: ModelConfig) -> None:
    from ember.train.state import read_trainer_meta

    saved = read_trainer_meta(ckpt).get("model_config")
    if saved and saved != mcfg.to_dict():
        diff = sorted(k for k in saved if saved.get(k) != mcfg.to_dict().get(k))
        raise EmberError(f"{ckpt}: the checkpoint's model differs from this run's in {diff}. "
                         "HINT: resume with the same --model-preset / --model.* flags (see RUN_DIR/config.yaml)")


# ------------------------------------------------------------------------------------ the run
@dataclass
class Run:
    """A built run: the Trainer and what its recipe needs to finish (see the module docstring)."""

    cfg: RunConfig
    dims: ParallelDims
    trainer: Trainer
    resume_from: Optional[Path]
    t0: float = 0.0

    def train(self) -> dict:
        """Resume if asked, fit, and save a checkpoint at the end, on --stop-at or on a signal.

        Returns fit's summary plus "finished" (max_steps reached) and "wall_s"."""
        tr, cfg = self.trainer, self.cfg
        if self.resume_from is not None:
            tr.resume(self.resume_from)
        self.t0 = time.perf_counter()
        summary = tr.fit(until=cfg.stop_at)
        if tr.step > 0:
            tr.save()
        summary["finished"] = tr.step >= cfg.train.max_steps and not tr.stopped_by
        summary["wall_s"] = time.perf_counter() - self.t0
        if tr.stopped_by:
            import signal

            name = signal.Signals(tr.stopped_by).name
            log(f"{name}: saved step {tr.step} in {cfg.run_dir}/checkpoints; run the same command with --resume "
                "to continue (the losses will equal an uninterrupted run's)")
        elif not summary["finished"]:
            log(f"stopped at step {tr.step} (--stop-at): to continue, run the same command with --resume")
        return summary

    def exit_code(self) -> int:
        """130 after SIGINT, 143 after SIGTERM (the shell's convention), else 0."""
        return 128 + self.trainer.stopped_by if self.trainer.stopped_by else 0

    def export(self, tokenizer_dir: Optional[Path], extra: Optional[dict] = None, head: Optional[dict] = None) -> Path:
        """The plain checkpoint of the trained model at run_dir/final (collective); `head` its head kind."""
        from ember.train.state import export_final

        final = Path(self.cfg.run_dir) / "final"
        tr = self.trainer
        export_final(tr.model, final, tokenizer_dir,
                     extra={"step": tr.step, "tokens_seen": tr.tokens_seen, **(extra or {})}, head=head)
        return final


def build_model(mcfg: ModelConfig, dims: ParallelDims, parallel: ParallelConfig, seed: int,
                weights: Optional[dict[str, torch.Tensor]] = None,
                transform: Optional[Callable[[nn.Module], Any]] = None, loss_parallel: bool = False) -> nn.Module:
    """The model to train: from scratch, on meta -> parallelize -> materialize (a seeded init); or from
    `weights` (fine-tuning): built around them on CPU -> `transform` (LoRA, ...) -> parallelize.
    loss_parallel: the objective takes vocab-sharded logits under tensor parallelism (`loss_fn.loss_parallel`)."""
    from ember.models import from_state_dict
    from ember.parallel import materialize, parallelize

    if dims.pp > 1:
        if weights is not None or transform is not None:
            raise EmberError("pipeline parallelism (--parallel.pp > 1) trains from scratch (ember pretrain) for now. "
                             "HINT: fine-tune with data and tensor parallelism (--parallel.tp, FSDP2)")
        from ember.parallel.pp import build_pipeline

        return build_pipeline(mcfg, dims, parallel, seed)
    if weights is None:
        if transform is not None:
            raise EmberError("build_model: a transform needs weights to start from")
        with torch.device("meta"):
            model = Transformer(mcfg)
        model = parallelize(model, dims, parallel, loss_parallel)
        materialize(model, dims, seed=seed)
        return model
    model = from_state_dict(mcfg, {k: v.clone() for k, v in weights.items()}).train()
    if transform is not None:
        transform(model)
    return parallelize(model.to(dims.device), dims, parallel, loss_parallel)


def start_run(cfg: RunConfig, dims: ParallelDims, mcfg: ModelConfig, loss_fn: Callable,
              train_loader: Loader, val_loader: Optional[Loader], *, seq_len: int,
              meta: Optional[dict] = None, frozen: Optional[dict[str, tuple[ModelConfig, dict]]] = None,
              weights: Optional[dict[str, torch.Tensor]] = None,
              transform: Optional[Callable[[nn.Module], Any]] = None, run_config: Any = None) -> Run:
    """Validate resume, claim the run dir, log the run, build model/optimizer/schedule, return the Run.

    frozen: name -> (model config, full state dict) of auxiliary models, built and parallelized like
    the policy. weights: start the policy from these (fine-tuning) instead of a seeded init;
    transform: applied to it before parallelizing (LoRA). `run_config` is what config.yaml records
    (default: cfg)."""
    from ember.config import to_dict
    from ember.parallel import barrier
    from ember.train.log import log_run_start
    from ember.train.optim import build_optimizer, build_scheduler

    check_writable(cfg.run_dir, "run_dir")
    if dims.tp > 1:  # before anything is written: heads, KV heads, MLP and vocabulary split evenly
        from ember.parallel.tp import check_tp

        check_tp(mcfg, dims.tp)
    ckpt = find_resume(cfg)
    if ckpt is not None:
        check_model_matches(ckpt, mcfg)
        if dims.is_main:
            report_resume_changes(ckpt, cfg)
    claim_run_dir(cfg.run_dir, resuming=ckpt is not None, is_main=dims.is_main)
    barrier(dims)
    log_run_start(run_config or cfg, cfg.run_dir, world_size=dims.world_size, device=str(dims.device))
    tc = cfg.train
    model = build_model(mcfg, dims, cfg.parallel, tc.seed, weights, transform,
                        loss_parallel=bool(getattr(loss_fn, "loss_parallel", False)))
    frozen_models = {name: build_model(fc, dims, cfg.parallel, tc.seed, sd) for name, (fc, sd) in (frozen or {}).items()}
    torch.manual_seed(tc.seed + 1 + dims.dp_rank)  # dropout streams: distinct per data-parallel rank (tensor-
    # parallel peers draw the same masks for their replicated activations), fixed per seed
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, tc.betas, tc.eps)
    scheduler = build_scheduler(optimizer, tc)
    ckpt_meta = {"model_config": mcfg.to_dict(), "config": to_dict(cfg), **(meta or {})}
    # 6N FLOPs per token holds when every weight trains through an LM head; with frozen weights (LoRA,
    # a classifier's frozen body) the backward does less and MFU would overstate: report tokens/s only
    from ember.parallel import unwrap

    full = all(p.requires_grad for p in model.parameters()) and getattr(unwrap(model), "n_out", None) is None
    trainer = Trainer(model, optimizer, scheduler, train_loader, val_loader, tc, dims, loss_fn=loss_fn,
                      parallel=cfg.parallel, frozen=frozen_models, run_dir=cfg.run_dir,
                      flops_per_token=mcfg.flops_per_token(seq_len) if full else None, ckpt_meta=ckpt_meta)
    return Run(cfg, dims, trainer, ckpt)
