"""Binary token shards and the prepared-data manifest.

A shard file (`train_000000.bin`, `val_000000.bin`, ...) is a 64-byte little-endian header followed
by the raw tokens:

    offset  size  field
    0       8     magic b"EMBERTOK"
    8       4     format version (uint32, currently 1)
    12      4     dtype code (uint32): 2 = uint16 (vocab < 65536), 4 = uint32
    16      8     token count (uint64)
    24      4     header size in bytes (uint32, 64)
    28      4     vocab size (uint32)
    32      4     eos id (uint32)
    36      8     first 8 bytes of the BLAKE2b-64 digest of the token bytes (checked with verify=True)
    44      20    zero padding

`manifest.json` (written last, atomically) lists the shards per split with token counts and sha256,
and records vocab_size, eos_id, dtype, the tokenizer dir (`tokenizer/`), the prepare config and the
report. A directory without a manifest is not a prepared dataset.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import struct
from pathlib import Path

import numpy as np

from ember.errors import EmberError
from ember.fileio import atomic_path, atomic_write_text

MAGIC = b"EMBERTOK"
VERSION = 1
HEADER_SIZE = 64
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_HEADER = struct.Struct("<8sIIQIII8s20x")
_DTYPES = {2: np.uint16, 4: np.uint32}
HINT = "HINT: re-run `ember data prepare --input ... --out DIR` to regenerate the shards"


def dtype_for_vocab(vocab_size: int) -> type:
    """uint16 when every id fits (vocab < 65536), else uint32."""
    return np.uint16 if vocab_size < 65536 else np.uint32


def _digest(tokens: np.ndarray) -> bytes:
    return hashlib.blake2b(memoryview(np.ascontiguousarray(tokens)).cast("B"), digest_size=8).digest()


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int, eos_id: int) -> str:
    """Write header + tokens atomically; returns the file's sha256 (hex)."""
    dtype = dtype_for_vocab(vocab_size)
    tokens = np.ascontiguousarray(tokens, dtype=dtype)
    header = _HEADER.pack(MAGIC, VERSION, np.dtype(dtype).itemsize, len(tokens), HEADER_SIZE,
                          vocab_size, eos_id, _digest(tokens))
    sha = hashlib.sha256(header)
    sha.update(memoryview(tokens).cast("B"))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header)
        tokens.tofile(f)
    return sha.hexdigest()


def read_header(path: str | Path) -> dict:
    """Parse and check a shard header (magic, version, dtype, size against the file length)."""
    path = Path(path)
    if not path.is_file():
        raise EmberError(f"{path}: shard file is missing. {HINT}")
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE or raw[:8] != MAGIC:
        raise EmberError(f"{path}: not an ember token shard (bad magic {raw[:8]!r}, expected {MAGIC!r}). {HINT}")
    magic, version, code, count, hsize, vocab, eos, digest = _HEADER.unpack(raw)
    if version != VERSION:
        raise EmberError(f"{path}: shard format version {version}, this ember reads version {VERSION}. {HINT}")
    if code not in _DTYPES or hsize != HEADER_SIZE:
        raise EmberError(f"{path}: corrupt shard header (dtype code {code}, header size {hsize}). {HINT}")
    expected = HEADER_SIZE + count * code
    size = path.stat().st_size
    if size != expected:
        raise EmberError(f"{path}: truncated or padded shard ({size} bytes, header says {expected}). {HINT}")
    return {"version": version, "dtype": np.dtype(_DTYPES[code]).name, "count": count,
            "vocab_size": vocab, "eos_id": eos, "digest": digest}


def read_shard(path: str | Path, verify: bool = False, sha256: str | None = None) -> np.ndarray:
    """Memory-map a shard's tokens (read-only).

    `verify=True` also reads the file once: the header's token digest must match, every id must be below
    the header's vocab size, and (given the manifest's `sha256`) the whole file's hash must match."""
    h = read_header(path)
    tokens = np.memmap(path, dtype=h["dtype"], mode="r", offset=HEADER_SIZE, shape=(h["count"],))
    if verify:
        if _digest(tokens) != h["digest"]:
            raise EmberError(f"{path}: token checksum mismatch (the file is corrupt). {HINT}")
        if sha256 is not None and _file_sha256(path) != sha256:
            raise EmberError(f"{path}: sha256 differs from the manifest's (the file was changed or replaced). {HINT}")
        check_ids(tokens, h["vocab_size"], path)
    return tokens


def _file_sha256(path: str | Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()


def check_ids(tokens: np.ndarray, vocab_size: int, path: str | Path, start: int = 0) -> None:
    """Every id < vocab_size, else an error naming the file and the token offset of the first bad id."""
    if len(tokens) and int(tokens.max()) >= vocab_size:
        i = int(np.argmax(np.asarray(tokens) >= vocab_size))
        raise EmberError(f"{path}: token {start + i} is id {int(tokens[i])}, outside the vocabulary (vocab_size "
                         f"{vocab_size}): the shard is corrupt or belongs to another tokenizer. {HINT}")


def tokenizer_dir(data_dir: str | Path) -> Path | None:
    """The tokenizer directory a prepared dataset records (None when it has none)."""
    tok = read_manifest(data_dir).get("tokenizer")
    return (Path(data_dir) / tok) if tok and (Path(data_dir) / tok).is_dir() else None


class ShardWriter:
    """Appends token arrays and cuts them into shards of `shard_tokens` tokens: `<split>_NNNNNN.bin`."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, vocab_size: int, eos_id: int):
        self.out_dir, self.split, self.shard_tokens = Path(out_dir), split, shard_tokens
        self.vocab_size, self.eos_id = vocab_size, eos_id
        self.dtype = dtype_for_vocab(vocab_size)
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        self.buf.append(np.asarray(tokens, dtype=self.dtype))
        self.buffered += len(tokens)
        while self.buffered >= self.shard_tokens:
            flat = np.concatenate(self.buf)
            self._write(flat[: self.shard_tokens])
            rest = flat[self.shard_tokens:]
            self.buf, self.buffered = ([rest] if len(rest) else []), len(rest)

    def close(self) -> list[dict]:
        if self.buffered:
            self._write(np.concatenate(self.buf))
            self.buf, self.buffered = [], 0
        return self.shards

    def _write(self, tokens: np.ndarray) -> None:
        name = f"{self.split}_{len(self.shards):06d}.bin"
        sha = write_shard(self.out_dir / name, tokens, self.vocab_size, self.eos_id)
        self.shards.append({"file": name, "tokens": int(len(tokens)), "sha256": sha})


def write_manifest(out_dir: Path, manifest: dict) -> None:
    atomic_write_text(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(data_dir: str | Path) -> dict:
    """Load and check `<data_dir>/manifest.json` (`data_dir` may be a URL)."""
    from ember.data import remote

    url = remote.is_url(str(data_dir))
    path = remote.join(str(data_dir), MANIFEST) if url else Path(data_dir) / MANIFEST
    try:
        if url:
            fs, inner = remote.filesystem(str(data_dir))
            text = fs.cat_file(posixpath.join(inner, MANIFEST)).decode("utf-8")
        else:
            text = path.read_text()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise EmberError(f"{path}: no manifest, so {data_dir} is not a prepared dataset (or its prepare was "
                         f"interrupted). {HINT}") from None
    try:
        m = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise EmberError(f"{path}: unreadable manifest ({e}). {HINT}") from None
    if not isinstance(m, dict) or m.get("format_version") != MANIFEST_VERSION or "splits" not in m:
        raise EmberError(f"{path}: manifest format version {m.get('format_version') if isinstance(m, dict) else '?'}, "
                         f"expected {MANIFEST_VERSION}. {HINT}")
    return m


def split_files(data_dir: str | Path, split: str, manifest: dict | None = None) -> list[dict]:
    """The manifest's shard entries of `split` (each {"file", "tokens", "sha256"})."""
    m = manifest or read_manifest(data_dir)
    if split not in m["splits"]:
        raise EmberError(f"{Path(data_dir) / MANIFEST}: no split '{split}', have {sorted(m['splits'])}. {HINT}")
    return m["splits"][split]
