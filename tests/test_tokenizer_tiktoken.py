"""Parity with tiktoken: same ranks + same split pattern -> identical ids, on random and adversarial text.

Everything is built in-process (no download): a small byte-level BPE is trained with HF tokenizers,
exported as GPT-2 vocab.json + merges.txt, and a `tiktoken.Encoding` is built from those files by an
independent conversion written here. ember must give tiktoken's ids through every path: its own
trained tokenizer (HF engine), the same files loaded by `Tokenizer.load` (tiktoken and HF engines),
and a `.tiktoken` rank file.
"""

from __future__ import annotations

import base64
import json
import random

import pytest
import tiktoken

from ember.errors import EmberError
from ember.tokenizer import Tokenizer, train_bpe
from ember.tokenizer import formats

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]


def adversarial_texts(seed: int = 0, n: int = 300) -> list[str]:
    rng = random.Random(seed)
    fixed = [
        "", " ", "  ", "\n", "\r\n", "\r\n\r\n  \n", "   leading", "trailing   ", "a" * 3000, "ab" * 1500,
        "x" + " " * 500 + "y", "\t\t\tTabs\t", "don't I'LL you'Re we'VE she's 'S 's", "'ll", "''''",
        "12345678901234", "3.14159 1,000,000 0x1F 1e-9", "naïve café résumé", "e\u0301\u0301\u0301 a\u0308",
        "👍🏽👨‍👩‍👧‍👦🇺🇸", "😀" * 50, "日本語のテキスト、中文文本。한국어", "العربية עברית", "Ωμέγα ΑΒΓ",
        "\u200b\u200c\u200d\ufeff", "\x00\x01\x7f", "<|endoftext|>", "a<|endoftext|>b<|pad|>c<|im_start|>user\nhi<|im_end|>",
        "<|endoftext", "<|im_start|><|im_start|>", "bad \ud800 surrogate", "\udfff", "x\ud83d\ude00y",
        "line1\nline2\r\nline3\rline4", "   \n   \n", "!!!???...,,,;;;", "def f(x):\n    return x**2  # c\n",
        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n", "A" * 100 + "b" * 100, "\u00a0\u2003\u3000 nbsp",
        "ﬁ ligature ＦＵＬＬ", "Ⅻ ½ ² ٣", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "word" * 700, " " * 1000 + "end",
    ]
    pieces = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n\t\r'.,!?-_()[]{}<>|\"") + [
        "é", "ü", "ß", "中", "文", "😀", "🏽", "\u0301", "\u200d", "\u00a0", "  ", "\r\n", "'s", "'LL", "<|endoftext|>", "<|pad|>"
    ]
    out = list(fixed)
    for _ in range(n):
        k = rng.randint(1, 200)
        if rng.random() < 0.3:  # random code points, lone surrogates included
            out.append("".join(chr(rng.randint(1, 0x2FFFF)) for _ in range(k)))
        else:
            out.append("".join(rng.choice(pieces) for _ in range(k)))
    return out


def _corpus() -> list[str]:
    rng = random.Random(1)
    words = "the of and to in is was he that it for on with as his by at be this had not are but from or have".split()
    prose = [" ".join(rng.choice(words) for _ in range(60)) + f". It's {rng.randint(0, 99999)} DON'T\n" for _ in range(300)]
    return prose + adversarial_texts(seed=5, n=200)


# -------------------------------------------------- an independent GPT-2 files -> tiktoken conversion
def _byte_table() -> dict[str, int]:
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(extra)})
    return table


def tiktoken_from_files(vocab_path, merges_path, pattern: str) -> tiktoken.Encoding:
    vocab = json.loads(vocab_path.read_text())
    table = _byte_table()
    merged = {a + b for a, b in (line.split(" ") for line in merges_path.read_text().splitlines()[1:] if line)}
    ranks, specials = {}, {}
    for token, i in vocab.items():
        if len(token) == 1 or token in merged:
            ranks[bytes(table[c] for c in token)] = i
        else:
            specials[token] = i
    return tiktoken.Encoding("test", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


@pytest.fixture(scope="module", params=["cl100k", "gpt2", "o200k"])
def trained(request, tmp_path_factory):
    """(ember tokenizer, tiktoken Encoding from its exported files, dir of the files)."""
    tok = train_bpe(_corpus(), vocab_size=800, pattern=request.param)
    d = tmp_path_factory.mktemp(f"bpe_{request.param}")
    vocab, merges = tok.export_vocab_merges(d)
    return tok, tiktoken_from_files(vocab, merges, formats.PATTERNS[request.param]), d


@pytest.fixture(scope="module")
def hf_engine(trained):
    """The same trained tokenizer, saved and reloaded to encode through HF tokenizers (Rust BPE)."""
    tok, _, d = trained
    hf = Tokenizer.load(tok.save(d / "saved"), engine="hf")
    assert hf.engine == "hf"
    return hf


def _check_same(tok: Tokenizer, enc: tiktoken.Encoding, texts: list[str]) -> None:
    for text in texts:
        assert tok.encode(text) == enc.encode_ordinary(text), repr(text[:80])
        assert tok.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all"), repr(text[:80])
    assert tok.encode_batch(texts) == enc.encode_ordinary_batch(texts)
    assert tok.encode_batch(texts, allowed_special="all") == enc.encode_batch(texts, allowed_special="all")


def test_trained_tokenizer_matches_tiktoken(trained, hf_engine):
    """HF tokenizers' BPE (the engine that trained it) vs tiktoken on the exported ranks."""
    _, enc, _ = trained
    assert enc.n_vocab == hf_engine.vocab_size
    _check_same(hf_engine, enc, adversarial_texts(seed=7, n=400))


def test_default_engine_is_tiktoken_twin(trained):
    """ember encodes a plain byte-level BPE through an equivalent tiktoken Encoding by default."""
    tok, enc, d = trained
    assert tok.engine == "tiktoken"
    assert Tokenizer.load(d / "saved").engine == "tiktoken"
    _check_same(tok, enc, adversarial_texts(seed=17, n=150))


@pytest.mark.parametrize("engine", ["auto", "hf"])
def test_loaded_gpt2_files_match_tiktoken(trained, engine):
    _, enc, d = trained
    pattern = trained[0].meta["pattern"]
    (d / "ember_tokenizer.json").write_text(json.dumps({"format": "ember-tokenizer", "version": 1, "pattern": pattern}))
    tok = Tokenizer.load(d / "vocab.json", engine=engine)
    assert tok.engine == ("hf" if engine == "hf" else "tiktoken")
    assert tok.eos_id == enc.encode_single_token("<|endoftext|>")
    _check_same(tok, enc, adversarial_texts(seed=8, n=150))


@pytest.mark.parametrize("engine", ["auto", "hf"])
def test_special_token_policy(trained, hf_engine, engine):
    tok, enc, _ = trained
    tok = hf_engine if engine == "hf" else tok
    text = "x<|endoftext|>y<|im_start|>"
    plain = tok.encode(text)
    assert tok.eos_id not in plain and plain == enc.encode_ordinary(text)
    ids = tok.encode(text, allowed_special="all")
    assert tok.eos_id in ids and tok.token_to_id("<|im_start|>") == ids[-1]
    only_eos = tok.encode(text, allowed_special={"<|endoftext|>"})
    assert only_eos == enc.encode(text, allowed_special={"<|endoftext|>"}, disallowed_special=())
    assert tok.decode(ids) == text


def test_decode_matches_tiktoken_on_broken_utf8(trained, hf_engine):
    _, enc, _ = trained
    tok = hf_engine
    rng = random.Random(3)
    for _ in range(200):
        ids = [rng.randrange(enc.n_vocab) for _ in range(rng.randint(1, 30))]
        assert tok.decode(ids) == enc.decode(ids, errors="replace")
    for text in adversarial_texts(seed=9, n=50):
        if not any(0xD800 <= ord(c) <= 0xDFFF for c in text):
            assert tok.decode(tok.encode(text)) == text


def test_tiktoken_file_roundtrip(trained, tmp_path):
    tok, enc, d = trained
    ranks = formats.read_gpt2_files(d / "vocab.json", d / "merges.txt")[0]
    lines = [f"{base64.b64encode(b).decode()} {r}" for b, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    path = tmp_path / "mine.tiktoken"
    path.write_text("\n".join(lines) + "\n")
    bare = Tokenizer.load(path)  # unknown rank file: GPT-2 pattern, no specials (with a warning)
    gpt2_enc = tiktoken.Encoding("g", pat_str=formats.GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    texts = adversarial_texts(seed=10, n=60)
    assert [bare.encode(t) for t in texts] == [gpt2_enc.encode_ordinary(t) for t in texts]
    # ember's own saved form of a rank-file tokenizer keeps pattern + specials
    full = Tokenizer.load(d / "vocab.json")
    full.meta["pattern"] = tok.meta["pattern"]
    saved = Tokenizer.load(full.save(tmp_path / "saved"))
    assert saved.backend.kind == "tiktoken" and saved.backend.pattern == full.backend.pattern
    assert saved.encode_batch(texts, allowed_special="all") == full.encode_batch(texts, allowed_special="all")


# -------------------------------------------------- bad files
def _write_pair(d, vocab: dict, merges: list[str]):
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def _byte_vocab() -> dict[str, int]:
    return {formats.bytes_to_token_str(bytes([b])): b for b in range(256)}


def test_mismatched_vocab_and_merges(tmp_path):
    vocab = _byte_vocab() | {"he": 256, "hel": 257}
    _write_pair(tmp_path / "ok", vocab, ["h e", "he l"])
    assert Tokenizer.load(tmp_path / "ok").encode("hel") == [257]
    _write_pair(tmp_path / "bad", vocab, ["h e", "he l", "hel lo"])
    with pytest.raises(EmberError, match=r"merges\.txt:4: token 'lo' is not in .*vocab\.json"):
        Tokenizer.load(tmp_path / "bad")
    _write_pair(tmp_path / "bad2", vocab, ["h e", "l l"])
    with pytest.raises(EmberError, match=r"merges\.txt:3: merge result 'll' is not in"):
        Tokenizer.load(tmp_path / "bad2")
    _write_pair(tmp_path / "bad3", vocab, ["h e", "he l extra"])
    with pytest.raises(EmberError, match=r"merges\.txt:3: expected two tokens"):
        Tokenizer.load(tmp_path / "bad3")
    _write_pair(tmp_path / "bad4", {"a": 0, "b": 1}, [])
    with pytest.raises(EmberError, match=r"vocab\.json: byte 0x00 .* is missing"):
        Tokenizer.load(tmp_path / "bad4")
    (tmp_path / "bad5").mkdir()
    (tmp_path / "bad5" / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(EmberError, match=r"merges\.txt: no such file"):
        Tokenizer.load(tmp_path / "bad5")


def test_bad_tiktoken_file_and_unknown_formats(tmp_path):
    path = tmp_path / "r.tiktoken"
    path.write_text("YQ== 0\nYg== 1\nnot-base64 2\n")
    with pytest.raises(EmberError, match=r"r\.tiktoken:3: .*expected 'BASE64TOKEN RANK'"):
        Tokenizer.load(path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(EmberError, match=r"no tokenizer found \(holds: notes\.txt\)"):
        Tokenizer.load(tmp_path / "empty")
    with pytest.raises(EmberError, match="unknown tokenizer file format"):
        Tokenizer.load(tmp_path / "empty" / "notes.txt")
    with pytest.raises(EmberError, match="no such file or directory"):
        Tokenizer.load(tmp_path / "missing")
    with pytest.raises(EmberError, match="engine="):
        Tokenizer.load(tmp_path, engine="fast")
