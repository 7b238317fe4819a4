"""Input readers: .txt, .jsonl and .parquet files (plain, .gz or .xz) -> a stream of documents.

* `.txt`: the whole file is one document, or it is split on `ReadConfig.txt_separator`.
* `.jsonl`: one JSON object per line; the document is `obj[text_field]` (a string). A `.json` file
  that starts with '[' is read as one array of such objects.
* `.parquet`: the column `text_field` (read in record batches with pyarrow).
Bytes are decoded as UTF-8; invalid sequences become U+FFFD and are counted
(`ReadStats.bad_utf8_docs`, `.bad_utf8_chars`). Bad input raises `EmberError` naming the file (and
line); with `skip_bad_lines` a malformed JSONL line is skipped and counted instead.
"""

from __future__ import annotations

import gzip
import json
import lzma
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

from ember.data import remote
from ember.errors import EmberError

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".md")


@dataclass
class ReadConfig:
    """How input files are read."""

    text_field: str = "text"
    """JSONL key / parquet column that holds the document text."""
    txt_separator: str = ""
    """Split .txt files into documents on this string (e.g. '\\n\\n\\n'); '' = one document per file."""
    skip_bad_lines: bool = False
    """Skip (and count) malformed JSONL lines instead of failing on the first one."""


@dataclass
class ReadStats:
    """Counters filled while reading."""

    files: int = 0
    docs: int = 0
    bytes: int = 0
    bad_utf8_docs: int = 0
    bad_utf8_chars: int = 0
    bad_lines: int = 0
    skipped_non_text: list[str] = field(default_factory=list)


def _open(path: str) -> IO[bytes]:
    """A local path or a URL (fsspec), decompressed by its .gz/.xz suffix."""
    name = str(path).lower()
    raw = remote.open_file(path, "rb")
    if name.endswith(".gz"):
        return gzip.open(raw, "rb")
    if name.endswith(".xz"):
        return lzma.open(raw, "rb")
    return raw


def _base_suffix(path: str | Path) -> str:
    name = str(path).rstrip("/").rsplit("/", 1)[-1].lower()
    for comp in (".gz", ".xz"):
        if name.endswith(comp):
            name = name[: -len(comp)]
    return Path(name).suffix


def decode(data: bytes, stats: ReadStats) -> str:
    """UTF-8 decode; invalid bytes become U+FFFD and are counted."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        stats.bad_utf8_docs += 1
        stats.bad_utf8_chars += text.count("\ufffd") - data.count("\ufffd".encode())
        return text


def expand_inputs(paths: list[str | Path]) -> list[str]:
    """Files as given; directories expand to their readable files (sorted, recursive), globs to their
    readable matches (sorted). Local paths or URLs (`s3://bucket/dir/*.jsonl.gz`, ...). A file given by
    name whose type ember does not read is an error here, before any file is read."""
    out = remote.expand([str(p) for p in paths], lambda name: _base_suffix(name) in SUFFIXES)
    for path in out:
        check_readable(path)
    if not out:
        raise EmberError(f"{', '.join(map(str, paths)) or '(none)'}: no input files found, expected "
                         f"{'/'.join(SUFFIXES)} files (optionally .gz/.xz). HINT: pass --input FILE...")
    return out


def _read_txt(path: Path, cfg: ReadConfig, stats: ReadStats) -> Iterator[str]:
    with _open(path) as f:
        text = decode(f.read(), stats)
    yield from (text.split(cfg.txt_separator) if cfg.txt_separator else [text])


def _field(obj: dict, where: str, cfg: ReadConfig, stats: ReadStats) -> str | None:
    """The record's text; a record without a string there is an error, or (skip_bad_lines) None, counted."""
    text = obj.get(cfg.text_field)
    if isinstance(text, str):
        return text
    if cfg.skip_bad_lines:
        stats.bad_lines += 1
        return None
    if cfg.text_field not in obj:
        what = f"missing (keys are {sorted(obj)[:8]})"
        hint = "HINT: pass --text-field NAME, or --skip-bad-lines to skip such records"
    else:
        what = "null" if text is None else f"a {type(text).__name__}, not a string"
        hint = "HINT: fix the record, or pass --skip-bad-lines to skip such records"
    raise EmberError(f"{where}: field '{cfg.text_field}' is {what}. {hint}")


def _read_json_array(path: Path, cfg: ReadConfig, stats: ReadStats) -> Iterator[str]:
    """A .json file holding one array of objects (else it is read as JSONL)."""
    with _open(path) as f:
        try:
            records = json.loads(decode(f.read(), stats))
        except ValueError as e:
            raise EmberError(f"{path}: not valid JSON ({e}), expected an array of objects. HINT: fix the file") from None
    for i, obj in enumerate(records):
        if not isinstance(obj, dict):
            raise EmberError(f"{path}: item {i} is a {type(obj).__name__}, expected an object with "
                             f"'{cfg.text_field}'. HINT: pass JSONL or an array of objects")
        text = _field(obj, f"{path}: item {i}", cfg, stats)
        if text is not None:
            yield text


def _starts_with_bracket(path: Path) -> bool:
    with _open(path) as f:
        return f.read(4096).lstrip()[:1] == b"["


def _read_jsonl(path: Path, cfg: ReadConfig, stats: ReadStats) -> Iterator[str]:
    if _base_suffix(path) == ".json" and _starts_with_bracket(path):
        yield from _read_json_array(path, cfg, stats)
        return
    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(decode(raw, stats))
                if not isinstance(obj, dict):
                    raise ValueError(f"a JSON {type(obj).__name__}, not an object")
            except ValueError as e:
                if cfg.skip_bad_lines:
                    stats.bad_lines += 1
                    continue
                raise EmberError(f"{path}:{lineno}: malformed JSONL line ({e}), expected one JSON object "
                                 "per line. HINT: fix the line or pass --skip-bad-lines") from None
            text = _field(obj, f"{path}:{lineno}", cfg, stats)
            if text is not None:
                yield text


def _read_parquet(path: Path, cfg: ReadConfig, stats: ReadStats) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(remote.open_file(path, "rb") if remote.is_url(path) else path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise EmberError(f"{path}: not a readable parquet file ({e}). HINT: check the file") from None
    if cfg.text_field not in pf.schema_arrow.names:
        raise EmberError(f"{path}: no column '{cfg.text_field}'; columns are {pf.schema_arrow.names}. "
                         "HINT: pass --text-field NAME")
    for batch in pf.iter_batches(columns=[cfg.text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield text
            elif text is not None:
                raise EmberError(f"{path}: column '{cfg.text_field}' holds {type(text).__name__} values, "
                                 "expected strings. HINT: pass --text-field NAME")


_READERS = {".txt": _read_txt, ".md": _read_txt, ".jsonl": _read_jsonl, ".json": _read_jsonl,
            ".parquet": _read_parquet}


def check_readable(path: str) -> None:
    """An error naming the file when its type is not one ember reads."""
    if _base_suffix(path) not in _READERS:
        raise EmberError(f"{path}: unknown input type, expected one of {'/'.join(SUFFIXES)} "
                         "(optionally .gz/.xz). HINT: rename the file or convert it")


def read_file(path: str, cfg: ReadConfig, stats: ReadStats) -> Iterator[str]:
    """Every document of one input file (a local path or a URL), in order; counts go to `stats`."""
    check_readable(path)
    stats.files += 1
    try:
        for text in _READERS[_base_suffix(path)](path, cfg, stats):
            stats.docs += 1
            stats.bytes += len(text.encode("utf-8"))
            yield text
    except (EOFError, gzip.BadGzipFile, lzma.LZMAError, zlib.error) as e:
        kind = {".gz": "gzip", ".xz": "xz"}.get(str(path).lower()[-3:], "compressed")
        raise EmberError(f"{path}: truncated or not a {kind} file ({type(e).__name__}: {e}). "
                         "HINT: re-download or re-compress it") from None


def read_documents(paths: list[str | Path], cfg: ReadConfig, stats: ReadStats) -> Iterator[str]:
    """Every document of every input, in order (files sorted within directories and globs)."""
    for path in expand_inputs(paths):
        yield from read_file(path, cfg, stats)
