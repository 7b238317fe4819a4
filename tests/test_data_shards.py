"""Token shard format: header round trip, dtype by vocab size, and clear errors for bad files."""

import json
import struct

import numpy as np
import pytest

from ember.data import shards
from ember.errors import EmberError


@pytest.mark.parametrize("vocab,dtype", [(300, np.uint16), (65535, np.uint16), (65536, np.uint32), (200_000, np.uint32)])
def test_round_trip_and_dtype(tmp_path, vocab, dtype):
    tokens = np.random.default_rng(0).integers(0, vocab, 1000)
    path = tmp_path / "train_000000.bin"
    sha = shards.write_shard(path, tokens, vocab_size=vocab, eos_id=7)
    h = shards.read_header(path)
    assert h["count"] == 1000 and h["vocab_size"] == vocab and h["eos_id"] == 7 and h["dtype"] == np.dtype(dtype).name
    got = shards.read_shard(path, verify=True)
    assert got.dtype == dtype and np.array_equal(got, tokens)
    import hashlib
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    assert path.stat().st_size == shards.HEADER_SIZE + 1000 * np.dtype(dtype).itemsize


def write(tmp_path, n=100):
    path = tmp_path / "s.bin"
    shards.write_shard(path, np.arange(n), vocab_size=300, eos_id=0)
    return path


def expect_hint(path, match, **kw):
    with pytest.raises(EmberError, match=match) as e:
        shards.read_shard(path, **kw)
    assert "HINT: re-run `ember data prepare" in str(e.value) and str(path) in str(e.value)


def test_bad_magic(tmp_path):
    path = write(tmp_path)
    data = bytearray(path.read_bytes())
    data[:8] = b"NOTMAGIC"
    path.write_bytes(bytes(data))
    expect_hint(path, "bad magic")


def test_old_version(tmp_path):
    path = write(tmp_path)
    data = bytearray(path.read_bytes())
    data[8:12] = struct.pack("<I", 0)
    path.write_bytes(bytes(data))
    expect_hint(path, "format version 0")


def test_truncated_and_too_short(tmp_path):
    path = write(tmp_path)
    path.write_bytes(path.read_bytes()[:-10])
    expect_hint(path, "truncated")
    path.write_bytes(b"EMBER")
    expect_hint(path, "bad magic")
    expect_hint(tmp_path / "missing.bin", "missing")


def test_corrupt_tokens_fail_verify(tmp_path):
    path = write(tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    shards.read_shard(path)  # the header is fine: cheap reads do not hash
    expect_hint(path, "checksum", verify=True)


def test_writer_cuts_shards(tmp_path):
    w = shards.ShardWriter(tmp_path, "train", shard_tokens=40, vocab_size=300, eos_id=0)
    for i in range(5):
        w.add(np.arange(i * 20, i * 20 + 20))
    entries = w.close()
    assert [e["tokens"] for e in entries] == [40, 40, 20]
    got = np.concatenate([shards.read_shard(tmp_path / e["file"]) for e in entries])
    assert np.array_equal(got, np.arange(100))
    assert not list(tmp_path.glob(".*tmp"))


def test_manifest_errors(tmp_path):
    with pytest.raises(EmberError, match="no manifest.*HINT: re-run"):
        shards.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99, "splits": {}}))
    with pytest.raises(EmberError, match="version 99"):
        shards.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(EmberError, match="unreadable"):
        shards.read_manifest(tmp_path)
