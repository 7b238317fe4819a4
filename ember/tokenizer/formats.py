"""Reading BPE rank files from disk: GPT-2 `vocab.json` + `merges.txt` and tiktoken `.tiktoken`.

Both formats describe the same thing, a byte-level BPE: every byte is a token, and each merge joins
two tokens into a longer one. tiktoken stores `base64(token bytes) rank` per line; GPT-2 stores the
tokens as printable strings (each byte mapped to a unicode character by `bytes_to_unicode`) in
`vocab.json` (string -> id) and the merges, in priority order, in `merges.txt`.

`read_gpt2_files` converts GPT-2 files to tiktoken's form, `mergeable_ranks: dict[bytes, int]`
(rank == token id; the 256 bytes plus every merge result) and `special_tokens: dict[str, int]` (the
other vocab entries, e.g. `<|endoftext|>`), checking that the two files belong together.
"""

from __future__ import annotations

import base64
import functools
import json
import re
from pathlib import Path

from ember.errors import EmberError

EMBER_META = "ember_tokenizer.json"
"""The metadata file of a saved ember tokenizer (kind, special tokens, chat template, ...)."""
META_VERSION = 1

# The split patterns (regexes that cut text into pieces before BPE), exactly as tiktoken writes them.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


def hf_pattern(pat: str) -> str:
    """A tiktoken (fancy-regex) pattern spelled for HF tokenizers' Oniguruma (Ruby syntax), where
    `{1,3}+` means "repeat {1,3} one or more times", not possessive. At the end of an alternative a
    possessive and a greedy bounded repeat match the same text, so dropping the `+` keeps the split."""
    return re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pat)


PATTERNS = {"gpt2": GPT2_PATTERN, "cl100k": CL100K_PATTERN, "o200k": O200K_PATTERN}

# Known tiktoken rank files, recognised by their number of mergeable ranks (a .tiktoken file carries
# neither its pattern nor its special tokens); anything else needs an ember_tokenizer.json next to it.
KNOWN_RANK_FILES = {
    50256: ("r50k_base", GPT2_PATTERN, {"<|endoftext|>": 50256}),
    100256: (
        "cl100k_base",
        CL100K_PATTERN,
        {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
         "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
    ),
    199998: ("o200k_base", O200K_PATTERN, {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}),
}


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: byte value -> a printable unicode character (printable ASCII/Latin-1 map to
    themselves; the other 68 bytes to U+0100 onwards)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


@functools.lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def token_str_to_bytes(token: str) -> bytes | None:
    """GPT-2 printable token string -> its bytes; None if a character is outside the byte table."""
    table = unicode_to_bytes()
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        return None


def bytes_to_token_str(data: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in data)


# ---------------------------------------------------------------------------- GPT-2 files
def _read_vocab(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise EmberError(f"{path}: no such file, expected a GPT-2 vocab.json. HINT: check the path")
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EmberError(f"{path}: not valid JSON ({e}), expected a mapping token -> id") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise EmberError(f"{path}: expected a JSON object mapping token strings to integer ids")
    if len(set(vocab.values())) != len(vocab):
        raise EmberError(f"{path}: two tokens share one id, expected unique ids")
    return vocab


def _read_merges(path: Path) -> list[tuple[int, str, str]]:
    """merges.txt -> [(line number, left, right)], skipping a `#version` header and blank lines."""
    if not path.is_file():
        raise EmberError(f"{path}: no such file, expected a GPT-2 merges.txt. HINT: put it next to vocab.json")
    merges = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line or (lineno == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise EmberError(f"{path}:{lineno}: expected two tokens separated by one space, got {line!r}")
            merges.append((lineno, parts[0], parts[1]))
    return merges


def read_gpt2_files(vocab_path: Path, merges_path: Path) -> tuple[dict[bytes, int], dict[str, int], list[tuple[str, str]]]:
    """Read and cross-check GPT-2 files -> (mergeable_ranks, special_tokens, merges)."""
    vocab = _read_vocab(vocab_path)
    merges = _read_merges(merges_path)
    ranks: dict[bytes, int] = {}
    for b, c in bytes_to_unicode().items():
        if c not in vocab:
            raise EmberError(
                f"{vocab_path}: byte {b:#04x} (token {c!r}) is missing, expected all 256 byte tokens of a "
                "byte-level BPE. HINT: this is not a GPT-2-style vocab.json"
            )
        ranks[bytes([b])] = vocab[c]
    pairs = []
    hint = f"HINT: {vocab_path.name} and {merges_path.name} must come from the same tokenizer"
    for lineno, left, right in merges:
        for part in (left, right):
            if part not in vocab:
                raise EmberError(f"{merges_path}:{lineno}: token {part!r} is not in {vocab_path}. {hint}")
        merged = left + right
        if merged not in vocab:
            raise EmberError(f"{merges_path}:{lineno}: merge result {merged!r} is not in {vocab_path}. {hint}")
        data = token_str_to_bytes(merged)
        if data is None:
            raise EmberError(f"{merges_path}:{lineno}: {merged!r} is not a byte-level token. {hint}")
        ranks.setdefault(data, vocab[merged])
        pairs.append((left, right))
    merge_ids = set(ranks.values())
    specials = {tok: i for tok, i in vocab.items() if i not in merge_ids}
    return ranks, specials, pairs


# ---------------------------------------------------------------------------- .tiktoken files
def read_tiktoken_file(path: Path) -> dict[bytes, int]:
    """`base64(token) rank` per line -> mergeable ranks."""
    if not path.is_file():
        raise EmberError(f"{path}: no such file, expected a .tiktoken rank file")
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError("expected two fields")
                ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
            except ValueError as e:
                raise EmberError(
                    f"{path}:{lineno}: {e}, expected 'BASE64TOKEN RANK'. HINT: is this a .tiktoken file?"
                ) from None
    if not ranks:
        raise EmberError(f"{path}: empty rank file, expected 'BASE64TOKEN RANK' lines")
    return ranks


def write_tiktoken_file(path: Path, ranks: dict[bytes, int]) -> str:
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    return "\n".join(lines) + "\n"


def looks_like_tiktoken(path: Path) -> bool:
    """Detect a rank file by its contents: first line is `BASE64 INT`."""
    try:
        with open(path, "rb") as f:
            first = f.readline().split()
        base64.b64decode(first[0], validate=True)
        int(first[1])
        return len(first) == 2
    except (OSError, ValueError, IndexError):
        return False
