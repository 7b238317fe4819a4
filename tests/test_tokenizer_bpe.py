"""Byte-level BPE training, save/load, encode/decode, bad input, `ember tokenizer train`, and parity
with transformers' PreTrainedTokenizerFast / AutoTokenizer loading the saved directory (offline)."""

from __future__ import annotations

import json
import lzma
import random

import pytest

from ember.errors import EmberError
from ember.tokenizer import DEFAULT_SPECIALS, Tokenizer, train_bpe

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards hex bold jackdaws 2026 don't".split()


SYLLABLES = "ka ri to ne mu sa lo pe vi dan gor tha sel win bro mek".split()


def _word(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(WORDS)
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))


def _texts(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    ends = [".\n", "!\n", "\n\n", " 😀\n"]
    return [" ".join(_word(rng) for _ in range(rng.randint(3, 40))) + rng.choice(ends) for _ in range(n)]


SAMPLES = ["Hello world!", "  two  spaces\n\nnewlines\r\n", "naïve café 日本 😀👍🏽", "don't DON'T 1234567", "<|endoftext|>", ""]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(_texts(), vocab_size=500)


def test_train_layout_and_specials(tok):
    assert tok.vocab_size == 500
    assert [tok.token_to_id(t) for t in DEFAULT_SPECIALS] == [0, 1, 2, 3]
    assert tok.eos_id == 0 and tok.pad_id == 1
    assert tok.token_to_id("not a token") is None
    # the 256 byte tokens are all present, so any byte sequence encodes without an unknown token
    assert len({tok.token_to_id(chr(c)) for c in range(ord("!"), ord("~") + 1)}) == 94


def test_encode_decode_roundtrip(tok):
    for text in SAMPLES + _texts(20, seed=1):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode("the quick") != [tok.token_to_id(c) for c in "the quick"]  # merges were learned


def test_encode_batch_and_framing(tok):
    texts = SAMPLES * 50
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode("fox", add_special=True) == tok.encode("fox") + [tok.eos_id]
    assert tok.encode_batch(["fox"], add_special=True) == [tok.encode("fox") + [tok.eos_id]]
    with pytest.raises(EmberError, match=r"texts\[1\] is a int"):
        tok.encode_batch(["a", 3])


def test_decode_bad_ids(tok):
    with pytest.raises(EmberError, match=r"token id 500 is out of range, expected 0 <= id < vocab_size=500"):
        tok.decode([1, 500])
    with pytest.raises(EmberError, match="out of range"):
        tok.decode([-1])


def test_save_load_roundtrip(tok, tmp_path):
    out = tok.save(tmp_path / "tok")
    assert sorted(p.name for p in out.iterdir()) == ["ember_tokenizer.json", "tokenizer.json", "tokenizer_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    meta = json.loads((out / "ember_tokenizer.json").read_text())
    assert meta["kind"] == "hf" and meta["eos_token"] == "<|endoftext|>" and meta["chat_template"] == "chatml"
    again = Tokenizer.load(out)
    texts = SAMPLES + _texts(30, seed=2)
    assert again.encode_batch(texts) == tok.encode_batch(texts)
    assert (again.eos_id, again.pad_id, again.vocab_size) == (tok.eos_id, tok.pad_id, tok.vocab_size)
    assert Tokenizer.load(out / "tokenizer.json").encode("fox") == tok.encode("fox")
    tok.save(out)  # overwriting an existing directory works
    assert Tokenizer.load(out).encode("fox") == tok.encode("fox")


def test_transformers_loads_saved_tokenizer(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tok.save(tmp_path / "tok")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    assert auto.eos_token_id == tok.eos_id and auto.pad_token_id == tok.pad_id
    texts = SAMPLES + _texts(50, seed=3) + ["a<|endoftext|>b<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        ours = tok.encode(text, allowed_special="all")  # transformers recognises specials in text
        assert fast.encode(text, add_special_tokens=False) == ours
        assert auto.encode(text, add_special_tokens=False) == ours
        assert auto.decode(ours) == tok.decode(ours)


def test_train_from_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("".join(_texts(200, seed=4)))
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t}) + "\n" for t in _texts(100, seed=5)))
    tok = train_bpe([txt, jsonl], vocab_size=400, text_field="body")
    assert tok.vocab_size == 400 and tok.decode(tok.encode("lazy dog")) == "lazy dog"
    assert train_bpe([str(txt)], vocab_size=300).vocab_size == 300  # str paths too
    packed = tmp_path / "c.jsonl.xz"  # compressed inputs, like the bundled corpus
    with lzma.open(packed, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in _texts(100, seed=7)))
    assert train_bpe([packed], vocab_size=300).vocab_size == 300
    truncated = tmp_path / "d.txt.xz"
    truncated.write_bytes(packed.read_bytes()[:200])
    with pytest.raises(EmberError, match=r"d\.txt\.xz: cannot read"):
        train_bpe([truncated], vocab_size=300)


def test_train_bad_input(tmp_path):
    with pytest.raises(EmberError, match=r"nope\.txt: no such input file"):
        train_bpe([tmp_path / "nope.txt"], vocab_size=300)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(EmberError, match=r"empty\.txt: the input file is empty"):
        train_bpe([empty], vocab_size=300)
    with pytest.raises(EmberError, match="the input is empty"):
        train_bpe(iter([]), vocab_size=300)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(EmberError, match=r"bad\.jsonl:2: not valid JSON"):
        train_bpe([bad], vocab_size=300)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"content": "x"}\n')
    with pytest.raises(EmberError, match=r"nofield\.jsonl:1: no field 'text' \(found \['content'\]\)"):
        train_bpe([nofield], vocab_size=300)
    with pytest.raises(EmberError, match="too small"):
        train_bpe(["some text"], vocab_size=100)


def test_cli_tokenizer_train(tmp_path, capsys):
    from ember.cli import main

    data = tmp_path / "corpus.txt"
    data.write_text("".join(_texts(300, seed=6)))
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(data), "--vocab-size", "320", "--out", str(out), "--no-progress"]) == 0
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 320 and tok.eos_id == 0
    assert main(["tokenizer", "train", "--input", str(tmp_path / "missing.txt"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "missing.txt: no such input file" in err and "Traceback" not in err
    assert Tokenizer.load(out).vocab_size == 320  # a failed run leaves the old tokenizer in place


def test_cli_tokenizer_train_never_replaces_silently(tmp_path, capsys):
    from ember.cli import main

    data = tmp_path / "corpus.txt"
    data.write_text("".join(_texts(300, seed=6)))
    out = tmp_path / "tok"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    args = ["tokenizer", "train", "--input", str(data), "--vocab-size", "320", "--out", str(out), "--no-progress"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "already exists and is not empty" in err and "--overwrite" in err
    assert (out / "precious.txt").read_text() == "keep me"
    assert main(args + ["--overwrite"]) == 0
    assert Tokenizer.load(out).vocab_size == 320
    assert main(["tokenizer", "train", "--input", str(tmp_path), "--out", str(tmp_path / "t2")]) == 1
    assert "is a directory, expected a file" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--input", str(data), "--out", str(data)]) == 1
    assert "is a file, expected a directory" in capsys.readouterr().err


def test_cli_bad_pattern_regex_is_one_line(tmp_path, capsys):
    from ember.cli import main

    data = tmp_path / "corpus.txt"
    data.write_text("".join(_texts(50, seed=1)))
    assert main(["tokenizer", "train", "--input", str(data), "--out", str(tmp_path / "t"), "--pattern", "([a-z",
                 "--vocab-size", "300", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "not a valid split regex" in err and "Traceback" not in err and not (tmp_path / "t").exists()
