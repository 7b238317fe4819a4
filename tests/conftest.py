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


@pytest.fixture(scope="module")
def pref_base(tmp_path_factory):
    """A tiny chat checkpoint (dropout 0.1) and 80 easy preference pairs in two record layouts."""
    import json

    from ember.io.checkpoint import save_checkpoint
    from ember.models import Transformer, preset
    from ember.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("dpo")
    texts = ["Is the sky blue? Yes, it is blue. No, it is green. What colour is grass? Green. Red.\n"] * 40
    train_bpe(texts, vocab_size=300).save(root / "tok")
    model = Transformer(preset("tiny-llama", vocab_size=320, block_size=128, dropout=0.1))
    model.init_weights(0)
    save_checkpoint(model, root / "base", tokenizer_dir=root / "tok")
    rows = []
    for i in range(40):
        rows.append({"prompt": [{"role": "user", "content": "Is the sky blue?"}],
                     "chosen": [{"role": "assistant", "content": "Yes, it is blue."}],
                     "rejected": [{"role": "assistant", "content": "No, it is green."}]})
        rows.append({"conversations": [{"from": "human", "value": "What colour is grass?"}],
                     "chosen": {"from": "gpt", "value": "Green."}, "rejected": {"from": "gpt", "value": "Red."}})
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root
