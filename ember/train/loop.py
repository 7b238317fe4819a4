"""The training loop: the only one in ember, for every objective (pretraining, SFT, DPO, distillation, ...).

One optimizer step (`Trainer.train_step`):

    batches = grad_accum_steps micro-batches from the loader
    W = sum of loss_fn.weight(batch) over them, summed over data-parallel ranks  (valid targets, pairs, ...)
    for each micro-batch:                                 (no gradient sync but on the last one)
        out = loss_fn(model, batch)                       (LossOutput: summed loss, weight, summed metrics)
        (out.loss / (W / dp)).backward()                  (DDP/FSDP average over dp ranks: the result is
                                                           the gradient of the step's weighted mean loss)
    grad_norm = clip_grad_norm_(params, grad_clip)        (all ranks agree on the norm)
    loss or grad_norm not finite? -> on_nan: "stop" raises EmberError; "skip" drops this update
    optimizer.step(); scheduler.step()

`Trainer.fit` runs steps up to `max_steps`, logs every `log_every` (rank-0 progress line and
run_dir/metrics.jsonl), evaluates every `eval_every` on the same validation batches each time, and
saves a resumable checkpoint (ember.train.state) every `save_every`. SIGINT and SIGTERM only set a
flag: the step in flight finishes, every rank stops after the same step, and the caller saves a
checkpoint that resumes exactly. Frozen auxiliary models (a DPO reference, a distillation teacher)
are given as `frozen=`: kept in eval mode without gradients, never in the optimizer or in checkpoints.
The objective is the caller's (`ember.train.loss`): this module imports none.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Protocol

import torch
import torch.distributed as dist
from torch import nn

from ember.errors import EmberError
from ember.log import log, warn
from ember.parallel import ParallelConfig, ParallelDims
from ember.train import state as train_state
from ember.train.log import MetricsWriter, Progress
from ember.train.loss import LossOutput, batch_weight


class Loader(Protocol):
    """What the Trainer reads batches from (ember.data.TokenLoader, SFT/preference loaders, ...)."""

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, sd: dict) -> None: ...


def check_train_config(cfg: "TrainConfig") -> None:
    """Refuse nonsense values with the field's name (called when a TrainConfig is built)."""
    def bad(key: str, want: str, value: Any) -> None:
        raise ValueError(f"train.{key}={value!r}: expected {want}")

    if cfg.max_steps < 1:
        bad("max_steps", "at least 1 optimizer step", cfg.max_steps)
    if cfg.batch_size < 1:
        bad("batch_size", "at least 1 sequence", cfg.batch_size)
    if cfg.grad_accum_steps < 1:
        bad("grad_accum_steps", "at least 1 micro-batch per step", cfg.grad_accum_steps)
    for key in ("lr", "min_lr", "weight_decay", "grad_clip", "eps", "decay_frac"):
        value = getattr(cfg, key)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            bad(key, "a finite number >= 0", value)
    if cfg.lr == 0:
        bad("lr", "a learning rate > 0", cfg.lr)
    if cfg.min_lr > cfg.lr:
        bad("min_lr", f"at most train.lr={cfg.lr}", cfg.min_lr)
    if cfg.decay_frac > 1:
        bad("decay_frac", "a fraction in [0, 1]", cfg.decay_frac)
    if not all(0 <= b < 1 for b in cfg.betas):
        bad("betas", "two numbers in [0, 1)", cfg.betas)
    for key in ("warmup_steps", "eval_every", "eval_batches", "save_every", "keep_last", "max_consecutive_skips"):
        if getattr(cfg, key) < 0:
            bad(key, "a count >= 0", getattr(cfg, key))
    if cfg.log_every < 1:
        bad("log_every", "at least 1", cfg.log_every)
    if cfg.peak_flops is not None and not cfg.peak_flops > 0:
        bad("peak_flops", "FLOP/s > 0 (or unset)", cfg.peak_flops)


@dataclass
class TrainConfig:
    """Optimization, schedule, evaluation, logging and checkpoint cadence of a training run."""

    max_steps: int = 1000
    """Optimizer steps to train for (the schedule ends here)."""
    batch_size: int = 16
    """Micro-batch size per data-parallel rank (sequences per forward)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step. Global batch = batch_size * grad_accum_steps * dp ranks."""
    lr: float = 1e-3
    """Peak learning rate (after warmup)."""
    min_lr: float = 1e-4
    """Final learning rate of the cosine / wsd decay."""
    warmup_steps: int = 100
    """Linear warmup steps from lr/warmup_steps to lr."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """cosine: warmup then half-cosine to min_lr; wsd: warmup, constant, then decay over the last
    decay_frac of the steps; constant: warmup then constant."""
    decay_frac: float = 0.2
    """wsd only: fraction of max_steps spent in the final decay."""
    decay_shape: Literal["linear", "cosine"] = "linear"
    """wsd only: shape of the final decay."""
    weight_decay: float = 0.1
    """AdamW weight decay on linear weight matrices (never on norms, biases, embeddings)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged)."""
    seed: int = 1337
    """Seed of weight init, data order and dropout."""
    eval_every: int = 100
    """Evaluate every N steps (0 = only at the end)."""
    eval_batches: int = 20
    """Validation micro-batches per evaluation (the same batches every time)."""
    eval_at_start: bool = False
    """Also evaluate before the first step (the 'before' of a fine-tuning run; logged as step 0)."""
    log_every: int = 10
    """Log metrics (and print a progress line when not on a terminal) every N steps."""
    save_every: int = 0
    """Save a resumable checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 2
    """Keep the newest K training checkpoints (0 = keep all)."""
    on_nan: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient norm: stop with an error, or skip that optimizer update."""
    max_consecutive_skips: int = 10
    """on_nan=skip: stop anyway after this many skipped steps in a row."""
    peak_flops: Optional[float] = None
    """FLOP/s the MFU is relative to (whole job). None: 125e9 on CPU (the fp32 GEMM peak that
    bench/common.py measures on the 2-core reference machine), a dense-bf16 table per GPU model times the
    GPU count."""
    tensorboard: bool = False
    """Also write TensorBoard logs to run_dir/tensorboard (needs `pip install tensorboard`)."""

    def __post_init__(self) -> None:
        check_train_config(self)


# --------------------------------------------------------------------------------- MFU helpers
GPU_PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                 "L4": 121e12, "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12}
CPU_PEAK_FP32 = 125e9


def default_peak_flops(device: torch.device, world_size: int = 1) -> float:
    """Peak FLOP/s of the whole job: a per-GPU dense-bf16 table times GPUs; on CPU the machine's fp32 peak."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak * world_size
        warn(f"unknown GPU '{name}': MFU uses 312e12 FLOP/s per GPU. HINT: set --train.peak-flops")
        return 312e12 * world_size
    return CPU_PEAK_FP32  # CPU processes of one machine share its cores


# --------------------------------------------------------------------------------- batches
def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def batch_tokens(batch: Any) -> int:
    """Tokens a batch feeds the model (for tokens/s): the inputs of a tuple batch, every 2-D integer tensor
    of a dict batch (e.g. chosen and rejected ids)."""
    if isinstance(batch, (tuple, list)):
        return int(batch[0].numel())
    if isinstance(batch, dict):
        return int(sum(v.numel() for v in batch.values()
                       if isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point()
                       and not v.dtype == torch.bool))
    return int(batch.numel()) if isinstance(batch, torch.Tensor) else 0


def _all_sum(t: torch.Tensor, dims: Optional[ParallelDims] = None) -> torch.Tensor:
    """Sum over the data-parallel ranks, in place (gloo has no AVG). Tensor-parallel peers hold the same
    batch, so they are not summed over."""
    if dims is not None and dims.dp_size == 1:
        return t
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=dims.dp_group if dims is not None else None)
    return t


def _local(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor for a (replicated or partial) DTensor loss or metric: its full value."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class NonFiniteLoss(EmberError):
    """The loss or gradient norm became NaN/inf (on_nan='stop', or too many skips)."""


class StopRequest:
    """SIGINT/SIGTERM while training: remember the signal, let the step finish (a second Ctrl-C aborts).

    Installed only in the main thread; `requested()` is agreed over all ranks (a max all-reduce of one
    int per step), so every rank stops after the same step even when only one got the signal."""

    def __init__(self):
        self.signum = 0
        self._old: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is signal.SIG_IGN:
                    continue  # started with the signal ignored (nohup, a background job): keep it so
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:  # second Ctrl-C: stop now, without a checkpoint
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signum = signum
        log(f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint "
            "(Ctrl-C again to abort without saving)")

    def requested(self) -> int:
        flag = torch.tensor([self.signum], dtype=torch.int64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------------- trainer
class Trainer:
    """Owns one run's step loop. `ember.train.run` builds everything it needs for a recipe.

    model: built and parallelized; optimizer/scheduler: from ember.train.optim; train_loader and
    val_loader: `Loader`s yielding batches for `loss_fn` (val_loader may instead offer
    `iter_eval(n)`); loss_fn: an objective (ember.train.loss: `loss_fn(model, batch) -> LossOutput`,
    ideally with `.weight(batch)`); dims / parallel: topology and precision (None = one process, fp32);
    frozen: auxiliary models the objective reads (reference, teacher); run_dir: where metrics and
    checkpoints go (None = no files); ckpt_meta: JSON-able facts saved in checkpoints.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 train_loader: Loader, val_loader: Optional[Loader], cfg: TrainConfig,
                 dims: Optional[ParallelDims] = None, *, loss_fn: Callable[[nn.Module, Any], LossOutput],
                 parallel: Optional[ParallelConfig] = None, frozen: Optional[dict[str, nn.Module]] = None,
                 run_dir: Optional[str | Path] = None, flops_per_token: Optional[int] = None,
                 ckpt_meta: Optional[dict] = None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train_loader, self.val_loader, self.cfg = train_loader, val_loader, cfg
        self.dims, self.parallel = dims or ParallelDims(), parallel
        self.loss_fn = loss_fn
        self.frozen = self._check_frozen(frozen or {})
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.flops_per_token = flops_per_token
        self.ckpt_meta = dict(ckpt_meta or {})
        self.device = self.dims.device if dims is not None else next(model.parameters()).device
        self.dp_size = self.dims.dp_size
        self.step = 0  # optimizer steps done
        self.tokens_seen = 0  # training tokens over all ranks
        self.skipped = 0
        self._consecutive_skips = 0
        self._val_state0 = val_loader.state_dict() if hasattr(val_loader, "state_dict") else None
        self.scaler = self._make_scaler()
        self.metrics = MetricsWriter(self.run_dir, cfg.tensorboard) if self.run_dir is not None else None
        self.last_eval: dict = {}
        self.stopped_by: int = 0  # the signal that ended the last fit (0: none)
        self._saved_step: Optional[int] = None

    def _check_frozen(self, frozen: dict[str, nn.Module]) -> dict[str, nn.Module]:
        trained = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        for name, m in frozen.items():
            if any(id(p) in trained for p in m.parameters()):
                raise EmberError(f"frozen model '{name}' shares parameters with the optimizer. HINT: pass a "
                                 "separate copy (or, with LoRA, the same model with adapters disabled)")
            m.requires_grad_(False).eval()
        return frozen

    # ------------------------------------------------------------------ parallel hooks
    def _make_scaler(self):
        if self.parallel is None:
            return None
        from ember.parallel import make_grad_scaler

        return make_grad_scaler(self.dims, self.parallel)

    def _autocast(self):
        if self.parallel is None:
            return contextlib.nullcontext()
        from ember.parallel import autocast

        return autocast(self.dims, self.parallel)

    def _loss_parallel(self):
        """torch's loss_parallel while the model's head yields vocab-sharded logits (tensor parallel)."""
        from ember.parallel import unwrap

        if not getattr(unwrap(self.model), "_ember_loss_parallel", False):
            return contextlib.nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()

    def _no_sync(self, skip_sync: bool):
        if not self.dims.distributed:
            return contextlib.nullcontext()
        from ember.parallel import no_sync

        return no_sync(self.model, skip_sync)

    def _clip(self) -> torch.Tensor:
        from ember.parallel import clip_grad_norm_

        # grad_clip <= 0 only measures the norm
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self._pipeline:  # every stage's gradients count, a tied head copy once
            counted = {id(p) for p in self.model.norm_params()}
            return clip_grad_norm_(params, self.cfg.grad_clip, pp_group=self.model.pp_group,
                                   counted=[p for p in params if id(p) in counted])
        return clip_grad_norm_(params, self.cfg.grad_clip)

    @property
    def _pipeline(self) -> bool:
        """The model is a parallel.pp.PipelineModel (its schedule runs forward + backward)."""
        return hasattr(self.model, "sync_tied_grads")

    def _pipeline_batch(self, batch: Any) -> tuple:
        """(inputs, targets, summed-loss function) of a batch for the pipeline schedule."""
        split = getattr(self.loss_fn, "pipeline_loss", None)
        if split is None:
            raise EmberError(f"pipeline parallelism runs next-token objectives only; {type(self.loss_fn).__name__} "
                             "is not one. HINT: train it with data and tensor parallelism (--parallel.tp, FSDP2)")
        return split(batch)

    def _weights(self, batches: list) -> tuple[list[float], float]:
        """Units of each micro-batch (before any forward) and of the whole step over all ranks."""
        count = getattr(self.loss_fn, "weight", None) or batch_weight
        weights = [float(count(b)) for b in batches]
        total = _all_sum(torch.tensor(sum(weights), dtype=torch.float64, device=self.device), self.dims).item()
        if total <= 0:
            raise EmberError(f"step {self.step + 1}: no unit to train on in this step's batches (every target "
                             "is -100). HINT: check the data's masks (an all-masked example trains nothing)")
        return weights, total

    @staticmethod
    def _checked(out: Any, expected: float) -> LossOutput:
        if not isinstance(out, LossOutput):
            raise EmberError(f"loss_fn returned {type(out).__name__}, expected ember.train.loss.LossOutput "
                             "(summed loss, weight, metrics)")
        if float(out.weight) != expected:
            raise EmberError(f"loss_fn reported weight {float(out.weight)} for a batch whose weight is {expected}. "
                             "HINT: give the loss_fn a .weight(batch) method that counts the same units")
        return out

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        """One optimizer step over grad_accum_steps micro-batches; returns loss (the step's weighted mean),
        metrics, grad_norm, lr, skipped, tokens."""
        self.model.train()
        for m in self.frozen.values():
            m.eval()
        lr = self.optimizer.param_groups[0]["lr"]
        batches = [_to_device(self.train_loader.next_batch(), self.device) for _ in range(self.cfg.grad_accum_steps)]
        weights, total = self._weights(batches)
        denom = total / self.dp_size  # DDP/FSDP2 average gradients over dp ranks
        sums: dict[str, torch.Tensor] = {}
        for micro, (batch, weight) in enumerate(zip(batches, weights)):
            if self._pipeline:  # the schedule runs forward and backward, microbatched, over the stages
                with self._autocast():
                    loss = self.model.step(*self._pipeline_batch(batch), denom)
                sums["loss"] = sums.get("loss", 0) + loss.double()
                continue
            with self._loss_parallel():  # forward and backward (tensor-parallel vocab-sharded logits)
                with self._no_sync(micro < len(batches) - 1), self._autocast():
                    out = self._checked(self.loss_fn(self.model, batch), weight)
                scaled = out.loss / denom
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            for k, v in {"loss": out.loss, **out.metrics}.items():
                sums[k] = sums.get(k, 0) + _local(v.detach()).double()
        if self._pipeline:
            self.model.sync_tied_grads()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip()  # the full norm, the same on every rank
        means = self._means(sums, total)  # all ranks agree
        loss_val, norm_val = means["loss"], grad_norm.item()
        # with a grad scaler (fp16) inf gradients are routine: scaler.step skips those updates itself
        finite = math.isfinite(loss_val) and (self.scaler is not None or math.isfinite(norm_val))
        skipped = False
        if not finite:
            skipped = self._on_nonfinite(loss_val, norm_val)  # raises for on_nan="stop"
        elif self.scaler is not None:
            self.scaler.step(self.optimizer)
        else:
            self.optimizer.step()
        if not skipped:
            self._consecutive_skips = 0
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first step makes LambdaLR warn about the call order
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
            self.scheduler.step()
        self.step += 1
        tokens = sum(batch_tokens(b) for b in batches) * self.dp_size
        self.tokens_seen += tokens
        return {**means, "grad_norm": norm_val, "lr": lr, "skipped": skipped, "tokens": tokens}

    def _means(self, sums: dict[str, torch.Tensor], total: float) -> dict[str, float]:
        """Weighted means over all micro-batches and ranks: one all-reduce for every metric."""
        keys = sorted(sums)
        vec = _all_sum(torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=self.device) for k in keys]),
                       self.dims)
        return {k: v / total for k, v in zip(keys, vec.tolist())}

    def _on_nonfinite(self, loss_val: float, norm_val: float) -> bool:
        step = self.step + 1
        what = f"step {step}: loss={loss_val}, grad_norm={norm_val} (not finite)"
        hint = ("HINT: lower --train.lr, keep --train.grad-clip > 0 (e.g. 1.0), use a longer "
                "--train.warmup-steps, or pass --train.on-nan=skip to skip such steps")
        if self.cfg.on_nan == "stop":
            raise NonFiniteLoss(f"{what}. Training stopped. {hint}")
        self.skipped += 1
        self._consecutive_skips += 1
        warn(f"{what}: skipped this update ({self.skipped} skipped so far)")
        if self._consecutive_skips > self.cfg.max_consecutive_skips:
            raise NonFiniteLoss(f"{what}: {self._consecutive_skips} non-finite steps in a row "
                                f"(train.max_consecutive_skips={self.cfg.max_consecutive_skips}). {hint}")
        return True

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, batches: Optional[int] = None) -> dict:
        """The objective's weighted means (loss and its metrics, plus what `loss_fn.report` derives, e.g.
        perplexity) over the same `eval_batches` batches every call (all ranks)."""
        if self.val_loader is None:
            return {}
        n = batches or self.cfg.eval_batches
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        total = 0.0
        for batch in self._eval_batches(n):
            batch = _to_device(batch, self.device)
            if self._pipeline:
                with self._autocast():
                    loss = self.model.evaluate(*self._pipeline_batch(batch))
                total += float(self.loss_fn.weight(batch))
                sums["loss"] = sums.get("loss", 0) + loss.double()
                continue
            with self._loss_parallel(), self._autocast():
                out = self.loss_fn(self.model, batch)
            total += float(out.weight)
            for k, v in {"loss": out.loss, **out.metrics}.items():
                sums[k] = sums.get(k, 0) + _local(v.detach()).double()
        self.model.train()
        total = _all_sum(torch.tensor(total, dtype=torch.float64, device=self.device), self.dims).item()
        means = self._means(sums, max(total, 1.0)) if sums else {"loss": float("nan")}
        report = getattr(self.loss_fn, "report", None)
        self.last_eval = report(means) if report is not None else means
        return self.last_eval

    def _eval_batches(self, n: int) -> Iterator:
        """The same n batches every call: the loader's `iter_eval`, else its stream from the initial state."""
        if hasattr(self.val_loader, "iter_eval"):
            yield from self.val_loader.iter_eval(n)
            return
        if self._val_state0 is not None:
            self.val_loader.load_state_dict(self._val_state0)
        for _ in range(n):
            yield self.val_loader.next_batch()

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Optional[Path]:
        """A resumable checkpoint of the current step in run_dir/checkpoints (collective). Frozen models
        are not in it: they are inputs of the run, loaded again on resume."""
        if self.run_dir is None or self._saved_step == self.step:
            return None
        self._saved_step = self.step
        return train_state.save_train_state(
            self.run_dir, self.step, self.model, self.optimizer, self.scheduler, self.train_loader,
            tokens_seen=self.tokens_seen, dp_size=self.dp_size, dp_rank=self.dims.dp_rank, keep_last=self.cfg.keep_last,
            model_config=self.ckpt_meta.get("model_config"), config=self.ckpt_meta.get("config"),
            tokenizer_dir=self.ckpt_meta.get("tokenizer_dir"), extra={"skipped": self.skipped})

    def resume(self, ckpt: str | Path) -> dict:
        """Restore model, optimizer, scheduler, loader, RNG, step and counters from a checkpoint.

        The optimizer hyperparameters of this run's config win over the checkpoint's (lr, min_lr and
        the schedule through the scheduler, weight decay, betas, eps), so a changed --train.lr applies."""
        meta = train_state.load_train_state(ckpt, self.model, self.optimizer, self.scheduler, self.train_loader,
                                            dp_size=self.dp_size, dp_rank=self.dims.dp_rank)
        self.step, self.tokens_seen = int(meta["step"]), int(meta.get("tokens_seen", 0))
        self._saved_step = self.step
        self.skipped = int(meta.get("extra", {}).get("skipped", 0))
        self._apply_hyperparameters()
        log(f"resumed from {ckpt} at step {self.step} ({self.tokens_seen:,} tokens seen)")
        return meta

    def _apply_hyperparameters(self) -> None:
        cfg, sched = self.cfg, self.scheduler
        for g in self.optimizer.param_groups:
            g["initial_lr"] = cfg.lr
            if g.get("name") == "decay":  # ember.train.optim.param_groups names its groups
                g["weight_decay"] = cfg.weight_decay
            g["betas"], g["eps"] = tuple(cfg.betas), cfg.eps
        if sched is not None and hasattr(sched, "lr_lambdas"):
            sched.base_lrs = [cfg.lr for _ in self.optimizer.param_groups]
            for g, fn in zip(self.optimizer.param_groups, sched.lr_lambdas):
                g["lr"] = cfg.lr * fn(sched.last_epoch)

    # ------------------------------------------------------------------ the loop
    def fit(self, until: Optional[int] = None) -> dict:
        """Train until max_steps (or step `until`, as if interrupted there; the schedule still follows
        max_steps), or until SIGINT/SIGTERM (then `self.stopped_by` is the signal and the caller saves);
        returns a summary (losses, last train loss, tokens/s, MFU, time)."""
        cfg = self.cfg
        end = min(cfg.max_steps, until) if until is not None else cfg.max_steps
        start_step, start_tokens, t_start = self.step, self.tokens_seen, time.perf_counter()
        progress = Progress(cfg.max_steps, initial=self.step)
        window_t, window_tokens, window_steps = time.perf_counter(), 0, 0
        history: list[float] = []
        tok_s = mfu = 0.0
        self.stopped_by = 0
        if cfg.eval_at_start and self.step == 0:
            self._eval_and_log(progress)
            window_t = time.perf_counter()
        with StopRequest() as stop:
            while self.step < end:
                out = self.train_step()
                window_tokens += out["tokens"]
                window_steps += 1
                history.append(out["loss"])
                progress.update(self.step, out["loss"])
                if self.step % cfg.log_every == 0 or self.step == end:
                    dt = time.perf_counter() - window_t
                    tok_s = window_tokens / max(dt, 1e-9)
                    mfu = self._mfu(tok_s)
                    eta = (cfg.max_steps - self.step) * dt / max(1, window_steps)
                    rec = {**{k: v for k, v in out.items() if k not in ("skipped", "tokens")}, "tokens_per_s": tok_s,
                           "mfu": mfu, "tokens_seen": self.tokens_seen, "elapsed_s": time.perf_counter() - t_start,
                           "eta_s": eta, "skipped": self.skipped}
                    self._write(self.step, "train", rec)
                    progress.log_step(self.step, rec)
                    window_t, window_tokens, window_steps = time.perf_counter(), 0, 0
                self.stopped_by = stop.requested()
                if self.stopped_by:
                    break
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < end:
                    self._eval_and_log(progress)
                    window_t = time.perf_counter()
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < end:
                    self.save()
                    window_t = time.perf_counter()
        progress.close()
        elapsed = time.perf_counter() - t_start
        avg = (self.tokens_seen - start_tokens) / max(elapsed, 1e-9)  # whole run, evals and saves included
        return {"steps": self.step - start_step, "train_loss": history[-1] if history else None,
                "losses": history, "tokens_per_s": avg, "mfu": self._mfu(avg), "last_tokens_per_s": tok_s,
                "elapsed_s": elapsed, "skipped": self.skipped, "tokens_seen": self.tokens_seen,
                "stopped_by": self.stopped_by}

    def _eval_and_log(self, progress: Optional[Progress] = None) -> dict:
        res = self.evaluate()
        if res:
            self._write(self.step, "val", res)
            msg = f"step {self.step}: val " + ", ".join(f"{k} {v:.4f}" for k, v in res.items())
            (progress.write(msg) if progress is not None else log(msg))
        return res

    def final_eval(self) -> dict:
        """Evaluate now and log it (used by recipes after `fit`)."""
        return self._eval_and_log()

    def _mfu(self, tokens_per_s: float) -> float:
        if not self.flops_per_token:
            return 0.0
        peak = self.cfg.peak_flops or default_peak_flops(self.device, self.dims.world_size)
        return self.flops_per_token * tokens_per_s / peak

    def _write(self, step: int, split: str, rec: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(step, split, **rec)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
