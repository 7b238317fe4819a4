"""Training a byte-level BPE tokenizer with HF `tokenizers` (Rust).

Pipeline (saved as a standard `tokenizer.json`):
  split regex (GPT-4 / cl100k style by default) -> bytes to printable chars (ByteLevel) -> BPE
  -> ByteLevel decoder.
The split is GPT-4's rather than GPT-2's: digits are cut into runs of at most 3 (numbers share a few
tokens instead of filling the vocabulary with years and prices), contractions match in any case
("DON'T"), and newlines are kept apart from the words around them, which suits code and chat text.
The 256 byte tokens are always in the vocabulary, so any byte sequence encodes (no unknown token).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from ember.errors import EmberError
from ember.tokenizer import formats
from ember.tokenizer.backends import HFBackend, build_hf_bpe, fix_surrogates, has_surrogates
from ember.tokenizer.tokenizer import EOS, PAD, Tokenizer

DEFAULT_SPECIALS = (EOS, PAD, "<|im_start|>", "<|im_end|>")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


_OPENERS = {".xz": "lzma", ".gz": "gzip", ".bz2": "bz2"}


def _open_text(path: Path):
    """Open a text file, decompressing .xz/.gz/.bz2; invalid UTF-8 is replaced (U+FFFD)."""
    module = _OPENERS.get(path.suffix)
    if module is None:
        return open(path, encoding="utf-8", errors="replace")
    return __import__(module).open(path, "rt", encoding="utf-8", errors="replace")


def iter_file_texts(path: str | Path, text_field: str = "text", batch_lines: int = 1000) -> Iterator[list[str]]:
    """Yield batches of texts from a .txt (lines, newlines kept) or .jsonl (one `text_field` per line),
    optionally compressed (.txt.xz, .jsonl.gz, ...)."""
    path = Path(path)
    if not path.is_file():
        raise EmberError(f"{path}: no such input file. HINT: check the --input paths")
    inner = path.with_suffix("") if path.suffix in _OPENERS else path
    jsonl = inner.suffix in (".jsonl", ".json")
    try:
        yield from _read_batches(path, jsonl, text_field, batch_lines)
    except (OSError, EOFError) as e:  # truncated or corrupt compressed file, unreadable file
        raise EmberError(f"{path}: cannot read ({type(e).__name__}: {e}). HINT: is the file complete?") from None


def _read_batches(path: Path, jsonl: bool, text_field: str, batch_lines: int) -> Iterator[list[str]]:
    batch: list[str] = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if jsonl:
                if not line.strip():
                    continue
                batch.append(_jsonl_text(path, lineno, line, text_field))
            else:
                batch.append(line)
            if len(batch) >= batch_lines:
                yield batch
                batch = []
    if batch:
        yield batch


def _jsonl_text(path: Path, lineno: int, line: str, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise EmberError(f"{path}:{lineno}: not valid JSON ({e.msg}), expected one JSON object per line") from None
    if not isinstance(record, dict) or field not in record:
        keys = list(record)[:6] if isinstance(record, dict) else type(record).__name__
        raise EmberError(f"{path}:{lineno}: no field {field!r} (found {keys}). HINT: pass --text-field NAME")
    value = record[field]
    if not isinstance(value, str):
        raise EmberError(f"{path}:{lineno}: field {field!r} is a {type(value).__name__}, expected a string")
    return value


class _Counting:
    """Wrap a text iterator: count the characters seen (to refuse empty input), repair lone surrogates."""

    def __init__(self, batches: Iterable):
        self.batches, self.chars = batches, 0

    def __iter__(self):
        for batch in self.batches:
            batch = [batch] if isinstance(batch, str) else list(batch)
            batch = [fix_surrogates(t) if has_surrogates(t) else t for t in batch]
            self.chars += sum(len(t) for t in batch)
            yield batch


def train_bpe(
    files_or_iterator,
    vocab_size: int,
    special_tokens: list[str] | None = None,
    pattern: str = "cl100k",
    min_frequency: int = 2,
    text_field: str = "text",
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE on files (.txt/.jsonl paths) or an iterator of strings (or of lists).

    `special_tokens` (default `<|endoftext|>`, `<|pad|>`, `<|im_start|>`, `<|im_end|>`) get the first
    ids; `pattern` is a name in `formats.PATTERNS` ("cl100k", "gpt2", "o200k") or a regex."""
    from tokenizers import pre_tokenizers, trainers

    specials = list(DEFAULT_SPECIALS if special_tokens is None else special_tokens)
    if vocab_size < 256 + len(specials):
        raise EmberError(f"vocab_size={vocab_size}: too small, expected >= 256 bytes + {len(specials)} special tokens")
    regex = formats.PATTERNS.get(pattern, pattern)
    source = _source(files_or_iterator, text_field)
    counted = _Counting(source)
    tok = build_hf_bpe(regex)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(counted, trainer=trainer)
    if counted.chars == 0:
        raise EmberError("tokenizer training: the input is empty (no text). HINT: check the input files")
    meta = {"eos_token": EOS if EOS in specials else None, "pad_token": PAD if PAD in specials else None,
            "chat_template": "chatml", "pattern": regex}
    return Tokenizer(HFBackend(tok, pattern=regex), meta)


def _looks_like_path(x) -> bool:
    if isinstance(x, Path):
        return True
    if not isinstance(x, str) or not x or len(x) > 1024 or any(c in x for c in "\n\r\0"):
        return False
    try:
        suffix = Path(x).suffix
        known = TEXT_SUFFIXES + (".jsonl", ".json") + tuple(_OPENERS)
        return Path(x).is_file() or (suffix in known and " " not in x)
    except OSError:
        return False


def _source(files_or_iterator, text_field: str):
    """Paths (str or Path) -> batches read from the files; anything else is an iterator of texts."""
    if isinstance(files_or_iterator, (str, Path)):
        files_or_iterator = [files_or_iterator]
    if isinstance(files_or_iterator, (list, tuple)) and files_or_iterator and all(map(_looks_like_path, files_or_iterator)):
        return _files([Path(x) for x in files_or_iterator], text_field)
    return files_or_iterator


def _files(paths: list[Path], text_field: str) -> Iterator[list[str]]:
    for p in paths:
        if not p.is_file():
            raise EmberError(f"{p}: no such input file. HINT: check the input paths")
        if p.stat().st_size == 0:
            raise EmberError(f"{p}: the input file is empty, expected text")
    for p in paths:
        yield from iter_file_texts(p, text_field)
