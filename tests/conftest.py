"""Fixtures shared by several test files."""

import lzma

import pytest
import torch


@pytest.fixture
def set_threads():
    """Set torch's intra-op thread count for one test (`set_threads(1)`); restored afterwards."""
    n = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """60 tiny-shakespeare documents through the real prepare pipeline, BPE vocab 512 (~3 s)."""
    from ember.data.bundled import ASSETS
    from ember.data.pipeline import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("data")
    lines = lzma.open(ASSETS / "tinyshakespeare.jsonl.xz", "rt").read().splitlines()[:60]
    (root / "in.jsonl").write_text("\n".join(lines) + "\n")
    prepare(PrepareConfig(input=[str(root / "in.jsonl")], out=str(root / "data"), vocab_size=512, num_proc=1,
                          progress=False))
    return root / "data"
