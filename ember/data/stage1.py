"""Stage 1 of `ember data prepare`, per input file, shared by the local and the Ray executor.

Stage 1 runs per input file and writes that file's results to a *fragment* (parquet) in the work
directory: one row per document (drop reason or cleaned text, sizes, PII counts, content hash,
MinHash signature) and the file's read counters as metadata. A fragment appears under its final
name only when complete, and its name carries a key of the file (path, size, modification stamp)
and of every setting stage 1 depends on, so a rerun of a killed job skips the files already done,
and a changed file or setting is redone. Dedup, the split and tokenization then read the fragments
in input order (documents are numbered file << 32 | position), which is why both executors give
identical output.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ember.data import remote
from ember.data.clean import normalize, scrub_pii
from ember.data.dedup import doc_fingerprint
from ember.data.filters import quality_reason
from ember.data.readers import ReadStats

FRAGMENT_VERSION = 1
_STATS_KEY = b"ember.read_stats"


def process_doc(text: str, cfg, decontam=None) -> tuple:
    """(drop reason | None, cleaned text | None, input bytes, pii counts, content hash, minhash).

    `decontam` (a data.decontam.NgramIndex): a document sharing an n-gram with an evaluation item is
    dropped as "decontaminate:<task>" (the first task in name order)."""
    nbytes = len(text.encode("utf-8"))
    text = normalize(text, cfg.clean.normalization)
    reason = "empty" if not text.strip() else quality_reason(text, cfg.filter)
    if reason:
        return reason, None, nbytes, None, None, None
    pii = {"email": 0, "ip": 0, "phone": 0}
    if cfg.clean.scrub_pii:
        text, pii = scrub_pii(text, cfg.clean)
    if decontam is not None:
        hit = decontam.sources(text)
        if hit:
            return f"decontaminate:{min(hit)}", None, nbytes, None, None, None
    digest, values = doc_fingerprint(text, cfg.dedup)
    return None, text, nbytes, pii, digest, values


def drop_counts(results: list[tuple]) -> dict[str, int]:
    """How many of `process_doc`'s results were dropped, per rule (for the progress view)."""
    out: dict[str, int] = {}
    for r in results:
        if r[0]:
            out[r[0]] = out.get(r[0], 0) + 1
    return out


def chunked(docs: Iterator[str], n: int) -> Iterator[list[str]]:
    while chunk := list(itertools.islice(docs, n)):
        yield chunk


def _schema():
    import pyarrow as pa

    return pa.schema([("reason", pa.string()), ("text", pa.string()), ("nbytes", pa.int64()),
                      ("email", pa.int32()), ("ip", pa.int32()), ("phone", pa.int32()),
                      ("digest", pa.binary(16)), ("minhash", pa.list_(pa.uint64()))])


class FragmentWriter:
    """One input file's stage-1 results -> a parquet file at `path` (streamed in row groups)."""

    ROWS = 2048

    def __init__(self, path: Path):
        import pyarrow.parquet as pq

        self.path, self.rows = path, []
        self.writer = pq.ParquetWriter(path, _schema(), compression="zstd")

    def add(self, results: list[tuple]) -> None:
        self.rows += results
        if len(self.rows) >= self.ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if not self.rows:
            return
        r = self.rows
        cols = {"reason": [x[0] for x in r], "text": [x[1] for x in r], "nbytes": [x[2] for x in r],
                **{k: [x[3][k] if x[3] else None for x in r] for k in ("email", "ip", "phone")},
                "digest": [x[4] for x in r], "minhash": [x[5] for x in r]}
        self.writer.write_table(pa.table(cols, schema=_schema()))
        self.rows = []

    def close(self, stats: ReadStats) -> Path:
        self._flush()
        counts = {k: getattr(stats, k) for k in ("files", "docs", "bytes", "bad_utf8_docs", "bad_utf8_chars", "bad_lines")}
        self.writer.add_key_value_metadata({_STATS_KEY: json.dumps(counts).encode()})
        self.writer.close()
        return self.path


class WorkDir:
    """Where stage-1 fragments live between runs: a local directory or a URL (shared by a cluster)."""

    def __init__(self, location: str):
        self.location = location
        self.url = remote.is_url(location)

    def _fs(self):
        return remote.filesystem(self.location)

    def names(self) -> set[str]:
        if self.url:
            fs, root = self._fs()
            return {posixpath.basename(p) for p in fs.ls(root, detail=False)} if fs.isdir(root) else set()
        p = Path(self.location)
        return {x.name for x in p.iterdir()} if p.is_dir() else set()

    def staging(self, name: str) -> Path:
        """A local temporary path to write `name` to before `commit`."""
        if not self.url:
            Path(self.location).mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=None if self.url else self.location)
        os.close(fd)
        return Path(tmp)

    def commit(self, staged: Path, name: str) -> None:
        """Make a staged file visible under its final name (rename: never a half-written fragment)."""
        if not self.url:
            os.replace(staged, Path(self.location) / name)
            return
        fs, root = self._fs()
        fs.makedirs(root, exist_ok=True)
        tmp = posixpath.join(root, f".{name}.{os.getpid()}.tmp")
        try:
            fs.put_file(str(staged), tmp)
            fs.mv(tmp, posixpath.join(root, name))
        finally:
            staged.unlink(missing_ok=True)

    def open(self, name: str):
        return remote.open_file(remote.join(self.location, name), "rb")

    def remove(self) -> None:
        if self.url:
            fs, root = self._fs()
            if fs.exists(root):
                fs.rm(root, recursive=True)
        else:
            shutil.rmtree(self.location, ignore_errors=True)


def stage1_key(cfg, decontam=None) -> str:
    """Every setting stage 1 depends on (not the executor, workers or outputs)."""
    from ember.config import to_dict

    parts = {"version": FRAGMENT_VERSION, "read": to_dict(cfg.read_config()), "clean": to_dict(cfg.clean),
             "filter": to_dict(cfg.filter), "dedup": to_dict(cfg.dedup),
             "decontam": decontam.fingerprint() if decontam is not None else None}
    return json.dumps(parts, sort_keys=True)


def fragment_names(files: list[str], identities: list[dict], key: str) -> list[str]:
    """The fragment name of each input file: its position and a hash of (file, its identity
    (`remote.file_identity`), `key`)."""
    out = []
    for i, (f, identity) in enumerate(zip(files, identities)):
        ident = json.dumps([identity, key], sort_keys=True)
        where = f if remote.is_url(f) else str(Path(f).resolve())
        h = hashlib.blake2b(f"{where}\0{ident}".encode(), digest_size=10).hexdigest()
        out.append(f"{i:06d}-{h}.parquet")
    return out


def iter_fragment(work: WorkDir, name: str, stats: ReadStats) -> Iterator[tuple]:
    """The rows of one fragment, in order: (reason, text, nbytes, pii, digest, minhash | None);
    the file's read counters are added to `stats`."""
    import pyarrow.parquet as pq

    with work.open(name) as f:
        pf = pq.ParquetFile(f)
        counts = json.loads((pf.metadata.metadata or {}).get(_STATS_KEY, b"{}"))
        for k, v in counts.items():
            setattr(stats, k, getattr(stats, k) + v)
        for batch in pf.iter_batches(batch_size=4096):
            c = batch.to_pydict()
            mh = batch.column("minhash")
            offsets, values = mh.offsets.to_numpy(), mh.values.to_numpy()
            for j in range(batch.num_rows):
                a, b = offsets[j], offsets[j + 1]
                pii = {"email": c["email"][j], "ip": c["ip"][j], "phone": c["phone"][j]}
                yield (c["reason"][j], c["text"][j], c["nbytes"][j], pii, c["digest"][j],
                       values[a:b] if b > a else None)


def default_work_dir(out: str) -> str:
    return remote.sibling(out, f".{remote.basename(out)}.prepare-work")
