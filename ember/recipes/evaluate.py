"""Evaluate a checkpoint on benchmark tasks: multiple choice, perplexity, QA, code, safety.

    ember evaluate --checkpoint runs/smollm2 --tasks mmlu --limit 200
    ember evaluate --checkpoint runs/smollm2 --tasks humaneval,refusal,hhh
    ember evaluate --checkpoint runs/pretrain/final --tasks ppl:runs/pretrain   # the run's held-out split

Tasks (see ember/eval/tasks.py): mmlu, mmlu_cloze, hellaswag:FILE, mc:FILE, bigbench:DIR, hhh, bbq,
ppl:PATH, qa:FILE, humaneval, humaneval_chat, refusal, leakage:FILE. Every score comes from the inference engine with batch
invariance on, so --batch-size changes the speed, never a number. Results go to OUT/results.json, a
table on the terminal and OUT/summary.png; per-item results are cached in OUT/cache/, so a killed
run continues where it stopped (--fresh recomputes).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

from ember.errors import EmberError
from ember.log import log, warn


@dataclass
class Config:
    """Evaluate a checkpoint on benchmark tasks."""

    checkpoint: str = ""
    """Checkpoint directory (ember pretrain / finetune / convert output; adapters are merged)."""
    tasks: str = ""
    """Comma-separated tasks: mmlu, mmlu_cloze, hellaswag:FILE, mc:FILE, bigbench:DIR, hhh, bbq, ppl:PATH,
    qa:FILE, humaneval, humaneval_chat, refusal, leakage:FILE."""
    out: Optional[str] = None
    """Where results.json, summary.png and the per-item cache go (default CHECKPOINT/eval)."""
    limit: Optional[int] = None
    """Score only the first N items of each task (of each subtask for bigbench, hhh, bbq)."""
    num_fewshot: int = 0
    """Solved examples put before each question (multiple choice and QA), drawn with --seed."""
    seed: int = 1234
    """Seed of the few-shot draws and of sampled code completions."""
    batch_size: int = 8
    """Sequences scored at once (scores are identical at every batch size)."""
    data_dir: str = "data/eval"
    """Where named tasks look for their files (mmlu.jsonl, bigbench/, HumanEval.jsonl.gz)."""
    cot: bool = False
    """QA: ask for step-by-step reasoning and score the final answer."""
    max_gen_tokens: int = 256
    """Longest generation (QA with --cot, HumanEval)."""
    code_samples: int = 1
    """HumanEval samples per problem (pass@k needs k samples; use --code-temperature > 0 with more than one)."""
    code_temperature: float = 0.0
    """HumanEval sampling temperature (0 = greedy)."""
    code_timeout: float = 5.0
    """Seconds each HumanEval program may run."""
    ppl_stride: Optional[int] = None
    """Perplexity: predict this many new tokens per window (sliding windows); default non-overlapping."""
    chunk: int = 32
    """Items scored between cache writes."""
    fresh: bool = False
    """Ignore cached per-item results."""
    contamination: Optional[str] = None
    """A prepared dataset (ember data prepare --out DIR): report, per task, how many items share a
    --contamination-n word n-gram with its train split."""
    contamination_n: int = 13
    kv_memory_mb: float = 256.0
    """The engine's KV cache."""
    tokenizer: Optional[str] = None
    """Tokenizer directory; default the checkpoint's own."""
    device: str = "cpu"
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    progress: bool = True


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)[:120]


def model_fingerprint(checkpoint: str) -> dict:
    d = Path(checkpoint).resolve()
    files = sorted(p for p in d.glob("*.safetensors")) + [d / "ember.json"]
    h = hashlib.sha256()
    for f in files:
        if f.exists():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return {"checkpoint": str(d), "files": h.hexdigest()[:16]}


class ItemCache:
    """Per-item results of one task, appended as JSON lines after a header naming what they depend
    on; a torn last line (a killed write) is ignored, a different header starts the file over."""

    def __init__(self, path: Path, header: dict, fresh: bool):
        self.path, self.header = path, header
        self.done: dict[str, dict] = {}
        if path.exists() and not fresh:
            lines = path.read_text(encoding="utf-8").splitlines()
            try:
                ok = lines and json.loads(lines[0]) == {"header": header}
            except json.JSONDecodeError:
                ok = False
            if ok:
                for line in lines[1:]:
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        break  # torn tail
                    self.done[r["id"]] = r
            else:
                warn(f"{path}: cached results were made with other settings or another model; recomputing")
        if not self.done:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"header": header}) + "\n", encoding="utf-8")
            os.replace(tmp, path)

    def add(self, results: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
                self.done[r["id"]] = r
            f.flush()
            os.fsync(f.fileno())


def run_tasks(cfg: Config, scorer, tasks, out: Path) -> dict:
    from tqdm import tqdm

    results: dict = {}
    mfp = model_fingerprint(cfg.checkpoint) if cfg.checkpoint else {}
    for task in tasks:
        t0 = time.perf_counter()
        docs = task.docs()
        # each cached result carries a hash of its item as scored (prompt, choices, few-shot examples)
        h = {d.id: hashlib.sha256(json.dumps(d.data, sort_keys=True).encode()).hexdigest()[:16] for d in docs}
        cache = ItemCache(out / "cache" / f"{_slug(task.label)}.jsonl", mfp | task.fingerprint(), cfg.fresh)
        todo = [d for d in docs if cache.done.get(d.id, {}).get("h") != h[d.id]]
        if len(todo) < len(docs):
            log(f"{task.label}: {len(docs) - len(todo)} of {len(docs)} items cached, scoring the other {len(todo)}")
        bar = tqdm(total=len(docs), initial=len(docs) - len(todo), desc=task.label, unit=" items",
                   disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True)
        for i in range(0, len(todo), max(1, cfg.chunk)):
            part = todo[i:i + cfg.chunk]
            cache.add([r | {"h": h[r["id"]]} for r in task.score(scorer, part)])
            bar.update(len(part))
        bar.close()
        rows = [cache.done[d.id] for d in docs]
        agg = task.aggregate(rows)
        agg["seconds"] = round(time.perf_counter() - t0, 2)
        results[task.label] = {"kind": task.kind, "primary": task.primary, "metrics": agg}
    return results


def main(cfg: Config) -> int:
    from ember.eval.scorer import Scorer
    from ember.eval.tasks import Settings, parse_tasks
    from ember.fileio import atomic_write_text, check_writable
    from ember.infer import api
    from ember.peft.lora import merge_lora
    from ember.tokenizer.chat import end_of_turn_ids

    if not cfg.checkpoint:
        raise EmberError("--checkpoint DIR is required (a directory from ember pretrain, finetune or convert).")
    settings = Settings(data_dir=cfg.data_dir, num_fewshot=cfg.num_fewshot, seed=cfg.seed, limit=cfg.limit,
                        cot=cfg.cot, max_gen_tokens=cfg.max_gen_tokens, code_samples=cfg.code_samples,
                        code_temperature=cfg.code_temperature, code_timeout=cfg.code_timeout,
                        ppl_stride=cfg.ppl_stride)
    tasks = parse_tasks(cfg.tasks, settings)
    out = Path(cfg.out) if cfg.out else Path(cfg.checkpoint) / "eval"
    check_writable(out)
    model, tok = api.load(cfg.checkpoint, device=cfg.device, dtype=cfg.dtype, tokenizer=cfg.tokenizer)
    merge_lora(model)
    scorer = Scorer(model, tok, batch_size=cfg.batch_size, kv_memory_mb=cfg.kv_memory_mb,
                    eos_ids=end_of_turn_ids(tok))
    t0 = time.perf_counter()
    results = run_tasks(cfg, scorer, tasks, out)
    if cfg.contamination:
        for label, rep in contamination(cfg, tasks).items():
            results[label]["contamination"] = rep
    report = {"checkpoint": str(Path(cfg.checkpoint).resolve()), "config": asdict(cfg), "results": results,
              "seconds": round(time.perf_counter() - t0, 2)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(report, indent=2) + "\n")
    print_table(results, f"{Path(cfg.checkpoint).resolve().name}")
    plot_summary(results, out / "summary.png", Path(cfg.checkpoint).resolve().name)
    log(f"wrote {out / 'results.json'} and {out / 'summary.png'}")
    return 0


def contamination(cfg: Config, tasks, splits: tuple[str, ...] = ("train",)) -> dict:
    from tqdm import tqdm

    from ember.data.decontam import NgramIndex, overlap_report, prepared_texts

    index = NgramIndex({t.label: t.texts(t.docs()) for t in tasks}, n=cfg.contamination_n)
    import itertools

    texts = itertools.chain.from_iterable(prepared_texts(cfg.contamination, s) for s in splits)
    docs = tqdm(texts, desc="contamination", unit=" docs", disable=not cfg.progress, file=sys.stderr)
    rep = overlap_report(index, docs)
    for label, r in rep.items():
        log(f"contamination {label}: {r['contaminated']} of {r['checked']} items share a {r['n']}-gram with "
            f"{cfg.contamination} ({100 * r['rate']:.1f}%; {r['too_short']} items too short to check)")
    return rep


HEADLINE = ("acc", "acc_norm", "acc_ambig", "acc_disambig", "exact_match", "f1", "pass@1", "pass@10",
            "word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity", "refusal_rate",
            "over_refusal_rate", "leak_rate")


def print_table(results: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"ember evaluate: {title}")
    for col in ("task", "metric", "value", "± stderr", "items", "seconds"):
        t.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for label, r in results.items():
        m = r["metrics"]
        first = True
        for k in HEADLINE:
            if k in m:
                se = m.get(f"{k}_stderr")
                t.add_row(label if first else "", k, f"{m[k]:.4f}", f"{se:.4f}" if se == se and se is not None else "",
                          str(m.get("n", "")) if first else "", f"{m['seconds']:.1f}" if first else "")
                first = False
    Console(stderr=False).print(t)


def plot_summary(results: dict, path: Path, title: str) -> None:
    """One bar per task: its headline metric (rates and accuracies on a 0-1 axis, perplexities apart)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ember.fileio import atomic_path

    bounded = [(label, r["primary"], r["metrics"][r["primary"]]) for label, r in results.items()
               if r["primary"] in r["metrics"] and "perplexity" not in r["primary"]]
    ppl = [(label, r["primary"], r["metrics"][r["primary"]]) for label, r in results.items()
           if "perplexity" in r["primary"] and r["primary"] in r["metrics"]]
    ncols = (1 if bounded else 0) + (1 if ppl else 0)
    if not ncols:
        return
    fig, axes = plt.subplots(1, ncols, figsize=(5 + 1.2 * max(len(bounded), len(ppl)), 4), squeeze=False)
    col = 0
    for rows, ylabel, ylim in ((bounded, "score", (0, 1)), (ppl, "perplexity", None)):
        if not rows:
            continue
        ax = axes[0][col]
        col += 1
        names = [f"{lab}\n{k}" for lab, k, _ in rows]
        vals = [v for _, _, v in rows]
        bars = ax.bar(range(len(rows)), vals, color="#d9622b")
        ax.set_xticks(range(len(rows)), names, fontsize=8)
        ax.set_ylabel(ylabel)
        if ylim:
            ax.set_ylim(*ylim)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"ember evaluate: {title}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
