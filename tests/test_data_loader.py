"""TokenLoader: shift-by-one targets, disjoint ranks that cover the data, determinism, exact resume."""

import numpy as np
import pytest
import torch

from ember.data import shards
from ember.data.loader import TokenLoader
from ember.errors import EmberError


def make_dataset(path, train_lengths=(1000, 537, 20), val_lengths=(300,), vocab=70_000):
    """Shards whose tokens are consecutive integers, so every token names its own position."""
    splits, start = {}, 0
    for split, lengths in (("train", train_lengths), ("val", val_lengths)):
        splits[split] = []
        for i, n in enumerate(lengths):
            name = f"{split}_{i:06d}.bin"
            sha = shards.write_shard(path / name, np.arange(start, start + n), vocab_size=vocab, eos_id=0)
            splits[split].append({"file": name, "tokens": n, "sha256": sha})
            start += n
    manifest = {"format_version": shards.MANIFEST_VERSION, "vocab_size": vocab, "eos_id": 0, "dtype": "uint32",
                "tokenizer": "tokenizer", "splits": splits}
    shards.write_manifest(path, manifest)
    return path


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path)


def starts(x):
    return x[:, 0].tolist()


def test_shift_by_one_and_contiguous_windows(data):
    loader = TokenLoader(data, "train", block_size=16, batch_size=4, seed=0)
    assert loader.vocab_size == 70_000 and loader.eos_id == 0
    for _ in range(20):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y[:, :-1], x[:, 1:])
        assert torch.equal(y, x + 1)  # consecutive tokens: windows never straddle two shards


def test_ranks_are_disjoint_and_cover_an_epoch(data):
    per_rank = []
    for rank in range(2):
        loader = TokenLoader(data, "train", block_size=16, batch_size=1, dp_rank=rank, dp_size=2, seed=3)
        n = loader.num_windows()
        per_rank.append([starts(loader.next_batch()[0])[0] for _ in range(n)])
    a, b = set(per_rank[0]), set(per_rank[1])
    assert len(a) == len(per_rank[0]) and not a & b
    single = TokenLoader(data, "train", block_size=16, batch_size=1, seed=3)
    everything = {starts(single.next_batch()[0])[0] for _ in range(single.num_windows())}
    assert a | b <= everything and len(everything - (a | b)) < 2


def test_determinism_and_seed(data):
    def seq(seed):
        loader = TokenLoader(data, "train", block_size=16, batch_size=3, seed=seed)
        return [starts(loader.next_batch()[0]) for _ in range(50)]

    assert seq(0) == seq(0)
    assert seq(0) != seq(1)


def test_epochs_reshuffle_and_shift_windows(data):
    loader = TokenLoader(data, "train", block_size=16, batch_size=1, seed=0)
    n = loader.num_windows()
    e0 = [starts(loader.next_batch()[0])[0] for _ in range(n)]
    e1 = [starts(loader.next_batch()[0])[0] for _ in range(n)]
    assert e0 != e1 and loader.epoch >= 1


@pytest.mark.parametrize("stop", [1, 7, 30, 95])  # mid-epoch and across epoch boundaries (~95 windows/epoch)
def test_resume_reproduces_the_uninterrupted_sequence(data, stop):
    kw = dict(block_size=16, batch_size=7, dp_rank=1, dp_size=2, seed=5)
    ref_loader = TokenLoader(data, "train", **kw)
    ref = [ref_loader.next_batch() for _ in range(stop + 20)]
    first = TokenLoader(data, "train", **kw)
    for _ in range(stop):
        first.next_batch()
    state = first.state_dict()
    resumed = TokenLoader(data, "train", **kw)
    resumed.load_state_dict(state)
    for x_ref, y_ref in ref[stop:]:
        x, y = resumed.next_batch()
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_resume_refuses_a_different_setup(data):
    sd = TokenLoader(data, "train", 16, 2, seed=1).state_dict()
    with pytest.raises(EmberError, match="seed"):
        TokenLoader(data, "train", 16, 2, seed=2).load_state_dict(sd)


def test_iter_eval_is_fixed_and_leaves_train_state(data):
    loader = TokenLoader(data, "val", block_size=16, batch_size=4, seed=0)
    a = [x for x, _ in loader.iter_eval(3)]
    loader.next_batch()
    state = loader.state_dict()
    b = [x for x, _ in loader.iter_eval(3)]
    assert len(a) == 3 and all(torch.equal(p, q) for p, q in zip(a, b))
    assert loader.state_dict() == state
    all_batches = list(loader.iter_eval())
    assert sum(len(x) for x, _ in all_batches) == (300 - 1) // 16
    r0 = {s for x, _ in TokenLoader(data, "val", 16, 4, dp_rank=0, dp_size=2).iter_eval() for s in starts(x)}
    r1 = {s for x, _ in TokenLoader(data, "val", 16, 4, dp_rank=1, dp_size=2).iter_eval() for s in starts(x)}
    assert not r0 & r1 and len(r0) == len(r1)


def test_errors(data, tmp_path):
    with pytest.raises(EmberError, match="too few"):
        TokenLoader(data, "val", block_size=400, batch_size=1)
    with pytest.raises(EmberError, match="no split 'test'"):
        TokenLoader(data, "test", block_size=4, batch_size=1)
    with pytest.raises(EmberError, match="dp_rank"):
        TokenLoader(data, "train", 4, 1, dp_rank=2, dp_size=2)
    with pytest.raises(EmberError, match="no manifest"):
        TokenLoader(tmp_path / "nothing", "train", 4, 1)
    (data / "train_000001.bin").write_bytes(b"garbage")
    with pytest.raises(EmberError, match="HINT: re-run"):
        TokenLoader(data, "train", 4, 1)


def _flip(path, token_index, new_value):
    """Overwrite one token in place (as a disk or a careless script might)."""
    dtype = np.dtype(shards.read_header(path)["dtype"])
    data = bytearray(path.read_bytes())
    off = shards.HEADER_SIZE + token_index * np.dtype(dtype).itemsize
    data[off: off + np.dtype(dtype).itemsize] = np.array([new_value], dtype).tobytes()
    path.write_bytes(bytes(data))


def test_corrupt_shards_are_caught_when_opened(tmp_path):
    """In-vocab corruption fails the digest; out-of-vocab ids name the file and offset, verified or not."""
    d = make_dataset(tmp_path / "a", train_lengths=(1000,), val_lengths=(300,), vocab=2000)
    _flip(d / "train_000000.bin", 10, 7)  # still a valid id: only the checksum knows
    with pytest.raises(EmberError, match=r"train_000000.bin: token checksum mismatch"):
        TokenLoader(d, "train", 16, 2)
    loader = TokenLoader(d, "train", 16, 2, verify=False)  # opt-out for huge corpora: trains on it
    loader.next_batch()
    d = make_dataset(tmp_path / "b", train_lengths=(1000,), val_lengths=(300,), vocab=2000)
    _flip(d / "train_000000.bin", 123, 5000)  # outside the vocabulary
    with pytest.raises(EmberError, match=r"train_000000.bin: token checksum mismatch"):
        TokenLoader(d, "train", 16, 2)
    loader = TokenLoader(d, "train", 16, 2, verify=False)
    with pytest.raises(EmberError, match=r"train_000000.bin: token 123 is id 5000, outside the vocabulary"):
        for _ in range(100):
            loader.next_batch()
    # a shard replaced wholesale by another valid one: only the manifest's sha256 tells
    d = make_dataset(tmp_path / "c", train_lengths=(1000,), val_lengths=(300,), vocab=2000)
    shards.write_shard(d / "train_000000.bin", np.arange(1000) % 7, vocab_size=2000, eos_id=0)
    with pytest.raises(EmberError, match=r"train_000000.bin: sha256 differs from the manifest's"):
        TokenLoader(d, "train", 16, 2)


def test_shard_ids_above_the_header_vocab_fail_verify(tmp_path):
    path = tmp_path / "s.bin"
    tokens = np.arange(100, dtype=np.uint32)
    tokens[42] = 999
    shards.write_shard(path, tokens, vocab_size=500, eos_id=0)  # digest matches what was written
    with pytest.raises(EmberError, match=r"s.bin: token 42 is id 999, outside the vocabulary \(vocab_size 500\)"):
        shards.read_shard(path, verify=True)
