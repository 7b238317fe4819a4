"""A local cache of prepared datasets at URLs, for training (`TokenLoader`, `ember pretrain`).

The cache (`$EMBER_CACHE/remote/<hash of the URL>/`, default ~/.cache/ember) holds the manifest, the
tokenizer and the shards fetched so far. A shard is downloaded to a temporary name, checked against
the manifest's sha256, and only then renamed, so the cache never holds a shard that looks valid but
is not; a shard already there is reused when the manifest still lists the same sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from pathlib import Path

from ember.data import shards
from ember.data.remote import filesystem
from ember.errors import EmberError


def cache_root() -> Path:
    return Path(os.environ.get("EMBER_CACHE") or Path.home() / ".cache" / "ember") / "remote"


SOURCE = "source.json"
"""In a cache directory: the URL it mirrors (so `TokenLoader` knows where to fetch missing shards)."""


def cached_dataset(url: str, cache_dir: str | Path | None = None) -> Path:
    """A local directory that mirrors the prepared dataset at `url`: its manifest (always re-read, so a
    re-prepared dataset is noticed) and tokenizer now; shards on first use (`ensure_shard`)."""
    from ember.fileio import atomic_write_bytes, atomic_write_text

    fs, inner = filesystem(url)
    local = Path(cache_dir) if cache_dir else cache_root() / hashlib.blake2b(url.rstrip("/").encode(),
                                                                              digest_size=8).hexdigest()
    local.mkdir(parents=True, exist_ok=True)
    try:
        raw = fs.cat_file(posixpath.join(inner, shards.MANIFEST))
    except FileNotFoundError:
        raise EmberError(f"{url}: no {shards.MANIFEST}, so not a prepared dataset. HINT: run `ember data prepare "
                         f"--input ... --out {url}` first") from None
    atomic_write_text(local / SOURCE, json.dumps({"url": url}) + "\n")
    atomic_write_bytes(local / shards.MANIFEST, raw)
    manifest = shards.read_manifest(local)
    tok = manifest.get("tokenizer")
    if tok and fs.isdir(posixpath.join(inner, tok)):
        for name in fs.ls(posixpath.join(inner, tok), detail=False):
            leaf = posixpath.basename(name.rstrip("/"))
            atomic_write_bytes(local / tok / leaf, fs.cat_file(posixpath.join(inner, tok, leaf)))
    return local


def source_of(data_dir: str | Path) -> str | None:
    """The URL a cache directory mirrors, or None for an ordinary local dataset."""
    try:
        return json.loads((Path(data_dir) / SOURCE).read_text())["url"]
    except (OSError, ValueError, KeyError):
        return None


def ensure_shard(data_dir: Path, entry: dict) -> None:
    """Fetch one shard of a cached dataset unless an intact copy is there (sha256 from the manifest)."""
    from ember.fileio import atomic_path

    url = source_of(data_dir)
    path = data_dir / entry["file"]
    if url is None:
        return
    mark = path.with_name(path.name + ".sha256")
    if path.exists() and mark.exists() and mark.read_text().strip() == entry.get("sha256", ""):
        return
    fs, inner = filesystem(url)
    h = hashlib.sha256()
    with atomic_path(path) as tmp:
        with fs.open(posixpath.join(inner, entry["file"]), "rb") as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 22):
                h.update(block)
                dst.write(block)
        if entry.get("sha256") and h.hexdigest() != entry["sha256"]:
            raise EmberError(f"{url}/{entry['file']}: sha256 {h.hexdigest()[:16]}... but the manifest says "
                             f"{entry['sha256'][:16]}... (changed while reading, or corrupt). HINT: re-run "
                             "`ember data prepare` for that URL")
    mark.write_text(entry.get("sha256", "") + "\n")
