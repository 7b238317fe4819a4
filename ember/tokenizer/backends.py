"""The two encoding engines behind `Tokenizer`: HF `tokenizers` (Rust, `tokenizer.json`) and `tiktoken`.

Both see the same policy for special tokens: by default a special-token string inside the text
(`"<|endoftext|>"` typed by a user) is encoded as ordinary text, like tiktoken's `encode_ordinary`;
`allowed_special="all"` (or a set of token strings) encodes those strings as their special ids.
Text holding lone surrogates (invalid UTF-8) is repaired the way tiktoken repairs it, so both engines
return the same ids for it.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import AbstractSet, Iterable, Literal, Union

from ember.errors import EmberError
from ember.tokenizer import formats

AllowedSpecial = Union[None, Literal["all"], AbstractSet[str]]


def fix_surrogates(text: str) -> str:
    """tiktoken's repair of lone surrogates: round-trip through UTF-16 with replacement."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


@functools.lru_cache(maxsize=64)
def _special_regex(tokens: tuple[str, ...]) -> re.Pattern:
    # tiktoken's order: a plain alternation of the escaped tokens, leftmost match wins.
    return re.compile("(" + "|".join(re.escape(t) for t in tokens) + ")")


def _allowed(allowed: AllowedSpecial, specials: dict[str, int]) -> tuple[str, ...]:
    if not allowed:
        return ()
    if allowed == "all":
        return tuple(specials)
    return tuple(t for t in specials if t in allowed)


class HFBackend:
    """Any `tokenizers.Tokenizer` (saved as tokenizer.json); batch encode runs in Rust threads.

    With `fast=True`, a plain byte-level BPE encodes through its tiktoken twin (same ids, several
    times faster; see fastpath.py); `engine` says which one encodes."""

    kind = "hf"

    def __init__(self, tok, fast: bool = True, pattern: str | None = None):
        from ember.tokenizer import fastpath

        self.tok = tok
        # special-token strings in the text are plain text unless asked for (see module doc)
        self.tok.encode_special_tokens = True
        self.specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        parts = fastpath.twin(tok.to_str(), pattern) if fast else None
        self.fast = TiktokenBackend("ember-bpe", *parts) if parts is not None else None
        self.engine = "tiktoken" if self.fast is not None else "hf"

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        texts = [fix_surrogates(t) if has_surrogates(t) else t for t in texts]
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_batch(self, texts: list[str], allowed: AllowedSpecial = None) -> list[list[int]]:
        if self.fast is not None:
            return self.fast.encode_batch(texts, allowed)
        tokens = _allowed(allowed, self.specials)
        if not tokens:
            return self._encode_plain(texts)
        # split each text on the allowed special strings; encode the ordinary chunks in one batch
        pattern = _special_regex(tokens)
        parts = [pattern.split(t) for t in texts]  # odd positions are the specials
        plain = self._encode_plain([p for ps in parts for p in ps[0::2]])
        out, k = [], 0
        for ps in parts:
            ids: list[int] = []
            for j, p in enumerate(ps):
                if j % 2:
                    ids.append(self.specials[p])
                else:
                    ids.extend(plain[k])
                    k += 1
            out.append(ids)
        return out

    def encode(self, text: str, allowed: AllowedSpecial = None) -> list[int]:
        if self.fast is not None:
            return self.fast.encode(text, allowed)
        if not _allowed(allowed, self.specials):
            if has_surrogates(text):
                text = fix_surrogates(text)
            return self.tok.encode(text, add_special_tokens=False).ids
        return self.encode_batch([text], allowed)[0]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def save(self, directory: Path) -> None:
        self.tok.encode_special_tokens = False  # the saved file is the standard, HF-default behaviour
        try:
            self.tok.save(str(directory / "tokenizer.json"))
        finally:
            self.tok.encode_special_tokens = True


class TiktokenBackend:
    """A `tiktoken.Encoding` built from rank files: encodes exactly as tiktoken does, by construction."""

    kind = engine = "tiktoken"

    def __init__(self, name: str, pattern: str, ranks: dict[bytes, int], specials: dict[str, int]):
        import tiktoken

        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
        self.pattern, self.ranks, self.specials = pattern, ranks, specials
        self._id_to_bytes = {i: b for b, i in ranks.items()}

    @property
    def vocab_size(self) -> int:
        return self.enc.max_token_value + 1

    def token_to_id(self, token: str) -> int | None:
        if token in self.specials:
            return self.specials[token]
        return self.ranks.get(token.encode("utf-8", "surrogatepass"))

    def id_to_token(self, i: int) -> str | None:
        for t, j in self.specials.items():
            if i == j:
                return t
        data = self._id_to_bytes.get(i)
        return None if data is None else data.decode("utf-8", "replace")

    def encode(self, text: str, allowed: AllowedSpecial = None) -> list[int]:
        if not allowed:
            return self.enc.encode_ordinary(text)
        return self.enc.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_batch(self, texts: list[str], allowed: AllowedSpecial = None) -> list[list[int]]:
        threads = os.cpu_count() or 1
        if not allowed:
            return self.enc.encode_ordinary_batch(texts, num_threads=threads)
        return self.enc.encode_batch(texts, num_threads=threads, allowed_special=allowed, disallowed_special=())

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids), errors="replace")

    def save(self, directory: Path) -> None:
        from ember.tokenizer.formats import write_tiktoken_file

        (directory / "tokenizer.tiktoken").write_text(write_tiktoken_file(directory, self.ranks))


def build_hf_bpe(pattern: str):
    """An untrained byte-level BPE `tokenizers.Tokenizer` with the given split regex."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    tok = HFTokenizer(models.BPE())
    try:
        regex = Regex(formats.hf_pattern(pattern))
    except Exception as e:  # tokenizers raises a bare Exception for an Oniguruma syntax error
        raise EmberError(f"pattern {pattern!r}: not a valid split regex ({e}). HINT: use gpt2, cl100k or o200k, "
                         "or fix the regex") from None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(regex, behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok
