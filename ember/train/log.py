"""Run logging: metrics JSONL, optional TensorBoard, and "what was run" at start-up.

`run_dir/metrics.jsonl` holds one JSON object per line: {"step": 10, "split": "train", "loss": ...,
"lr": ..., ...}. Only rank 0 writes. `ember plot RUN_DIR` reads it back (`read_metrics`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ember.log import log, rank, warn

METRICS_FILE = "metrics.jsonl"


def _clean(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no nan/inf
    return v


class MetricsWriter:
    """Appends metric records to run_dir/metrics.jsonl (rank 0), and to TensorBoard if asked."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = False):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = rank() == 0
        self.tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
            if tensorboard:
                self.tb = _open_tensorboard(Path(run_dir) / "tensorboard")

    def write(self, step: int, split: str, **values: Any) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "split": split, "time": round(time.time(), 3)}
        rec.update({k: _clean(v) for k, v in values.items()})
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self.tb is not None:
                self.tb.close()


def _open_tensorboard(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warn("tensorboard is not installed, so no TensorBoard logs are written "
             "(metrics.jsonl still is). HINT: pip install 'ember[tensorboard]'")
        return None
    return SummaryWriter(log_dir=str(log_dir))


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of run_dir/metrics.jsonl (resumed runs append; later records win in plots)."""
    path = Path(run_dir) / METRICS_FILE
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                warn(f"{path}:{i}: skipping a malformed line (an interrupted write?)")
    return out


# -------------------------------------------------------------------------------- run header
def git_sha(cwd: Optional[str | Path] = None) -> Optional[str]:
    """The git commit of the source tree (with '+dirty' if it has changes), or None."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_info(world_size: int = 1, device: str = "cpu") -> dict:
    """What was run: versions, git SHA, device, world size, host."""
    from ember import __version__

    info = {"ember_version": __version__, "git_sha": git_sha(), "torch_version": torch.__version__,
            "python": platform.python_version(), "device": device, "world_size": world_size,
            "threads": torch.get_num_threads(), "host": platform.node(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def log_run_start(cfg: Any, run_dir: str | Path, world_size: int = 1, device: str = "cpu") -> dict:
    """Print the resolved config and run info on rank 0; save them to run_dir/config.yaml + run.json."""
    import yaml

    from ember.config import to_dict
    from ember.fileio import atomic_write_text

    info = run_info(world_size, device)
    resolved = to_dict(cfg)
    if rank() == 0:
        text = yaml.safe_dump(resolved, sort_keys=False)
        log("resolved config:\n" + "\n".join("  " + line for line in text.rstrip().splitlines()))
        log("run: " + ", ".join(f"{k}={v}" for k, v in info.items() if v is not None))
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", text)
        atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2) + "\n")
    return info


# -------------------------------------------------------------------------------- progress line
def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


_STEP_KEYS = {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens_seen", "elapsed_s", "eta_s", "skipped"}


def format_step(step: int, total: int, rec: dict) -> str:
    """`step 100/1000 | loss 3.2100 | lr 1.00e-03 | gnorm 0.41 | 5,230 tok/s | MFU 41.2% | 1:02 elapsed | ETA 9:10`."""
    parts = [f"step {step}/{total}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.2e}"]
    if rec.get("grad_norm") is not None:
        parts.append(f"gnorm {rec['grad_norm']:.2f}")
    parts.append(f"{rec['tokens_per_s']:,.0f} tok/s")
    if rec.get("mfu"):  # unknown (0) when the run's FLOPs per token are not 6N (frozen weights)
        parts.append(f"MFU {100 * rec['mfu']:.1f}%")
    for k, v in rec.items():  # the objective's own metrics (accuracy, margins, ...)
        if k not in _STEP_KEYS and isinstance(v, float):
            parts.append(f"{k} {v:.4f}")
    parts += [f"{_fmt_time(rec.get('elapsed_s', 0))} elapsed", f"ETA {_fmt_time(rec.get('eta_s', 0))}"]
    if rec.get("skipped"):
        parts.append(f"skipped {rec['skipped']}")
    return " | ".join(parts)


class Progress:
    """Rank-0 progress. On a terminal: one live line rewritten every step, plus a kept line every log step.
    Elsewhere (CI logs, files): only the kept line every log step."""

    def __init__(self, total: int, initial: int = 0):
        import sys

        self.total, self.out = total, sys.stdout
        self.enabled = rank() == 0
        self.live = self.enabled and self.out.isatty()
        self.last: dict = {}
        self.t0, self.step0 = time.perf_counter(), initial

    def _clear(self) -> None:
        if self.live:
            self.out.write("\r\x1b[K")

    def update(self, step: int, loss: float) -> None:
        """Rewrite the live line (terminal only)."""
        if not self.live:
            return
        rate = (step - self.step0) / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else 0.0
        pct = 100 * step / max(1, self.total)
        extra = f" | {self.last['tokens_per_s']:,.0f} tok/s" if self.last else ""
        self.out.write(f"\r\x1b[K[{pct:3.0f}%] step {step}/{self.total} | loss {loss:.4f}{extra} | ETA {_fmt_time(eta)}")
        self.out.flush()

    def log_step(self, step: int, rec: dict) -> None:
        """The kept line of a log step."""
        self.last = rec
        if self.enabled:
            self.write(format_step(step, self.total, rec))

    def write(self, msg: str) -> None:
        if self.enabled:
            self._clear()
            log(msg)

    def close(self) -> None:
        self._clear()
        if self.live:
            self.out.flush()
