"""Deduplication: exact (content hash) and near-duplicate (MinHash LSH over word 5-gram shingles).

Signatures are computed per document in the worker processes (`doc_fingerprint`); the `Deduper`
runs in the main process and sees documents in input order, so the first copy is kept and the
result does not depend on the number of processes. LSH candidates are confirmed with the signature
estimate of Jaccard similarity (fraction of equal MinHash values) >= `DedupConfig.threshold`.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"\w+")


@dataclass
class DedupConfig:
    """Exact and near-duplicate removal."""

    exact: bool = True
    """Drop documents whose normalised text (whitespace collapsed) was seen before."""
    near: bool = True
    """Drop near-duplicates: estimated Jaccard similarity of word shingles >= `threshold`."""
    threshold: float = 0.8
    """Jaccard similarity at or above which two documents are near-duplicates."""
    num_perm: int = 128
    """MinHash permutations (more = more accurate, slower)."""
    shingle_words: int = 5
    """Words per shingle (lower-cased `\\w+` words)."""
    seed: int = 1
    """MinHash seed (fixed, so results are reproducible)."""


def content_hash(text: str) -> bytes:
    """16-byte BLAKE2b of the text with whitespace runs collapsed (so re-wrapped copies match)."""
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=16).digest()


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """Distinct 32-bit hashes of the word n-grams (lower-cased `\\w+` words); a document shorter than
    n words is one shingle. Words are hashed with CRC-32, n-grams combined with a 64-bit rolling hash
    in numpy (much faster than hashing each shingle string in Python)."""
    words = _WORD.findall(text.lower())
    vocab = {w: zlib.crc32(w.encode("utf-8")) for w in dict.fromkeys(words)}
    h = np.array([vocab[w] for w in words] or [0], np.uint64)
    with np.errstate(over="ignore"):
        h = h * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E019)
        if len(words) > n:
            acc = h[: len(h) - n + 1].copy()
            for k in range(1, n):
                acc = acc * np.uint64(1_000_003) + h[k: len(h) - n + 1 + k]
        else:
            acc = np.array([np.bitwise_xor.reduce(h * np.uint64(1_000_003) ** np.arange(len(h), dtype=np.uint64))])
    return np.unique((acc >> np.uint64(32)).astype(np.uint32))


_PERMS: dict[tuple[int, int], object] = {}


def _scheme() -> dict:
    """datasketch >= 2.0 wants the hashing scheme named when state is passed in; 1.x has none."""
    import inspect

    from datasketch import MinHash

    return {"scheme": "affine32"} if "scheme" in inspect.signature(MinHash.__init__).parameters else {}


def minhash_values(text: str, cfg: DedupConfig) -> np.ndarray:
    """The MinHash signature (num_perm,) uint64 of the document's shingles."""
    from datasketch import MinHash

    key = (cfg.num_perm, cfg.seed)
    if key not in _PERMS:  # permutations are derived from the seed; build them once per process
        _PERMS[key] = MinHash(num_perm=cfg.num_perm, seed=cfg.seed).permutations
    m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, permutations=_PERMS[key],
                hashfunc=int, **_scheme())
    hashes = shingle_hashes(text, cfg.shingle_words)
    # update_batch builds a (num_perm, n) matrix: in chunks, a huge document stays within ~100 MB
    # (the signature is a running minimum, so chunking gives the same values)
    for i in range(0, len(hashes), MINHASH_CHUNK):
        m.update_batch(hashes[i:i + MINHASH_CHUNK].tolist())
    return m.hashvalues


MINHASH_CHUNK = 1 << 16
"""Shingles hashed per `update_batch` call (its working set is num_perm x chunk x 8 bytes)."""


def doc_fingerprint(text: str, cfg: DedupConfig) -> tuple[bytes, np.ndarray | None]:
    """(content hash, MinHash signature or None when near dedup is off)."""
    return content_hash(text), (minhash_values(text, cfg) if cfg.near else None)


class Deduper:
    """Keeps the first of each exact / near-duplicate group, in the order documents are offered."""

    def __init__(self, cfg: DedupConfig):
        from datasketch import MinHashLSH

        self.cfg = cfg
        self.seen: set[bytes] = set()
        # LSH bands tuned for recall (false negatives weigh 0.9); candidates are then verified with the
        # signature estimate of Jaccard, so the extra candidates cost time but not false drops.
        self.lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=(0.1, 0.9)) if cfg.near else None
        self.sigs: list[np.ndarray] = []
        self._scheme = _scheme()

    def check(self, digest: bytes, values: np.ndarray | None) -> str | None:
        """'exact_dup' / 'near_dup' if the document duplicates an earlier kept one, else None (and it is recorded)."""
        from datasketch import LeanMinHash

        if self.cfg.exact and digest in self.seen:
            return "exact_dup"
        m = None
        if self.lsh is not None and values is not None:
            m = LeanMinHash(seed=self.cfg.seed, hashvalues=values, **self._scheme)
            for key in self.lsh.query(m):
                if np.mean(self.sigs[int(key)] == values) >= self.cfg.threshold:
                    return "near_dup"
        self.seen.add(digest)
        if m is not None:
            self.lsh.insert(str(len(self.sigs)), m, check_duplication=False)
            self.sigs.append(values)
        return None

    def check_at(self, index: int, digest: bytes, values: np.ndarray | None) -> str | None:
        """`check`, with the document's global index (unused here; the signature of a global `decide`)."""
        return self.check(digest, values)


# --------------------------------------------------------------------------- the same result, computed globally
# `Deduper` decides in input order in one process. A cluster cannot: there, documents are grouped by
# key across workers (exact: by content hash; near: by each LSH band's hash), each group yields its
# pairs, and the pairs are resolved into the very decisions `Deduper` makes. `Deduper`'s rule is:
# a document is dropped as exact_dup when an earlier *kept* document has its content hash, and as
# near_dup when an earlier kept document shares an LSH band with it and passes the similarity check.
# So: exact copies of a first occurrence are dropped (as exact_dup when that first occurrence is kept,
# as near_dup when it was itself dropped as a near duplicate: an identical signature meets the same
# kept neighbour); among first occurrences, the verified band pairs form a graph whose connected
# components are independent, and within a component documents are taken in input order, each kept
# unless one of its earlier neighbours was kept. (Keeping one document per component instead would
# also drop C in a chain A~B~C where A and C are not similar; Deduper keeps C, and so does this.)


def band_params(cfg: DedupConfig) -> tuple[int, int]:
    """(bands, rows per band) of the LSH index `Deduper` builds for `cfg` (the same candidates)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=(0.1, 0.9))
    return lsh.b, lsh.r


def group_keys(digest: bytes, values: np.ndarray | None, cfg: DedupConfig, bands: tuple[int, int]) -> list[bytes]:
    """The keys under which a document is grouped: b'x' + content hash (exact), and b'b' + band number +
    the band's MinHash values (near; two documents share a key iff `Deduper`'s LSH makes them candidates)."""
    keys = [b"x" + digest] if cfg.exact else []
    if cfg.near and values is not None:
        b, r = bands
        keys += [b"b" + k.to_bytes(2, "little") + np.ascontiguousarray(values[k * r:(k + 1) * r]).tobytes()
                 for k in range(b)]
    return keys


def group_pairs(key: bytes, members: list[tuple[int, bytes, np.ndarray | None]], cfg: DedupConfig) -> list[tuple[str, int, int]]:
    """The pairs one group yields, from its members (global index, content hash, signature):
    ('copy', i, first) for every later exact copy, ('edge', i, j) (i < j) for every verified near pair."""
    members = sorted(members, key=lambda m: m[0])
    if key[:1] == b"x":
        return [("copy", g, members[0][0]) for g, _, _ in members[1:]]
    if cfg.exact:  # exact copies are resolved by their own group; their first occurrence stands for them
        firsts: dict[bytes, tuple] = {}
        for m in members:
            firsts.setdefault(m[1], m)
        members = list(firsts.values())
    out = []
    for a in range(len(members)):
        for b in range(a + 1, len(members)):
            if np.mean(members[a][2] == members[b][2]) >= cfg.threshold:
                out.append(("edge", members[a][0], members[b][0]))
    return out


def resolve(pairs) -> dict[int, str]:
    """Decisions ({global index: 'exact_dup' | 'near_dup'}; absent = kept) from every group's pairs."""
    copies: dict[int, int] = {}
    earlier: dict[int, set[int]] = {}
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for kind, a, b in pairs:
        if kind == "copy":
            copies[a] = b
        else:
            earlier.setdefault(b, set()).add(a)
            parent[find(b)] = find(a)
    components: dict[int, list[int]] = {}
    for x in parent:
        components.setdefault(find(x), []).append(x)
    dropped: dict[int, str] = {}
    for nodes in components.values():  # independent of each other: a cluster may resolve them anywhere
        for x in sorted(nodes):
            if any(a not in dropped for a in earlier.get(x, ())):
                dropped[x] = "near_dup"
    for g, first in copies.items():
        dropped[g] = "near_dup" if first in dropped else "exact_dup"
    return dropped


def global_decisions(docs, cfg: DedupConfig) -> dict[int, str]:
    """`resolve` over in-process groups of (global index, content hash, signature) documents: the
    single-machine form of what the Ray executor computes with a cluster-wide group-by."""
    bands = band_params(cfg) if cfg.near else (0, 0)
    groups: dict[bytes, list] = {}
    for g, digest, values in docs:
        for k in group_keys(digest, values, cfg, bands):
            groups.setdefault(k, []).append((g, digest, values))
    return resolve(p for k, members in groups.items() if len(members) > 1 for p in group_pairs(k, members, cfg))
