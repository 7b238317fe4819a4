"""Contamination between training data and evaluation sets, by word n-gram overlap.

A document and an evaluation item overlap when they share a run of `n` consecutive words (13 by
default, as in the GPT-3 paper's and lm-eval's decontamination), words being lower-cased runs of
letters and digits, so punctuation, case and whitespace do not hide a copy. Items shorter than `n`
words cannot be checked this way and are counted apart.

    index = NgramIndex({"mmlu": mmlu_texts, "humaneval": he_texts}, n=13)
    index.sources(document_text)          # {"mmlu"} when the document holds a 13-gram of an MMLU item
    overlap_report(index, train_texts)    # per task: items seen in training / items checked
"""

from __future__ import annotations

import hashlib
import re
import zlib
from typing import Iterable, Mapping, Sequence

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngram_keys(ws: Sequence[str], n: int) -> Iterable[int]:
    """One integer per n-gram, the same in every process (words are CRC-32 hashed, and a tuple of
    ints hashes without Python's per-process string hash seed), so an index built by the driver is
    valid in worker processes and on other machines."""
    ids = [zlib.crc32(w.encode("utf-8")) for w in ws]
    for i in range(len(ids) - n + 1):
        yield hash(tuple(ids[i:i + n]))


class NgramIndex:
    """The n-grams of every evaluation item, by task (keys are process-independent: see `ngram_keys`)."""

    def __init__(self, tasks: Mapping[str, Iterable[str]], n: int = 13):
        if n < 1:
            raise ValueError(f"decontamination n-gram length {n}: expected >= 1")
        self.n = n
        self.owner: dict[int, set[tuple[str, int]]] = {}  # n-gram -> {(task, item index)}
        self.items: dict[str, int] = {}
        self.short: dict[str, int] = {}
        for task, texts in tasks.items():
            count = short = 0
            for i, t in enumerate(texts):
                ws = words(t)
                count += 1
                if len(ws) < n:
                    short += 1
                    continue
                for k in ngram_keys(ws, n):
                    self.owner.setdefault(k, set()).add((task, i))
            self.items[task], self.short[task] = count, short

    def fingerprint(self) -> str:
        """Changes when the indexed n-grams, their owners or n change (keys prepare's resumable work)."""
        h = hashlib.blake2b(f"{self.n}|{sorted(self.items.items())}".encode(), digest_size=16)
        for k in sorted(self.owner):
            h.update(f"{k}:{sorted(self.owner[k])};".encode())
        return h.hexdigest()

    def matches(self, text: str) -> set[tuple[str, int]]:
        """(task, item index) of every item sharing an n-gram with `text`."""
        found: set[tuple[str, int]] = set()
        for k in ngram_keys(words(text), self.n):
            hit = self.owner.get(k)
            if hit:
                found |= hit
        return found

    def sources(self, text: str) -> set[str]:
        return {t for t, _ in self.matches(text)}


def overlap_report(index: NgramIndex, documents: Iterable[str]) -> dict[str, dict]:
    """Per task: how many of its items share an n-gram with any of the documents."""
    seen: dict[str, set[int]] = {t: set() for t in index.items}
    docs = 0
    for d in documents:
        docs += 1
        for task, i in index.matches(d):
            seen[task].add(i)
    out = {}
    for task, n_items in index.items.items():
        checked = n_items - index.short[task]
        out[task] = {"items": n_items, "checked": checked, "too_short": index.short[task],
                     "contaminated": len(seen[task]),
                     "rate": len(seen[task]) / checked if checked else 0.0, "documents": docs, "n": index.n}
    return out


def prepared_texts(data_dir, split: str = "train") -> Iterable[str]:
    """The documents of a prepared dataset's split, decoded with its tokenizer (shards checked
    against the manifest's hashes)."""
    from pathlib import Path

    import numpy as np

    from ember.data.shards import read_manifest, read_shard, tokenizer_dir
    from ember.errors import EmberError
    from ember.tokenizer import Tokenizer

    data_dir = Path(data_dir)
    m = read_manifest(data_dir)
    tdir = tokenizer_dir(data_dir)
    if tdir is None:
        raise EmberError(f"{data_dir}: the prepared dataset has no tokenizer/ to decode its documents with.")
    tok = Tokenizer.load(tdir)
    eos = int(m["eos_id"])
    carry: list[int] = []
    for e in m["splits"].get(split) or []:
        toks = read_shard(data_dir / e["file"], sha256=e.get("sha256")).astype(np.int64).tolist()
        for t in toks:
            if t == eos:
                if carry:
                    yield tok.decode(carry)
                carry = []
            else:
                carry.append(t)
    if carry:
        yield tok.decode(carry)
