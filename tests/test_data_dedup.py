"""Exact and near-duplicate detection, checked against datasketch's own MinHash on the same shingles."""

import random

import numpy as np
import pytest

from ember.data.dedup import DedupConfig, Deduper, content_hash, doc_fingerprint, shingle_hashes

random.seed(0)
WORDS = [f"w{i}" for i in range(2000)]


def doc(n=300, seed=0):
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def edit(text, frac, seed=1):
    """Replace a fraction of the words at random positions."""
    rng = random.Random(seed)
    words = text.split()
    for i in rng.sample(range(len(words)), int(frac * len(words))):
        words[i] = "changed"
    return " ".join(words)


def jaccard(a, b, n=5):
    sa, sb = set(shingle_hashes(a, n).tolist()), set(shingle_hashes(b, n).tolist())
    return len(sa & sb) / len(sa | sb)


def run(texts, **kw):
    cfg = DedupConfig(**kw)
    d = Deduper(cfg)
    return [d.check(*doc_fingerprint(t, cfg)) for t in texts]


def test_exact_duplicates_ignore_whitespace_layout():
    a = doc()
    assert content_hash(a) == content_hash("  " + a.replace(" ", "\n", 5) + "\n")
    assert run([a, a, a.replace(" ", "  ")], near=False) == [None, "exact_dup", "exact_dup"]


def test_near_duplicates_by_jaccard_threshold():
    a = doc(seed=1)
    close, far, other = edit(a, 0.01), edit(a, 0.25), doc(seed=2)
    assert jaccard(a, close) > 0.9 and jaccard(a, far) < 0.3
    assert run([a, close, far, other]) == [None, "near_dup", None, None]


def test_first_copy_is_kept_and_off_switch():
    a, b = doc(seed=3), doc(seed=4)
    assert run([a, b, edit(a, 0.01), edit(b, 0.01)]) == [None, None, "near_dup", "near_dup"]
    assert run([a, edit(a, 0.01)], near=False) == [None, None]
    assert run([a, a], exact=False, near=False) == [None, None]


def test_signature_matches_datasketch_reference():
    """Our precomputed shingle hashes fed to datasketch's MinHash = the estimator datasketch documents."""
    from datasketch import MinHash

    cfg = DedupConfig()
    a, b = doc(seed=5), edit(doc(seed=5), 0.05)
    _, va = doc_fingerprint(a, cfg)
    _, vb = doc_fingerprint(b, cfg)
    estimate = float(np.mean(va == vb))
    assert estimate == pytest.approx(jaccard(a, b), abs=0.1)
    ref = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, hashfunc=int)
    ref.update_batch(shingle_hashes(a, cfg.shingle_words).tolist())
    assert np.array_equal(ref.hashvalues, va)


def test_short_documents_and_determinism():
    assert len(shingle_hashes("two words", 5)) == 1
    assert shingle_hashes("Hello, World again", 2).tolist() == shingle_hashes("hello world AGAIN", 2).tolist()
    cfg = DedupConfig()
    assert np.array_equal(doc_fingerprint(doc(), cfg)[1], doc_fingerprint(doc(), cfg)[1])


def test_minhash_of_a_huge_document_is_chunked_and_unchanged(monkeypatch):
    """A document with more shingles than one chunk gets the same signature as in one update_batch call."""
    import ember.data.dedup as dd

    cfg = dd.DedupConfig()
    text = " ".join(f"w{i % 9973} x{i % 7919}" for i in range(30_000))
    whole = dd.minhash_values(text, cfg)
    sizes = []
    from datasketch import MinHash

    real = MinHash.update_batch
    monkeypatch.setattr(MinHash, "update_batch", lambda self, b: sizes.append(len(b)) or real(self, b))
    monkeypatch.setattr(dd, "MINHASH_CHUNK", 1000)
    chunked = dd.minhash_values(text, cfg)
    assert len(sizes) > 10 and max(sizes) <= 1000
    assert (whole == chunked).all()
