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


def train_unigram_entropy(data_dir: str | Path) -> float:
    """Unigram entropy (nats) of the train split's tokens: the loss of the best context-free model."""
    m = read_manifest(data_dir)
    counts = np.zeros(int(m["vocab_size"]), dtype=np.int64)
    for entry in split_files(data_dir, "train", m):
        counts += np.bincount(np.asarray(read_shard(Path(data_dir) / entry["file"])), minlength=len(counts))[:len(counts)]
    return unigram_entropy(counts)
