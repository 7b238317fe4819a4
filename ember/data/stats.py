"""Statistics of prepared token data (for baselines in reports)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ember.data.shards import read_manifest, read_shard, split_files


def unigram_entropy(token_counts) -> float:
    """Entropy in nats of the unigram distribution given by token counts: the loss of a model that ignores context."""
    counts = np.asarray(token_counts, dtype=np.float64)
    p = counts / counts.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def train_counts(data_dir: str | Path) -> np.ndarray:
    """Token counts of the train split (shards of a cached URL dataset are fetched as needed)."""
    from ember.data.cache import ensure_shard

    m = read_manifest(data_dir)
    counts = np.zeros(int(m["vocab_size"]), dtype=np.int64)
    for entry in split_files(data_dir, "train", m):
        ensure_shard(Path(data_dir), entry)
        counts += np.bincount(np.asarray(read_shard(Path(data_dir) / entry["file"])), minlength=len(counts))[:len(counts)]
    return counts


def train_unigram_entropy(data_dir: str | Path | list, weights: list[float] | None = None) -> float:
    """Unigram entropy (nats) of the train split's tokens: the loss of the best context-free model. For a
    mixture (a list of dirs and their weights) the unigram distribution is the weighted mix of theirs."""
    if not isinstance(data_dir, list):
        return unigram_entropy(train_counts(data_dir))
    dist = sum(w * (c / max(1, c.sum())) for w, c in zip(weights, map(train_counts, data_dir)))
    return unigram_entropy(dist)
