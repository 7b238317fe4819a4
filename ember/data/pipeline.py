"""`prepare`: raw documents -> clean, filter, dedup, scrub -> tokenizer -> token shards + manifest.

Stages:

    read (main) ─▶ chunks ─▶ Pool.imap, ordered: normalise, quality filter, scrub PII, fingerprint
                                  │
                                  ▼ (main, input order)
                   exact + near dedup ─▶ kept docs to a temp JSONL ─▶ train/val split by document
                                  │
                                  ▼
                   tokenizer (given or trained) ─▶ encode_batch ─▶ [EOS] doc [EOS] doc ... ─▶ shards
                                  │
                                  ▼
                   report.json, manifest.json (written last)

Workers only see chunks and return results in order, and dedup runs in the main process in input
order, so the output is byte-identical for any `num_proc`.

Nothing already written is lost: the whole dataset is built in a temporary directory beside `--out`
and moved in only when complete (the manifest last). A failed or interrupted run leaves `--out` as it
was. In an existing `--out`, only the files a previous ember manifest lists are replaced; a file ember
would write that is not ember's (someone's own `manifest.json`, `report.json`, `train_*.bin`, ...)
stops the run before any work, and other files are never touched.
"""

from __future__ import annotations

import codecs
import itertools
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ember.data import shards
from ember.data.clean import CleanConfig, normalize, scrub_pii
from ember.data.dedup import DedupConfig, Deduper, doc_fingerprint
from ember.data.filters import FilterConfig, quality_reason
from ember.data.readers import ReadConfig, ReadStats, read_documents
from ember.data.report import Report
from ember.errors import EmberError
from ember.fileio import atomic_write_text, check_writable, make_temp_dir


@dataclass
class SplitConfig:
    """Train/val split and shard size."""

    val_fraction: float = 0.01
    """Fraction of kept documents that go to the validation split."""
    min_val_docs: int = 4
    """At least this many validation documents (when there are enough documents)."""
    seed: int = 1234
    """Seed of the (deterministic) choice of validation documents."""
    shard_tokens: int = 10_000_000
    """Tokens per shard file (the last shard of a split may be shorter)."""

    def __post_init__(self) -> None:
        if self.shard_tokens < 1:
            raise ValueError(f"split.shard_tokens={self.shard_tokens}: expected at least 1 token per shard")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"split.val_fraction={self.val_fraction}: expected a fraction in [0, 1)")
        if self.min_val_docs < 0:
            raise ValueError(f"split.min_val_docs={self.min_val_docs}: expected a count >= 0")


@dataclass
class PrepareConfig:
    """Inputs, outputs and workers of `ember data prepare`; the stages have their own sub-configs."""

    input: list[str] = field(default_factory=list)
    """Input files or directories (.txt/.md, .jsonl, .parquet; also .gz/.xz). Empty = the bundled corpus."""
    out: str = "data/prepared/custom"
    """Output directory: shards, manifest.json, report.json, tokenizer/."""
    tokenizer: str = ""
    """Tokenizer to use (a dir with tokenizer.json, GPT-2 vocab.json+merges.txt, or a .tiktoken file).
    Empty = train a byte-level BPE tokenizer on the cleaned training documents."""
    vocab_size: int = 4096
    """Vocabulary size when a tokenizer is trained."""
    text_field: str = "text"
    """JSONL key / parquet column that holds the document text."""
    txt_separator: str = ""
    """Split .txt files into documents on this string ('\\n\\n\\n' style escapes are read as such);
    '' = one document per file."""
    skip_bad_lines: bool = False
    """Skip (and count) malformed JSONL lines instead of failing on the first one."""
    num_proc: int = 2
    """Worker processes for cleaning/filtering/fingerprinting (the output does not depend on it)."""
    chunk_docs: int = 64
    """Documents per work item sent to a worker."""
    progress: bool = True
    """Show progress bars (stderr)."""
    clean: CleanConfig = field(default_factory=CleanConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    split: SplitConfig = field(default_factory=SplitConfig)

    def __post_init__(self) -> None:
        if self.chunk_docs < 1:
            raise ValueError(f"chunk_docs={self.chunk_docs}: expected at least 1 document per work item")
        if self.num_proc < 1:
            raise ValueError(f"num_proc={self.num_proc}: expected at least 1 process")
        if self.vocab_size < 260:
            raise ValueError(f"vocab_size={self.vocab_size}: expected at least 260 (256 bytes + special tokens)")

    def read_config(self) -> ReadConfig:
        sep = self.txt_separator
        if "\\" in sep:  # typed on a command line: interpret \n, \t, ...
            sep = codecs.decode(sep, "unicode_escape")
        return ReadConfig(self.text_field, sep, self.skip_bad_lines)


# --------------------------------------------------------------------------- stage 1 (workers)
_WORKER_CFG: PrepareConfig | None = None


def _init_worker(cfg: PrepareConfig) -> None:
    global _WORKER_CFG
    _WORKER_CFG = cfg


def process_doc(text: str, cfg: PrepareConfig) -> tuple:
    """(drop reason | None, cleaned text | None, input bytes, pii counts, content hash, minhash)."""
    nbytes = len(text.encode("utf-8"))
    text = normalize(text, cfg.clean.normalization)
    reason = "empty" if not text.strip() else quality_reason(text, cfg.filter)
    if reason:
        return reason, None, nbytes, None, None, None
    pii = {"email": 0, "ip": 0, "phone": 0}
    if cfg.clean.scrub_pii:
        text, pii = scrub_pii(text, cfg.clean)
    digest, values = doc_fingerprint(text, cfg.dedup)
    return None, text, nbytes, pii, digest, values


def _process_chunk(chunk: list[str]) -> list[tuple]:
    return [process_doc(t, _WORKER_CFG) for t in chunk]


def _chunks(docs: Iterator[str], n: int) -> Iterator[list[str]]:
    while chunk := list(itertools.islice(docs, n)):
        yield chunk


def _mp_context():
    """fork (cheap: workers inherit the imports) unless torch.distributed is running in this process
    (its native threads make fork unsafe); then forkserver/spawn."""
    methods = mp.get_all_start_methods()
    dist = sys.modules.get("torch.distributed")
    busy = dist is not None and dist.is_available() and dist.is_initialized()
    if "fork" in methods and not busy:
        return mp.get_context("fork")
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


def _pool_results(cfg: PrepareConfig, docs: Iterator[str]) -> Iterator[tuple]:
    """Per-document results in input order, computed by `num_proc` processes.

    `Pool.imap` keeps results in order; a semaphore keeps at most 4 chunks per worker in flight, so
    memory stays bounded (imap's feeder thread would otherwise read the whole input ahead)."""
    chunks = _chunks(docs, cfg.chunk_docs)
    if cfg.num_proc <= 1:
        _init_worker(cfg)
        for chunk in chunks:
            yield from _process_chunk(chunk)
        return
    budget, stop = threading.Semaphore(cfg.num_proc * 4), threading.Event()

    def feed() -> Iterator[list[str]]:
        for chunk in chunks:
            budget.acquire()
            if stop.is_set():
                return
            yield chunk

    with _mp_context().Pool(cfg.num_proc, initializer=_init_worker, initargs=(cfg,)) as pool:
        try:
            for result in pool.imap(_process_chunk, feed()):
                budget.release()
                yield from result
        finally:  # unblock the feeder so the pool can shut down
            stop.set()
            for _ in range(cfg.num_proc * 4 + 1):
                budget.release()


def clean_and_dedup(cfg: PrepareConfig, work: Path, report: Report, stats: ReadStats, decontam=None) -> int:
    """Stage 1: write kept documents (in input order) to `work/clean.jsonl`; returns their count.
    `decontam` (a data.decontam.NgramIndex): documents sharing an n-gram with an evaluation item are
    dropped as "decontaminate:<task>" (the first task in name order)."""
    from tqdm import tqdm

    deduper = Deduper(cfg.dedup)
    kept = 0
    docs = read_documents(cfg.input, cfg.read_config(), stats)
    bar = tqdm(desc="clean/filter/dedup", unit=" docs", disable=not cfg.progress, file=sys.stderr)
    with open(work / "clean.jsonl", "w", encoding="utf-8") as f:
        for reason, text, nbytes, pii, digest, values in _pool_results(cfg, docs):
            bar.update(1)
            if reason is None and decontam is not None:
                hit = decontam.sources(text)
                reason = f"decontaminate:{min(hit)}" if hit else None
            if reason is None:
                reason = deduper.check(digest, values)
            if reason:
                report.drop(reason, nbytes)
                continue
            report.keep(nbytes, len(text.encode("utf-8")), pii)
            f.write(json.dumps(text, ensure_ascii=False) + "\n")
            kept += 1
    bar.close()
    return kept


# --------------------------------------------------------------------------- stages 2-4 (main)
def val_indices(n_docs: int, cfg: SplitConfig) -> set[int]:
    """Deterministic choice of validation documents by index."""
    if n_docs < 2:
        return set()
    n_val = min(n_docs // 2, max(cfg.min_val_docs, round(n_docs * cfg.val_fraction)))  # train keeps >= half
    return set(np.random.default_rng(cfg.seed).choice(n_docs, n_val, replace=False).tolist())


def _iter_clean(work: Path, val: set[int], want_val: bool) -> Iterator[str]:
    with open(work / "clean.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if (i in val) == want_val:
                yield json.loads(line)


def get_tokenizer(cfg: PrepareConfig, work: Path, val: set[int]):
    """The given tokenizer, or a byte-level BPE trained on the training documents."""
    from ember.tokenizer import Tokenizer, train_bpe

    if cfg.tokenizer:
        return Tokenizer.load(cfg.tokenizer)
    return train_bpe(_iter_clean(work, val, want_val=False), cfg.vocab_size)


def tokenize_to_shards(cfg: PrepareConfig, tok, work: Path, out: Path, val: set[int], n_docs: int) -> dict:
    """Stage 4: encode in batches ([EOS] before every document) and write the shards of both splits."""
    from tqdm import tqdm

    writers = {s: shards.ShardWriter(out, s, cfg.split.shard_tokens, tok.vocab_size, tok.eos_id)
               for s in ("train", "val")}
    docs = {"train": 0, "val": 0}
    bar = tqdm(total=n_docs, desc="tokenize", unit=" docs", disable=not cfg.progress, file=sys.stderr)
    with open(work / "clean.jsonl", encoding="utf-8") as f:
        lines = enumerate(f)
        while batch := list(itertools.islice(lines, 512)):
            ids = tok.encode_batch([json.loads(line) for _, line in batch])
            for (i, _), doc in zip(batch, ids):
                split = "val" if i in val else "train"
                writers[split].add(np.array([tok.eos_id, *doc], dtype=np.int64))
                docs[split] += 1
            bar.update(len(batch))
    bar.close()
    return {s: {"docs": docs[s], "shards": w.close()} for s, w in writers.items()}


def _ember_files(out: Path) -> set[str]:
    """Names in `out` that a previous ember prepare wrote (from its manifest); empty if there is none."""
    try:
        m = shards.read_manifest(out)
    except EmberError:
        return set()
    names = {shards.MANIFEST, "report.json", m.get("tokenizer") or "tokenizer"}
    names |= {e["file"] for entries in m["splits"].values() for e in entries}
    return names


def _foreign_files(out: Path, new: list[str] | None = None) -> list[str]:
    """Files in `out` that ember would overwrite but did not write."""
    if not out.is_dir():
        return []
    ours = _ember_files(out)
    ember_like = re.compile(r"(train|val)_\d+\.bin|manifest\.json|report\.json|tokenizer")
    names = new if new is not None else [p.name for p in out.iterdir() if ember_like.fullmatch(p.name)]
    return sorted(n for n in names if (out / n).exists() and n not in ours)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise EmberError(f"--out {out}: is a file, expected a directory. HINT: pick another --out")
    foreign = _foreign_files(out)
    if foreign:
        raise EmberError(f"--out {out}: holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, which "
                         "ember did not write (no ember manifest lists them) and would replace. HINT: choose a new "
                         "or empty --out directory")
    check_writable(out)


def _install(build: Path, out: Path) -> None:
    """Move the complete dataset in `build` to `out`: old ember files out first, the manifest in last."""
    if not out.exists():
        os.replace(build, out)
        return
    new = [p.name for p in build.iterdir()]
    foreign = _foreign_files(out, new)
    if foreign:  # appeared while we were working
        raise EmberError(f"--out {out}: {', '.join(foreign[:5])} appeared during the run and is not ember's "
                         "(nothing was replaced). HINT: move those files away and run again")
    old = Path(tempfile.mkdtemp(prefix=".prepare-old.", dir=out))
    ours = sorted(_ember_files(out), key=lambda n: n != shards.MANIFEST)  # manifest first: nothing half-old looks valid
    for name in ours:
        if (out / name).exists():
            os.replace(out / name, old / name)
    for name in sorted(new, key=lambda n: n == shards.MANIFEST):  # manifest last: its presence marks completion
        os.replace(build / name, out / name)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(build, ignore_errors=True)


def prepare(cfg: PrepareConfig, manifest_extra: dict | None = None, decontam=None) -> dict:
    """Run the whole pipeline into `cfg.out`; returns the manifest (with the report in it).

    `manifest_extra`: more keys for manifest.json (e.g. the bundled corpus's fingerprint).
    `decontam`: an NgramIndex of evaluation items whose overlapping documents are dropped."""
    from ember.config import to_dict

    if not cfg.input:
        raise EmberError("no --input given. HINT: pass --input FILE... (or use ember.data.bundled)")
    out = Path(cfg.out)
    _check_out(out)
    tok = get_tokenizer(cfg, out, set()) if cfg.tokenizer else None  # fail on a bad tokenizer before any work
    out.parent.mkdir(parents=True, exist_ok=True)
    build = make_temp_dir(out.parent, prefix=f".{out.resolve().name}.prepare.")
    work = build / ".work"
    work.mkdir()
    report, stats, t0 = Report(), ReadStats(), time.perf_counter()
    try:
        n_docs = clean_and_dedup(cfg, work, report, stats, decontam)
        report.read_stats(stats)
        if stats.docs == 0:
            raise EmberError(f"{', '.join(cfg.input)}: empty input (no documents). HINT: check the files")
        if n_docs == 0:
            raise EmberError(f"{', '.join(cfg.input)}: every document was dropped ({report.drop_summary()}). "
                             f"{_dropped_hint(cfg, report)}")
        t1 = time.perf_counter()
        val = val_indices(n_docs, cfg.split)
        tok = tok or get_tokenizer(cfg, work, val)
        t2 = time.perf_counter()
        splits = tokenize_to_shards(cfg, tok, work, build, val, n_docs)
        tok.save(build / "tokenizer")
        report.timing(clean=t1 - t0, tokenizer=t2 - t1, tokenize=time.perf_counter() - t2)
        manifest = {
            "format_version": shards.MANIFEST_VERSION, "shard_format_version": shards.VERSION,
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
            "dtype": np.dtype(shards.dtype_for_vocab(tok.vocab_size)).name, "tokenizer": "tokenizer",
            "tokens": {s: sum(x["tokens"] for x in v["shards"]) for s, v in splits.items()},
            "docs": {s: v["docs"] for s, v in splits.items()},
            "splits": {s: v["shards"] for s, v in splits.items()},
            "config": to_dict(cfg), "report": report.to_dict(), **(manifest_extra or {}),
        }
        shutil.rmtree(work)
        atomic_write_text(build / "report.json", json.dumps(report.to_dict(), indent=2) + "\n")
        shards.write_manifest(build, manifest)
        _install(build, out)
        return manifest
    finally:  # after a successful install `build` is gone; otherwise it is this run's partial work
        shutil.rmtree(build, ignore_errors=True)


def _dropped_hint(cfg: PrepareConfig, report: Report) -> str:
    hint = "HINT: loosen --filter.* thresholds or turn off --filter.enabled"
    txt = [p for p in cfg.input if Path(p).suffix in (".txt", ".md") or str(p).endswith((".txt.gz", ".txt.xz"))]
    if txt and not cfg.txt_separator and report.dropped.get("max_words"):
        hint += ("; a .txt file is one document unless --txt-separator is set (e.g. --txt-separator '\\n\\n' "
                 "for one document per paragraph)")
    return hint
