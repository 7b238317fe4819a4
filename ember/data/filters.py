"""Document quality filters in the spirit of the Gopher rules (Rae et al. 2021, appendix A.1.1).

`quality_reason(text, cfg) -> str | None` returns the name of the first rule a document fails, or
None when it passes. Each rule has its threshold in `FilterConfig`; a threshold set to its "off"
value (documented on each field) disables the rule.

Defaults are Gopher's, except where the bundled corpus (plays and verse) would be destroyed:
* `min_frac_lines_end_punct` is 0.0 (off): verse lines run on without punctuation.
* `max_dup_line_frac` is 0.5 instead of 0.3: speaker labels ("ROMEO:") repeat in every dialogue.
* `max_dup_ngram_frac` (n = 5..10) is twice Gopher's (0.15 .. 0.10): Gopher's values drop 17% of the
  KJV chapters (genealogies, the repeated offering lists of Numbers 7); these drop about 2%.
* `max_dup_line_char_frac` is 0.2 as in Gopher, counted over lines of >= 30 characters only, so that
  short repeated labels and refrains do not count.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"\S+")
_NO_ALPHA_WORD = re.compile(r"(?<!\S)(?:[\d_]|[^\w\s])+(?!\S)")  # a word without any letter
_BULLETS = ("*", "-", "•", "‣", "◦", "⁃", "·", "–", "—")
_TERMINAL = (".", "!", "?", '"', "'", "”", "’", ":", ";", ")")
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
_STOP_WORD = re.compile(r"(?i)(?<!\S)['\"(]*(?:%s)[.,;:!?'\")]*(?!\S)" % "|".join(STOP_WORDS))


@dataclass
class FilterConfig:
    """Quality-filter thresholds (Gopher-style). Set `enabled=False` to keep every document."""

    enabled: bool = True
    """Apply the quality filters at all."""
    min_words: int = 50
    """Drop documents with fewer words (whitespace-separated). 0 = off."""
    max_words: int = 100_000
    """Drop documents with more words. 0 = off."""
    min_mean_word_len: float = 3.0
    """Drop documents whose mean word length (characters) is below this."""
    max_mean_word_len: float = 10.0
    """Drop documents whose mean word length is above this."""
    max_symbol_word_ratio: float = 0.1
    """Max ratio of '#' plus '...'/'…' occurrences to words. 1e9 = off."""
    max_bullet_line_frac: float = 0.9
    """Max fraction of lines that start with a bullet (*, -, •, ...). 1.0 = off."""
    max_ellipsis_line_frac: float = 0.3
    """Max fraction of lines that end with '...' or '…'. 1.0 = off."""
    min_frac_lines_end_punct: float = 0.0
    """Min fraction of non-empty lines ending in terminal punctuation. 0.0 = off (verse would fail)."""
    min_alpha_word_frac: float = 0.8
    """Min fraction of words that contain at least one letter. 0.0 = off."""
    min_stop_words: int = 2
    """Min number of English stop words (the, be, to, of, and, that, have, with). 0 = off."""
    max_dup_line_frac: float = 0.5
    """Max fraction of non-empty lines that repeat an earlier line. 1.0 = off."""
    max_dup_line_char_frac: float = 0.2
    """Max fraction of characters in repeated lines (lines of >= 30 characters only). 1.0 = off."""
    max_dup_para_frac: float = 0.3
    """Max fraction of paragraphs (blank-line separated) that repeat an earlier one. 1.0 = off."""
    max_dup_para_char_frac: float = 0.2
    """Max fraction of characters in repeated paragraphs. 1.0 = off."""
    max_top_ngram_frac: tuple[float, float, float] = (0.20, 0.18, 0.16)
    """For n = 2, 3, 4: max fraction of word characters covered by the most frequent n-gram."""
    max_dup_ngram_frac: tuple[float, ...] = (0.30, 0.28, 0.26, 0.24, 0.22, 0.20)
    """For n = 5..10: max fraction of word characters covered by n-grams that occur more than once."""


def _dup_fracs(items: list[str], min_len: int = 0) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of chars in repeats of len >= min_len)."""
    if not items:
        return 0.0, 0.0
    seen, dup, dup_chars = set(), 0, 0
    for it in items:
        if it in seen:
            dup += 1
            dup_chars += len(it) if len(it) >= min_len else 0
        seen.add(it)
    return dup / len(items), dup_chars / max(1, sum(len(it) for it in items))


def _ngram_hashes(ids: np.ndarray, max_n: int) -> dict[int, np.ndarray]:
    """Rolling 64-bit hashes of every n-gram of word ids, for n = 1..max_n: {n: (len(ids)-n+1,)}."""
    with np.errstate(over="ignore"):
        h = ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(1)
        out = {1: h}
        for n in range(2, max_n + 1):
            if len(ids) < n:
                break
            h = h[:-1] * np.uint64(1_000_003) + out[1][n - 1:]
            out[n] = h
    return out


def _word_arrays(words: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(word ids, word lengths) of a word list."""
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    ids = np.array(list(map(vocab.__getitem__, words)), np.int64)
    return ids, np.array(list(map(len, words)), np.int64)


def top_ngram_frac(words: list[str], n: int) -> float:
    """Characters of the most frequent n-gram (times its count) over all word characters."""
    if len(words) < n:
        return 0.0
    ids, lens = _word_arrays(words)
    return _top_frac(_ngram_hashes(ids, n)[n], lens, n)


def _top_frac(h: np.ndarray, lens: np.ndarray, n: int) -> float:
    _, first, counts = np.unique(h, return_index=True, return_counts=True)
    k = int(np.argmax(counts))
    if counts[k] < 2:
        return 0.0
    i = int(first[k])
    return float(lens[i:i + n].sum() * counts[k] / max(1, lens.sum()))


def dup_ngram_frac(words: list[str], n: int) -> float:
    """Fraction of word characters covered by n-grams occurring more than once (no double count)."""
    if len(words) < n:
        return 0.0
    ids, lens = _word_arrays(words)
    return _dup_frac(_ngram_hashes(ids, n)[n], lens, n)


def _dup_frac(h: np.ndarray, lens: np.ndarray, n: int) -> float:
    _, inverse, counts = np.unique(h, return_inverse=True, return_counts=True)
    starts = np.flatnonzero(counts[inverse] > 1)
    if len(starts) == 0:
        return 0.0
    edge = np.zeros(len(lens) + 1, np.int64)
    np.add.at(edge, starts, 1)
    np.add.at(edge, starts + n, -1)
    covered = np.cumsum(edge[:-1]) > 0
    return float(lens[covered].sum() / max(1, lens.sum()))


def _word_rules(words: list[str], text: str, cfg: FilterConfig) -> str | None:
    n = len(words)
    if cfg.min_words and n < cfg.min_words:
        return "min_words"
    if cfg.max_words and n > cfg.max_words:
        return "max_words"
    if n == 0:
        return None
    mean = sum(map(len, words)) / n
    if not cfg.min_mean_word_len <= mean <= cfg.max_mean_word_len:
        return "mean_word_len"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / n > cfg.max_symbol_word_ratio:
        return "symbol_word_ratio"
    if 1 - len(_NO_ALPHA_WORD.findall(text)) / n < cfg.min_alpha_word_frac:
        return "alpha_words"
    if cfg.min_stop_words:
        found = itertools.islice(_STOP_WORD.finditer(text), cfg.min_stop_words)
        if sum(1 for _ in found) < cfg.min_stop_words:
            return "stop_words"
    return None


def _line_rules(text: str, cfg: FilterConfig) -> str | None:
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if not lines:
        return None
    if sum(ln.startswith(_BULLETS) for ln in lines) / len(lines) > cfg.max_bullet_line_frac:
        return "bullet_lines"
    if sum(ln.endswith(("...", "…")) for ln in lines) / len(lines) > cfg.max_ellipsis_line_frac:
        return "ellipsis_lines"
    if cfg.min_frac_lines_end_punct > 0:
        if sum(ln.endswith(_TERMINAL) for ln in lines) / len(lines) < cfg.min_frac_lines_end_punct:
            return "lines_end_punct"
    frac, char_frac = _dup_fracs(lines, min_len=30)
    if frac > cfg.max_dup_line_frac:
        return "dup_lines"
    if char_frac > cfg.max_dup_line_char_frac:
        return "dup_line_chars"
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    frac, char_frac = _dup_fracs(paras)
    if frac > cfg.max_dup_para_frac:
        return "dup_paragraphs"
    if char_frac > cfg.max_dup_para_char_frac:
        return "dup_paragraph_chars"
    return None


def _ngram_rules(words: list[str], cfg: FilterConfig) -> str | None:
    if not words:
        return None
    ids, lens = _word_arrays(words)
    hashes = _ngram_hashes(ids, 10)
    for n, limit in zip((2, 3, 4), cfg.max_top_ngram_frac):
        if n in hashes and _top_frac(hashes[n], lens, n) > limit:
            return f"top_{n}gram"
    limits = list(zip(range(5, 11), cfg.max_dup_ngram_frac))
    for k, (n, limit) in enumerate(limits):
        if n not in hashes:
            break
        frac = _dup_frac(hashes[n], lens, n)
        if frac > limit:
            return f"dup_{n}gram"
        # words covered by a repeated longer n-gram are covered by a repeated shorter one, so the
        # fraction only falls with n: stop once it is under every remaining limit
        if k + 1 < len(limits) and frac <= min(lim for _, lim in limits[k + 1:]):
            break
    return None


RULES = ("min_words", "max_words", "mean_word_len", "symbol_word_ratio", "alpha_words", "stop_words",
         "bullet_lines", "ellipsis_lines", "lines_end_punct", "dup_lines", "dup_line_chars",
         "dup_paragraphs", "dup_paragraph_chars", "top_2gram", "top_3gram", "top_4gram",
         *(f"dup_{n}gram" for n in range(5, 11)))
"""Every rule name `quality_reason` can return, in the order they are checked."""


def quality_reason(text: str, cfg: FilterConfig) -> str | None:
    """The first quality rule `text` fails, or None if it passes all of them."""
    if not cfg.enabled:
        return None
    words = _WORD.findall(text)
    return (_word_rules(words, text, cfg) or _line_rules(text, cfg)
            or _ngram_rules(_WORD.findall(text.lower()), cfg))
