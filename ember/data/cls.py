"""Labelled text for classification: CSV / JSONL / JSON / parquet records -> (ids, label) -> padded batches.

    ember classify train --checkpoint DIR --data.path sms-spam.csv --data.text-field text --data.label-field spam

Labels may be strings or integers; the class list is the sorted set of the training labels (saved in
the checkpoint's head, so predictions print names). `balance` undersamples every class to the size of
the smallest (seeded); the records are split into train / val / test by seeded fractions, stratified by
class. Each example is its token ids (truncated to max_length, keeping the start) plus the index of its
last real token, so the classifier pools the last real token and never padding.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ember.data.examples import ExampleLoader
from ember.errors import EmberError


@dataclass
class ClsDataConfig:
    """Labelled text for `ember classify`."""

    path: str = ""
    """A CSV (with a header), JSONL, JSON array or parquet file of records."""
    text_field: str = "text"
    """The record field / column holding the text."""
    label_field: str = "label"
    """The record field / column holding the label (a string or an integer)."""
    max_length: int = 128
    """Tokens per example (longer texts keep their start)."""
    balance: bool = False
    """Undersample every class to the size of the smallest one (seeded)."""
    val_fraction: float = 0.1
    """Fraction of records (per class) held out for validation."""
    test_fraction: float = 0.2
    """Fraction of records (per class) held out for the final test (ember classify eval --split test)."""
    seed: int = 0
    """Seed of balancing, the splits and the batch order."""

    def __post_init__(self) -> None:
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ValueError(f"data.val_fraction={self.val_fraction}, data.test_fraction={self.test_fraction}: "
                             "expected fractions in [0, 1) that leave some training data")
        if self.max_length < 2:
            raise ValueError(f"data.max_length={self.max_length}: expected at least 2 tokens")


def read_labelled(path: str | Path, text_field: str, label_field: str) -> list[tuple[str, Any]]:
    """(text, raw label) of every record; errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise EmberError(f"{path}: no such data file. HINT: check --data.path")
    rows: Iterator[tuple[str, Any]]
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or text_field not in reader.fieldnames or label_field not in reader.fieldnames:
                raise EmberError(f"{path}: columns are {reader.fieldnames}, expected '{text_field}' and "
                                 f"'{label_field}'. HINT: pass --data.text-field / --data.label-field")
            rows = [(f"{path}:{reader.line_num}", r) for r in reader]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = [(f"{path}:row {i + 1}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    else:
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            rows = [(f"{path}: item {i}", r) for i, r in enumerate(json.loads(text))]
        else:
            rows = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append((f"{path}:{n}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise EmberError(f"{path}:{n}: not valid JSON ({e})") from None
    out = []
    for where, r in rows:
        if not isinstance(r, dict) or not isinstance(r.get(text_field), str) or r.get(label_field) in (None, ""):
            raise EmberError(f"{where}: expected a string '{text_field}' and a '{label_field}' label. HINT: fix the "
                             "record or pass --data.text-field / --data.label-field")
        out.append((r[text_field], r[label_field]))
    if not out:
        raise EmberError(f"{path}: no records")
    return out


def label_names(raw: list[Any]) -> list[str]:
    """The sorted class names (numbers sort numerically)."""
    names = sorted({str(x) for x in raw}, key=lambda s: (0, float(s)) if _is_number(s) else (1, s))
    if len(names) < 2:
        raise EmberError(f"classification data has a single class {names}: nothing to tell apart")
    return names


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def split_labelled(records: list[tuple[str, Any]], names: list[str], cfg: ClsDataConfig) -> dict[str, list]:
    """{"train", "val", "test"}: (text, class index) lists; balanced and stratified as configured."""
    rng = np.random.default_rng(cfg.seed)
    by_class: dict[int, list[str]] = {i: [] for i in range(len(names))}
    index = {n: i for i, n in enumerate(names)}
    for text, label in records:
        by_class[index[str(label)]].append(text)
    smallest = min(len(v) for v in by_class.values())
    out = {"train": [], "val": [], "test": []}
    for c, texts in by_class.items():
        order = rng.permutation(len(texts))
        if cfg.balance:
            order = order[:smallest]
        n_test, n_val = round(len(order) * cfg.test_fraction), round(len(order) * cfg.val_fraction)
        for split, idx in (("test", order[:n_test]), ("val", order[n_test:n_test + n_val]),
                           ("train", order[n_test + n_val:])):
            out[split] += [(texts[i], c) for i in idx]
    for split in out:
        perm = rng.permutation(len(out[split]))
        out[split] = [out[split][i] for i in perm]
    return out


def encode(tok, items: list[tuple[str, int]], max_length: int) -> list[tuple[list[int], int]]:
    """(ids, class index); an empty text becomes [EOS] so every example has a last real token."""
    ids = tok.encode_batch([t for t, _ in items])
    return [((x[:max_length] or [tok.eos_id]), c) for x, (_, c) in zip(ids, items)]


def cls_batch(examples: list[tuple[list[int], int]], pad_id: int) -> dict:
    """Right-padded {"input_ids" (B, T), "last" (B,) index of the last real token, "labels" (B,)}."""
    T = max(len(ids) for ids, _ in examples)
    inputs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    for b, (ids, _) in enumerate(examples):
        inputs[b, :len(ids)] = torch.tensor(ids)
    last = torch.tensor([len(ids) - 1 for ids, _ in examples])
    labels = torch.tensor([c for _, c in examples])
    return {"input_ids": inputs, "last": last, "labels": labels}


class ClsLoader(ExampleLoader):
    """Classification batches: shuffled every epoch, right-padded (`cls_batch`)."""

    name = "classification data"

    def collate(self, chosen: list) -> dict:
        return cls_batch(chosen, self.pad_id)
