"""The training loop: the only one in ember (pretraining now; SFT, DPO and distillation reuse it).

One optimizer step (`Trainer.train_step`):

    for each of grad_accum_steps micro-batches:          (no gradient sync but on the last one)
        loss = loss_fn(model, batch)                      (under autocast when configured)
        (loss / grad_accum_steps).backward()
    grad_norm = clip_grad_norm_(params, grad_clip)        (all ranks agree on the norm)
    loss or grad_norm not finite? -> on_nan: "stop" raises EmberError; "skip" drops this update
    optimizer.step(); scheduler.step()

`Trainer.fit` runs steps up to `max_steps`, logs every `log_every` (rank-0 progress line and
run_dir/metrics.jsonl), evaluates every `eval_every` on the same validation batches each time, and
saves a resumable checkpoint (ember.train.state) every `save_every`.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
import torch.distributed as dist
from torch import nn

from ember.errors import EmberError
from ember.log import log, warn
from ember.train import state as train_state
from ember.train.log import MetricsWriter, Progress
from ember.train.loss import cross_entropy, z_loss


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
    fused_loss: bool = True
    """Compute the output head and cross-entropy together, chunk by chunk, never materialising the logits
    (ember.train.fused_loss; same values to fp32 rounding; ~1.15x faster training steps on CPU at vocab 50k,
    bench/train_throughput.py). DDP/FSDP2-wrapped models and z-loss use the plain loss automatically."""
    z_loss: float = 0.0
    """Coefficient of the z-loss (PaLM) added to the training loss; 0 = off."""
    seed: int = 1337
    """Seed of weight init, data order and dropout."""
    eval_every: int = 100
    """Evaluate every N steps (0 = only at the end)."""
    eval_batches: int = 20
    """Validation micro-batches per evaluation (the same batches every time)."""
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
    """FLOP/s the MFU is relative to (whole job). None: 125e9 on CPU (the measured fp32 GEMM peak of
    the 2-core reference machine, CPU-NOTES.md), a dense-bf16 table per GPU model times the GPU count."""
    tensorboard: bool = False
    """Also write TensorBoard logs to run_dir/tensorboard (needs `pip install tensorboard`)."""


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
def lm_loss(model: nn.Module, batch: Any, z_coef: float = 0.0) -> tuple[torch.Tensor, int]:
    """Next-token loss of a batch `(inputs (B, T), targets (B, T))` (targets -100 are ignored).

    Returns (mean loss, number of counted target tokens).
    """
    inputs, targets = batch[0], batch[1]
    logits = model(inputs)  # (B, T, V)
    loss = cross_entropy(logits, targets)
    if z_coef:
        loss = loss + z_coef * z_loss(logits, targets)
    return loss, int(targets.numel())


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _next(loader: Any) -> Any:
    return loader.next_batch() if hasattr(loader, "next_batch") else next(loader)


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks, in place (gloo has no AVG)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _all_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over all ranks (TP/PP ranks of one replica hold equal values, so this is the dp mean)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return _all_sum(t.detach().clone()) / world


class NonFiniteLoss(EmberError):
    """The loss or gradient norm became NaN/inf (on_nan='stop', or too many skips)."""


# --------------------------------------------------------------------------------- trainer
class Trainer:
    """Owns one run's step loop. Build the model, optimizer and loaders first (see recipes/pretrain.py).

    model: built and parallelized; optimizer/scheduler: from ember.train.optim; train_loader and
    val_loader: `next_batch()` (or iterators) yielding batches for `loss_fn`, with state_dict /
    load_state_dict for resume; dims: ember.parallel.ParallelDims (None = single process);
    parallel: ember.parallel.ParallelConfig (precision, grad scaler); run_dir: where metrics and
    checkpoints go (None = no files); loss_fn(model, batch) -> (loss, n_tokens); ckpt_meta: JSON-able
    facts saved in checkpoints (model_config, config, tokenizer_dir).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, train_loader: Any,
                 val_loader: Any, cfg: TrainConfig, dims: Any = None, *, parallel: Any = None,
                 run_dir: Optional[str | Path] = None, loss_fn: Optional[Callable] = None,
                 flops_per_token: Optional[int] = None, ckpt_meta: Optional[dict] = None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train_loader, self.val_loader, self.cfg = train_loader, val_loader, cfg
        self.dims, self.parallel = dims, parallel
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.loss_fn = loss_fn or self._default_loss_fn(cfg)
        self.flops_per_token = flops_per_token
        self.ckpt_meta = dict(ckpt_meta or {})
        self.device = getattr(dims, "device", None) or next(model.parameters()).device
        self.dp_size = getattr(dims, "dp_size", 1)
        self.step = 0  # optimizer steps done
        self.tokens_seen = 0  # training tokens over all ranks
        self.skipped = 0
        self._consecutive_skips = 0
        self._val_state0 = val_loader.state_dict() if hasattr(val_loader, "state_dict") else None
        self.scaler = self._make_scaler()
        self.metrics = MetricsWriter(self.run_dir, cfg.tensorboard) if self.run_dir is not None else None
        self.last_eval: dict = {}
        self._saved_step: Optional[int] = None

    @staticmethod
    def _default_loss_fn(cfg: TrainConfig) -> Callable:
        if cfg.fused_loss:
            from ember.train.fused_loss import fused_lm_loss

            return lambda m, b: fused_lm_loss(m, b, cfg.z_loss)
        return lambda m, b: lm_loss(m, b, cfg.z_loss)

    # ------------------------------------------------------------------ parallel hooks
    def _make_scaler(self):
        if self.parallel is None or self.dims is None:
            return None
        from ember.parallel import make_grad_scaler

        return make_grad_scaler(self.dims, self.parallel)

    def _autocast(self):
        if self.parallel is None or self.dims is None:
            return contextlib.nullcontext()
        from ember.parallel import autocast

        return autocast(self.dims, self.parallel)

    def _no_sync(self, skip_sync: bool):
        if self.dims is None or not getattr(self.dims, "distributed", False):
            return contextlib.nullcontext()
        from ember.parallel import no_sync

        return no_sync(self.model, skip_sync)

    def _clip(self) -> torch.Tensor:
        from ember.parallel import clip_grad_norm_

        # grad_clip <= 0 only measures the norm
        return clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], self.cfg.grad_clip)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        """One optimizer step over grad_accum_steps micro-batches; returns {"loss", "grad_norm", "lr", "skipped"}."""
        cfg, accum = self.cfg, self.cfg.grad_accum_steps
        self.model.train()
        lr = self.optimizer.param_groups[0]["lr"]
        loss_sum, tokens = torch.zeros((), device=self.device), 0
        for micro in range(accum):
            batch = _to_device(_next(self.train_loader), self.device)
            with self._no_sync(micro < accum - 1), self._autocast():
                loss, n = self.loss_fn(self.model, batch)
            scaled = loss / accum
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.detach().float()
            tokens += n
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip()  # the full norm, the same on every rank
        loss_val = _all_mean(loss_sum / accum).item()  # mean over micro-batches and ranks: all ranks agree
        norm_val = grad_norm.item()
        # with a grad scaler (fp16) inf gradients are routine: scaler.step skips those updates itself
        finite = math.isfinite(loss_val) and (self.scaler is not None or math.isfinite(norm_val))
        skipped = False
        if not finite:
            skipped = self._on_nonfinite(loss_val, norm_val)  # raises for on_nan="stop"
        elif self.scaler is not None:
            self.scaler.step(self.optimizer)
        else:
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first step makes LambdaLR warn about the call order
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
            self.scheduler.step()
        self.step += 1
        self.tokens_seen += tokens * self.dp_size
        return {"loss": loss_val, "grad_norm": norm_val, "lr": lr, "skipped": skipped, "tokens": tokens * self.dp_size}

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
        """Mean validation loss and perplexity over the same `eval_batches` batches every call (all ranks)."""
        if self.val_loader is None:
            return {}
        n = batches or self.cfg.eval_batches
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # (sum of token losses, tokens)
        for batch in self._eval_batches(n):
            batch = _to_device(batch, self.device)
            with self._autocast():
                loss, count = self.loss_fn(self.model, batch)
            total += torch.stack([loss.double() * count, torch.tensor(count, dtype=torch.float64, device=self.device)])
        self.model.train()
        total = _all_sum(total)
        val = (total[0] / total[1].clamp(min=1)).item()
        self.last_eval = {"loss": val, "ppl": math.exp(min(val, 50.0))}
        return self.last_eval

    def _eval_batches(self, n: int):
        """The same n batches every call: the loader's `iter_eval`, else its stream from the initial state."""
        if hasattr(self.val_loader, "iter_eval"):
            yield from self.val_loader.iter_eval(n)
            return
        if self._val_state0 is not None:
            self.val_loader.load_state_dict(self._val_state0)
        for _ in range(n):
            yield _next(self.val_loader)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Optional[Path]:
        """A resumable checkpoint of the current step in run_dir/checkpoints (collective)."""
        if self.run_dir is None or self._saved_step == self.step:
            return None
        self._saved_step = self.step
        return train_state.save_train_state(
            self.run_dir, self.step, self.model, self.optimizer, self.scheduler, self.train_loader,
            tokens_seen=self.tokens_seen, dp_size=self.dp_size, keep_last=self.cfg.keep_last,
            model_config=self.ckpt_meta.get("model_config"), config=self.ckpt_meta.get("config"),
            tokenizer_dir=self.ckpt_meta.get("tokenizer_dir"), extra={"skipped": self.skipped})

    def resume(self, ckpt: str | Path) -> dict:
        """Restore model, optimizer, scheduler, loader, RNG, step and counters from a checkpoint."""
        meta = train_state.load_train_state(ckpt, self.model, self.optimizer, self.scheduler, self.train_loader,
                                            dp_size=self.dp_size)
        self.step, self.tokens_seen = int(meta["step"]), int(meta.get("tokens_seen", 0))
        self._saved_step = self.step
        self.skipped = int(meta.get("extra", {}).get("skipped", 0))
        log(f"resumed from {ckpt} at step {self.step} ({self.tokens_seen:,} tokens seen)")
        return meta

    # ------------------------------------------------------------------ the loop
    def fit(self, until: Optional[int] = None) -> dict:
        """Train until max_steps (or step `until`, as if interrupted there; the schedule still follows
        max_steps); returns a summary (losses, last train loss, tokens/s, MFU, time)."""
        cfg = self.cfg
        end = min(cfg.max_steps, until) if until is not None else cfg.max_steps
        start_step, start_tokens, t_start = self.step, self.tokens_seen, time.perf_counter()
        progress = Progress(cfg.max_steps, initial=self.step)
        window_t, window_tokens, window_steps = time.perf_counter(), 0, 0
        history: list[float] = []
        tok_s = mfu = 0.0
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
                rec = {"loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"], "tokens_per_s": tok_s,
                       "mfu": mfu, "tokens_seen": self.tokens_seen, "elapsed_s": time.perf_counter() - t_start,
                       "eta_s": eta, "skipped": self.skipped}
                self._write(self.step, "train", rec)
                progress.log_step(self.step, rec)
                window_t, window_tokens, window_steps = time.perf_counter(), 0, 0
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
                "elapsed_s": elapsed,
                "skipped": self.skipped, "tokens_seen": self.tokens_seen}

    def _eval_and_log(self, progress: Optional[Progress] = None) -> dict:
        res = self.evaluate()
        if res:
            self._write(self.step, "val", res)
            msg = f"step {self.step}: val loss {res['loss']:.4f}, ppl {res['ppl']:.2f}"
            (progress.write(msg) if progress is not None else log(msg))
        return res

    def final_eval(self) -> dict:
        """Evaluate now and log it (used by recipes after `fit`)."""
        return self._eval_and_log()

    def _mfu(self, tokens_per_s: float) -> float:
        if not self.flops_per_token:
            return 0.0
        peak = self.cfg.peak_flops or default_peak_flops(self.device, getattr(self.dims, "world_size", 1))
        return self.flops_per_token * tokens_per_s / peak

    def _write(self, step: int, split: str, rec: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(step, split, **rec)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
