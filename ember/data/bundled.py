"""The bundled corpus (tiny-shakespeare + the KJV Bible, public domain, in ember/assets/) and
`prepare_default`, which runs the full pipeline on it once and caches the result.

Cache location: `$EMBER_CACHE/prepared/default-v1-bpe<vocab>` when EMBER_CACHE is set, else
`~/.cache/ember/prepared/default-v1-bpe<vocab>`. A second call finds a manifest whose fingerprint
(asset hashes, vocab size, pipeline version) matches and returns at once. A file lock makes
concurrent callers (e.g. several ranks) wait for one prepare instead of racing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path

from ember.data import shards
from ember.data.pipeline import PrepareConfig, prepare
from ember.errors import EmberError
from ember.log import log

ASSETS = Path(__file__).resolve().parent.parent / "assets"
FILES = ("tinyshakespeare.jsonl.xz", "kjv.jsonl.xz")
VERSION = "default-v1"


def bundled_inputs() -> list[str]:
    """Paths of the bundled corpus files (JSONL, xz-compressed, one document per line)."""
    paths = [ASSETS / f for f in FILES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise EmberError(f"{', '.join(missing)}: bundled corpus missing from the installed package. "
                         "HINT: reinstall ember (`pip install -e .`) or pass --input FILES")
    return [str(p) for p in paths]


def cache_root() -> Path:
    """`$EMBER_CACHE` or `~/.cache/ember`."""
    return Path(os.environ.get("EMBER_CACHE") or Path.home() / ".cache" / "ember")


def default_dir(vocab_size: int = 4096) -> Path:
    return cache_root() / "prepared" / f"{VERSION}-bpe{vocab_size}"


def bundled_config(out: str | Path, vocab_size: int = 4096, num_proc: int = 2) -> PrepareConfig:
    """The prepare config used for the bundled corpus (library defaults, bundled inputs)."""
    return PrepareConfig(input=bundled_inputs(), out=str(out), vocab_size=vocab_size, num_proc=num_proc)


def _fingerprint(vocab_size: int) -> str:
    h = hashlib.sha256(f"{VERSION}:{vocab_size}:{shards.VERSION}".encode())
    for f in FILES:
        h.update((ASSETS / f).read_bytes())
    return h.hexdigest()


def is_prepared(out: Path, fingerprint: str) -> bool:
    """True when `out` holds a complete prepare of this exact corpus and settings."""
    try:
        m = shards.read_manifest(out)
        for files in m["splits"].values():
            for entry in files:
                shards.read_header(out / entry["file"])
    except EmberError:
        return False
    return m.get("bundled_fingerprint") == fingerprint and (out / "tokenizer").is_dir()


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_default(out_dir: str | Path | None = None, vocab_size: int = 4096, num_proc: int = 2) -> Path:
    """Prepare the bundled corpus (train a BPE of `vocab_size`, clean, dedup, shard) once; return its dir."""
    out = Path(out_dir) if out_dir else default_dir(vocab_size)
    fp = _fingerprint(vocab_size)
    if is_prepared(out, fp):
        return out
    with _lock(out.with_name(out.name + ".lock")):
        if is_prepared(out, fp):  # another process finished it while we waited
            return out
        log(f"preparing the bundled corpus (tiny-shakespeare + KJV) into {out} ...")
        manifest = prepare(bundled_config(out, vocab_size, num_proc), manifest_extra={"bundled_fingerprint": fp})
        log(f"prepared: {manifest['tokens']['train']:,} train / {manifest['tokens']['val']:,} val tokens")
    return out
