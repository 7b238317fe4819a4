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
import posixpath
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from ember.data import remote, shards
from ember.data.clean import CleanConfig
from ember.data.dedup import DedupConfig, Deduper
from ember.data.filters import FilterConfig
from ember.data.readers import ReadConfig, ReadStats, expand_inputs, read_file
from ember.data.report import Report
from ember.data.stage1 import (FragmentWriter, WorkDir, chunked, default_work_dir, drop_counts, fragment_names,
                               iter_fragment, process_doc, stage1_key)
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
    """Worker processes for cleaning/filtering/fingerprinting (the output does not depend on it); with
    --executor ray and no --ray-address, the CPUs of the local Ray instance."""
    executor: Literal["local", "ray"] = "local"
    """local: this machine's processes. ray: the same stages as a Ray Data pipeline on a Ray cluster
    (`pip install 'ray[data]'`); the output is identical, byte for byte."""
    ray_address: str = ""
    """With --executor ray: '' starts a Ray instance on this machine; 'auto' joins the running cluster
    (`ray start --head`), HOST:PORT a given one."""
    work_dir: str = ""
    """Where finished input files' results are kept until the run completes, so a killed run resumes
    without redoing them ('' = .NAME.prepare-work beside --out; a URL works, and a cluster needs one
    every node can reach)."""
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
        if self.executor not in ("local", "ray"):
            raise ValueError(f"executor={self.executor!r}: expected 'local' or 'ray'")
        if self.vocab_size < 260:
            raise ValueError(f"vocab_size={self.vocab_size}: expected at least 260 (256 bytes + special tokens)")

    def read_config(self) -> ReadConfig:
        sep = self.txt_separator
        if "\\" in sep:  # typed on a command line: interpret \n, \t, ...
            sep = codecs.decode(sep, "unicode_escape")
        return ReadConfig(self.text_field, sep, self.skip_bad_lines)


# --------------------------------------------------------------------------- stage 1 (workers)
_WORKER: tuple | None = None


def _init_worker(cfg: PrepareConfig, decontam=None) -> None:
    global _WORKER
    _WORKER = (cfg, decontam)


def _work_item(item: tuple) -> tuple:
    """(file index, chunk of texts) -> (file index, results); (file index, ReadStats) passes through."""
    i, payload = item
    if isinstance(payload, ReadStats):
        return item
    cfg, decontam = _WORKER
    return i, [process_doc(t, cfg, decontam) for t in payload]


def _mp_context():
    """fork (cheap: workers inherit the imports) unless torch.distributed is running in this process
    (its native threads make fork unsafe); then forkserver/spawn."""
    methods = mp.get_all_start_methods()
    dist = sys.modules.get("torch.distributed")
    busy = dist is not None and dist.is_available() and dist.is_initialized()
    if "fork" in methods and not busy:
        return mp.get_context("fork")
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


def _pool_map(cfg: PrepareConfig, decontam, items: Iterator[tuple]) -> Iterator[tuple]:
    """`_work_item` over `items`, in order, computed by `num_proc` processes.

    `Pool.imap` keeps results in order; a semaphore keeps at most 4 items per worker in flight, so
    memory stays bounded (imap's feeder thread would otherwise read the whole input ahead)."""
    if cfg.num_proc <= 1:
        _init_worker(cfg, decontam)
        yield from map(_work_item, items)
        return
    budget, stop = threading.Semaphore(cfg.num_proc * 4), threading.Event()

    def feed() -> Iterator[tuple]:
        for item in items:
            budget.acquire()
            if stop.is_set():
                return
            yield item

    with _mp_context().Pool(cfg.num_proc, initializer=_init_worker, initargs=(cfg, decontam)) as pool:
        try:
            for result in pool.imap(_work_item, feed()):
                budget.release()
                yield result
        finally:  # unblock the feeder so the pool can shut down
            stop.set()
            for _ in range(cfg.num_proc * 4 + 1):
                budget.release()


def run_stage1_local(cfg: PrepareConfig, files: list[str], todo: list[int], frags: list[str], work: WorkDir,
                     decontam, progress: "Progress") -> None:
    """Stage 1 on this machine: `num_proc` processes, chunks of `chunk_docs` documents (never across
    files); each finished file's fragment is committed as soon as its last chunk is back."""
    rc = cfg.read_config()

    def items() -> Iterator[tuple]:
        for i in todo:
            stats = ReadStats()
            for chunk in chunked(read_file(files[i], rc, stats), cfg.chunk_docs):
                yield i, chunk
            yield i, stats

    writer: FragmentWriter | None = None
    try:
        for i, payload in _pool_map(cfg, decontam, items()):
            writer = writer or FragmentWriter(work.staging(frags[i]))
            if isinstance(payload, ReadStats):
                work.commit(writer.close(payload), frags[i])
                writer = None
                progress.file_done(i)
            else:
                writer.add(payload)
                progress.add(len(payload), drop_counts(payload))
    finally:
        if writer is not None:  # interrupted mid-file: its partial fragment is not kept
            writer.path.unlink(missing_ok=True)


class Progress:
    """What a long prepare shows on stderr: input bytes done of the total (so an ETA), documents/s,
    and the documents dropped so far per rule."""

    def __init__(self, enabled: bool, sizes: dict[int, int], desc: str):
        """`sizes`: the bytes of each input file still to do, by file index."""
        from tqdm import tqdm

        self.sizes = sizes
        self.bar = tqdm(total=sum(self.sizes.values()), desc=desc, unit="B", unit_scale=True,
                        disable=not enabled, file=sys.stderr)
        self.t0, self.n, self.dropped, self.last = time.perf_counter(), 0, {}, 0.0

    def add(self, n: int, dropped: dict[str, int]) -> None:
        """`n` more documents done, `dropped` of them per rule."""
        self.n += n
        for k, v in dropped.items():
            self.dropped[k] = self.dropped.get(k, 0) + v
        now = time.perf_counter()
        if now - self.last > 0.5:
            self.last = now
            top = sorted(self.dropped.items(), key=lambda kv: -kv[1])[:4]
            self.bar.set_postfix_str(f"{self.n / (now - self.t0):,.0f} docs/s, {self.n:,} docs, dropped "
                                     + (", ".join(f"{k} {v:,}" for k, v in top) or "none"), refresh=False)

    def file_done(self, i: int) -> None:
        self.bar.update(self.sizes.get(i, 0))

    def close(self) -> None:
        self.bar.close()


def dedup_and_write(cfg: PrepareConfig, frags: list[str], work: WorkDir, local: Path, report: Report,
                    decide) -> int:
    """Fragments in input order -> exact/near dedup (`decide(global index, digest, minhash)`) -> the
    kept documents to `local/clean.jsonl`; fills `report`; returns the kept count."""
    from tqdm import tqdm

    stats, kept = ReadStats(), 0
    bar = tqdm(desc="dedup/write", unit=" docs", disable=not cfg.progress, file=sys.stderr)
    with open(local / "clean.jsonl", "w", encoding="utf-8") as f:
        for i, name in enumerate(frags):
            for j, (reason, text, nbytes, pii, digest, values) in enumerate(iter_fragment(work, name, stats)):
                bar.update(1)
                if reason is None:
                    reason = decide((i << 32) | j, digest, values)
                if reason:
                    report.drop(reason, nbytes)
                    continue
                report.keep(nbytes, len(text.encode("utf-8")), pii)
                f.write(json.dumps(text, ensure_ascii=False) + "\n")
                kept += 1
    bar.close()
    report.read_stats(stats)
    return kept


def clean_and_dedup(cfg: PrepareConfig, files: list[str], work: WorkDir, local: Path, report: Report,
                    decontam=None) -> int:
    """Stage 1 (the files not done yet, by the chosen executor) and dedup: kept documents, in input
    order, to `local/clean.jsonl`; returns their count."""
    identities = [remote.file_identity(f) for f in files]
    frags = fragment_names(files, identities, stage1_key(cfg, decontam))
    have = work.names()
    todo = [i for i, name in enumerate(frags) if name not in have]
    if len(todo) < len(files):
        from ember.log import log

        log(f"resuming: {len(files) - len(todo)} of {len(files)} input files already done in {work.location}")
    progress = Progress(cfg.progress, {i: identities[i].get("size") or 0 for i in todo},
                        f"clean/filter ({cfg.executor})")
    if cfg.executor == "ray":
        from ember.data import ray_executor
        from ember.log import log

        with ray_executor.session(cfg):
            try:
                ray_executor.run_stage1(cfg, files, todo, frags, work, decontam, progress)
            finally:
                progress.close()
            t = time.perf_counter()
            decisions = ray_executor.dedup_decisions(cfg, frags, work)
            if cfg.progress:
                log(f"dedup (ray): grouped by content hash and LSH band across the cluster, {len(decisions):,} "
                    f"duplicates found ({time.perf_counter() - t:.1f} s)")
        decide = lambda g, digest, values: decisions.get(g)  # noqa: E731
    else:
        try:
            run_stage1_local(cfg, files, todo, frags, work, decontam, progress)
        finally:
            progress.close()
        decide = Deduper(cfg.dedup).check_at
    return dedup_and_write(cfg, frags, work, local, report, decide)


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


_EMBER_LIKE = re.compile(r"(train|val)_\d+\.bin|manifest\.json|report\.json|tokenizer")
"""Names ember's prepare writes (a file so named that no ember manifest lists is someone else's)."""


def _ember_files(out: str | Path) -> set[str]:
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
    names = new if new is not None else [p.name for p in out.iterdir() if _EMBER_LIKE.fullmatch(p.name)]
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


RUN_ONLY = ("out", "executor", "ray_address", "work_dir")
"""Settings that decide where and how a run executes, not what it produces: left out of the manifest,
so the executors' manifests are identical and a dataset copied elsewhere keeps a true manifest."""


def _check_out_url(out: str) -> None:
    fs, root = remote.filesystem(out)
    if fs.isfile(root):
        raise EmberError(f"--out {out}: is a file, expected a directory. HINT: pick another --out")
    names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)} if fs.isdir(root) else set()
    ours = _ember_files(out)
    foreign = sorted(n for n in names if _EMBER_LIKE.fullmatch(n) and n not in ours)
    if foreign:
        raise EmberError(f"--out {out}: holds {', '.join(foreign[:5])}, which ember did not write (no ember "
                         "manifest lists them) and would replace. HINT: choose a new or empty --out URL")


def _install_url(build: Path, out: str) -> None:
    """Upload the complete dataset in `build` to the URL `out`: the old manifest is removed first (so
    nothing half-replaced looks valid), then the new files, the manifest last, then stale old shards."""
    fs, root = remote.filesystem(out)
    fs.makedirs(root, exist_ok=True)
    old = _ember_files(out)
    new = sorted(p.name for p in build.iterdir())
    if shards.MANIFEST in old and fs.exists(posixpath.join(root, shards.MANIFEST)):
        fs.rm(posixpath.join(root, shards.MANIFEST))
    for name in new:
        if name == shards.MANIFEST:
            continue
        if (build / name).is_dir():
            for f in sorted((build / name).rglob("*")):
                if f.is_file():
                    fs.makedirs(posixpath.join(root, name, *f.relative_to(build / name).parent.parts), exist_ok=True)
                    fs.put_file(str(f), posixpath.join(root, name, *f.relative_to(build / name).parts))
        else:
            fs.put_file(str(build / name), posixpath.join(root, name))
    tmp = posixpath.join(root, f".{shards.MANIFEST}.{os.getpid()}.tmp")
    fs.put_file(str(build / shards.MANIFEST), tmp)
    fs.mv(tmp, posixpath.join(root, shards.MANIFEST))
    for name in sorted(old - set(new)):
        if fs.exists(posixpath.join(root, name)):
            fs.rm(posixpath.join(root, name), recursive=True)


def prepare(cfg: PrepareConfig, manifest_extra: dict | None = None, decontam=None) -> dict:
    """Run the whole pipeline into `cfg.out` (a directory or a URL); returns the manifest (with the
    report in it).

    `manifest_extra`: more keys for manifest.json (e.g. the bundled corpus's fingerprint).
    `decontam`: an NgramIndex of evaluation items whose overlapping documents are dropped.
    A run that fails or is killed keeps the finished files' stage-1 results in the work directory
    (`--work-dir`), and the same command then resumes from them; a successful run removes it."""
    from ember.config import to_dict
    from ember.log import log

    if not cfg.input:
        raise EmberError("no --input given. HINT: pass --input FILE... (or use ember.data.bundled)")
    url_out = remote.is_url(cfg.out)
    if url_out:
        _check_out_url(cfg.out)
    else:
        _check_out(Path(cfg.out))
    if cfg.executor == "ray":
        from ember.data import ray_executor

        ray_executor.check_locations(cfg)
    tok = get_tokenizer(cfg, Path("."), set()) if cfg.tokenizer else None  # fail on a bad tokenizer before any work
    files = expand_inputs(cfg.input)
    work = WorkDir(cfg.work_dir or default_work_dir(cfg.out))
    if url_out:
        build = Path(tempfile.mkdtemp(prefix=".prepare.", suffix=".tmp"))
    else:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        build = make_temp_dir(out.parent, prefix=f".{out.resolve().name}.prepare.")
    local = build / ".work"
    local.mkdir()
    report, t0 = Report(), time.perf_counter()
    try:
        n_docs = clean_and_dedup(cfg, files, work, local, report, decontam)
        if report.input["docs"] == 0:
            raise EmberError(f"{', '.join(cfg.input)}: empty input (no documents). HINT: check the files")
        if n_docs == 0:
            raise EmberError(f"{', '.join(cfg.input)}: every document was dropped ({report.drop_summary()}). "
                             f"{_dropped_hint(cfg, report)}")
        t1 = time.perf_counter()
        val = val_indices(n_docs, cfg.split)
        tok = tok or get_tokenizer(cfg, local, val)
        t2 = time.perf_counter()
        splits = tokenize_to_shards(cfg, tok, local, build, val, n_docs)
        tok.save(build / "tokenizer")
        report.timing(clean=t1 - t0, tokenizer=t2 - t1, tokenize=time.perf_counter() - t2)
        config = {k: v for k, v in to_dict(cfg).items() if k not in RUN_ONLY}
        manifest = {
            "format_version": shards.MANIFEST_VERSION, "shard_format_version": shards.VERSION,
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
            "dtype": np.dtype(shards.dtype_for_vocab(tok.vocab_size)).name, "tokenizer": "tokenizer",
            "tokens": {s: sum(x["tokens"] for x in v["shards"]) for s, v in splits.items()},
            "docs": {s: v["docs"] for s, v in splits.items()},
            "splits": {s: v["shards"] for s, v in splits.items()},
            "config": config, "report": report.to_dict(), **(manifest_extra or {}),
        }
        shutil.rmtree(local)
        atomic_write_text(build / "report.json", json.dumps(report.to_dict(), indent=2) + "\n")
        shards.write_manifest(build, manifest)
        if url_out:
            _install_url(build, cfg.out)
        else:
            _install(build, Path(cfg.out))
        work.remove()
        return manifest
    except BaseException:
        if work.names():
            log(f"prepare stopped; the finished input files' work is kept in {work.location}: run the same "
                "command again to resume from it (or delete that directory to start over)")
        raise
    finally:  # after a successful install `build` is gone; otherwise it is this run's partial work
        shutil.rmtree(build, ignore_errors=True)


def _dropped_hint(cfg: PrepareConfig, report: Report) -> str:
    hint = "HINT: loosen --filter.* thresholds or turn off --filter.enabled"
    txt = [p for p in cfg.input if Path(p).suffix in (".txt", ".md") or str(p).endswith((".txt.gz", ".txt.xz"))]
    if txt and not cfg.txt_separator and report.dropped.get("max_words"):
        hint += ("; a .txt file is one document unless --txt-separator is set (e.g. --txt-separator '\\n\\n' "
                 "for one document per paragraph)")
    return hint
