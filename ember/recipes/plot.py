"""Plot a run's metrics (RUN_DIR/metrics.jsonl) to PNG curves: loss, learning rate, throughput.

    ember plot runs/pretrain                 # -> runs/pretrain/plots/{loss,lr,throughput,overview}.png
    ember plot runs/pretrain --out /tmp/p
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import tyro

from ember.errors import EmberError
from ember.log import log


@dataclass
class Config:
    """Plot a run's metrics to PNG files."""

    run_dir: tyro.conf.Positional[str] = "runs/pretrain"
    """The run directory holding metrics.jsonl (default: the default `ember pretrain` run)."""
    out: Optional[str] = None
    """Output directory; None = RUN_DIR/plots."""


def series(records: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; for a step logged twice (a resumed run) the later record wins."""
    by_step: dict[int, float] = {}
    for r in records:
        v = r.get(key)
        if r.get("split") == split and isinstance(v, (int, float)) and not isinstance(v, bool):
            by_step[int(r["step"])] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _baseline(run_dir: Path) -> Optional[float]:
    path = run_dir / "result.json"
    if path.is_file():
        try:
            return json.loads(path.read_text()).get("unigram_entropy")
        except json.JSONDecodeError:
            return None
    return None


def _loss_axes(ax, records: list[dict], baseline: Optional[float]) -> None:
    ax.plot(*series(records, "train", "loss"), label="train", color="tab:blue", lw=1.2)
    vs, vv = series(records, "val", "loss")
    if vs:
        ax.plot(vs, vv, "o-", label="validation", color="tab:orange", lw=1.5, ms=4)
    if baseline:
        ax.axhline(baseline, ls="--", color="gray", lw=1, label=f"unigram baseline ({baseline:.2f})")
    ax.set(title="loss", xlabel="step", ylabel="cross-entropy (nats)")
    ax.legend()


def _lr_axes(ax, records: list[dict]) -> None:
    ax.plot(*series(records, "train", "lr"), color="tab:green")
    ax.set(title="learning rate", xlabel="step", ylabel="lr")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))


def _throughput_axes(ax, records: list[dict]) -> None:
    ax.plot(*series(records, "train", "tokens_per_s"), color="tab:purple", label="tokens/s")
    ax.set(title="throughput", xlabel="step", ylabel="tokens/s")
    ms, mv = series(records, "train", "mfu")
    ax.set_ylim(bottom=0)
    if ms and any(mv):
        # MFU is tokens/s times a constant: on an autoscaled twin axis the two lines would coincide, so
        # MFU gets a fixed 0-100% scale (dashed) and tokens/s keeps headroom above it
        twin = ax.twinx()
        pct = [100 * v for v in mv]
        twin.plot(ms, pct, color="tab:red", lw=1.0, ls="--", label="MFU (%)")
        twin.set_ylabel("MFU (%)", color="tab:red")
        twin.set_ylim(0, max(100.0, 1.1 * max(pct)))
        ax.set_ylim(0, 1.6 * max(series(records, "train", "tokens_per_s")[1] or [1.0]))
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right", fontsize=8)


_STANDARD = {"step", "split", "time", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens_seen", "elapsed_s",
             "eta_s", "skipped", "ppl"}


def objective_metrics(records: list[dict]) -> list[str]:
    """The objective's own metrics in a run (accuracy, rewards/margins, reward, kl, ...), in first-seen order."""
    seen: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k not in _STANDARD and isinstance(v, (int, float)) and not isinstance(v, bool):
                seen[k] = None
    return list(seen)


def _metrics_figure(plt, records: list[dict], path: Path) -> Optional[Path]:
    """metrics.png: one panel per objective metric (train and validation), e.g. a GRPO run's reward."""
    from matplotlib.ticker import MaxNLocator

    keys = objective_metrics(records)
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for split, style in (("train", "-"), ("val", "o-")):
            xs, ys = series(records, split, key)
            if xs:
                ax.plot(xs, ys, style, lw=1.2, ms=4, label=split)
        ax.set(title=key, xlabel="step")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_run(run_dir: str | Path, out: Optional[str | Path] = None) -> list[Path]:
    """Write loss.png, lr.png, throughput.png, overview.png and (when the objective logs its own metrics)
    metrics.png; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ember.train.log import METRICS_FILE, read_metrics

    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        raise EmberError(f"{run_dir / METRICS_FILE}: no metrics file, so {run_dir} is not a training run "
                         "directory. HINT: pass the run directory of an `ember pretrain` run (its --run-dir; default runs/pretrain)")
    records = read_metrics(run_dir)
    if not series(records, "train", "loss")[0]:
        raise EmberError(f"{run_dir / METRICS_FILE}: no training steps logged yet. "
                         "HINT: wait for the first log_every steps, or lower --train.log-every")
    from ember.fileio import check_writable

    out_dir = Path(out) if out else run_dir / "plots"
    check_writable(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    baseline = _baseline(run_dir)
    written = []
    from matplotlib.ticker import MaxNLocator

    for name, draw in (("loss", lambda ax: _loss_axes(ax, records, baseline)),
                       ("lr", lambda ax: _lr_axes(ax, records)),
                       ("throughput", lambda ax: _throughput_axes(ax, records))):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        draw(ax)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}.png", dpi=110)
        plt.close(fig)
        written.append(out_dir / f"{name}.png")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    _loss_axes(axes[0], records, baseline)
    _lr_axes(axes[1], records)
    _throughput_axes(axes[2], records)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    fig.savefig(out_dir / "overview.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "overview.png")
    extra = _metrics_figure(plt, records, out_dir / "metrics.png")
    return written + ([extra] if extra else [])


def main(cfg: Config) -> int:
    for path in plot_run(cfg.run_dir, cfg.out):
        log(f"wrote {path}")
    return 0
