"""`ember data prepare` end to end on small files: formats, cleaning, report, determinism, bad input."""

import gzip
import json
import lzma
import random

from pathlib import Path

import numpy as np
import pytest

from ember.data import shards
from ember.data.loader import TokenLoader
from ember.data.pipeline import PrepareConfig, SplitConfig, prepare
from ember.errors import EmberError

WORDS = ("the of and to in that with have be river stone garden winter morning lantern copper window "
         "village harbour bread quiet letter mountain forest candle silver market shadow meadow orchard "
         "sailor painter kitchen ladder thunder basket feather mirror saddle violin journey island "
         "whisper walked carried opened found built watched remembered answered gathered").split()


def make_doc(seed, n=80):
    rng = random.Random(seed)
    sents = []
    while sum(len(s.split()) for s in sents) < n:
        sents.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + ".")
    return " ".join(sents)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from ember.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("tok")
    train_bpe([make_doc(i) for i in range(50)], 300).save(path)
    return str(path)


def write_inputs(d):
    """Six input files in every supported format; returns the docs that must come out (cleaned)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = {i: make_doc(i) for i in range(12)}
    (d / "a.txt").write_text(docs[0])
    (d / "b.txt").write_text(docs[1] + "\n===\n" + docs[2])
    (d / "c.jsonl").write_text("".join(json.dumps({"text": docs[i], "id": i}) + "\n" for i in (3, 4)))
    with gzip.open(d / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": docs[5]}) + "\n\n" + json.dumps({"text": docs[3]}) + "\n")  # exact dup of 3
    pq.write_table(pa.table({"text": [docs[6], docs[7], "too short"]}), d / "e.parquet")
    near = docs[8].replace(".", ";", 1)  # a near duplicate of doc 8
    pii = docs[9] + " Write to jane.roe@example.com or call 555-123-4567, host 10.1.2.3."
    with lzma.open(d / "f.txt.xz", "wt") as f:
        f.write("\n===\n".join([docs[8], near, pii, "Cafe\u0301 " + docs[10]]))
    expected = [docs[i] for i in range(9)] + [
        docs[9] + " Write to [EMAIL] or call [PHONE], host [IP].", "Caf\u00e9 " + docs[10]]
    return expected


def config(inp, out, tok, **kw):
    cfg = PrepareConfig(input=[str(inp)], out=str(out), tokenizer=tok, txt_separator="\n===\n",
                        progress=False, split=SplitConfig(val_fraction=0.2, min_val_docs=2, shard_tokens=500), **kw)
    return cfg


def decode_docs(out, split):
    from ember.tokenizer import Tokenizer

    tok = Tokenizer.load(out / "tokenizer")
    m = shards.read_manifest(out)
    if not m["splits"][split]:
        return []
    ids = np.concatenate([shards.read_shard(out / e["file"], verify=True) for e in m["splits"][split]])
    cuts = np.flatnonzero(ids == m["eos_id"]).tolist() + [len(ids)]
    assert cuts[0] == 0  # every document starts with EOS
    return [tok.decode(ids[a + 1:b].tolist()) for a, b in zip(cuts, cuts[1:])]


def test_end_to_end_all_formats(tmp_path, tokenizer_dir):
    (tmp_path / "in").mkdir()
    expected = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    m = prepare(config(tmp_path / "in", out, tokenizer_dir))
    got = decode_docs(out, "train") + decode_docs(out, "val")
    assert sorted(got) == sorted(expected)
    assert m["docs"]["val"] == 2 and m["vocab_size"] == 300 and m["dtype"] == "uint16"
    assert len(m["splits"]["train"]) >= 2  # shard_tokens=500 cuts several shards
    r = json.loads((out / "report.json").read_text())
    assert r["input"]["files"] == 6 and r["input"]["docs"] == 14
    assert r["dropped"]["exact_dup"]["docs"] == 1 and r["dropped"]["near_dup"]["docs"] == 1
    assert r["dropped"]["min_words"]["docs"] == 1
    assert r["pii"] == {"email": 1, "ip": 1, "phone": 1}
    assert r["kept"]["docs"] == 11 and r["input"]["bytes"] == r["kept"]["bytes"] + sum(
        v["bytes"] for v in r["dropped"].values())
    assert not list(out.glob(".*"))  # no temp files left
    x, y = TokenLoader(out, "train", block_size=8, batch_size=2).next_batch()
    assert x.shape == (2, 8) and int(x.max()) < 300


def test_one_and_two_processes_give_identical_shards(tmp_path, tokenizer_dir):
    (tmp_path / "in").mkdir()
    write_inputs(tmp_path / "in")
    outs = []
    for n in (1, 2):
        out = tmp_path / f"out{n}"
        m = prepare(config(tmp_path / "in", out, tokenizer_dir, num_proc=n, chunk_docs=2))
        outs.append((out, m))
    (o1, m1), (o2, m2) = outs
    assert m1["splits"] == m2["splits"] and m1["report"]["dropped"] == m2["report"]["dropped"]
    for e in m1["splits"]["train"] + m1["splits"]["val"]:
        assert (o1 / e["file"]).read_bytes() == (o2 / e["file"]).read_bytes()


def test_trains_a_tokenizer_when_none_given(tmp_path):
    for i in range(10):
        (tmp_path / f"{i}.txt").write_text(make_doc(100 + i))
    m = prepare(PrepareConfig(input=[str(tmp_path)], out=str(tmp_path / "o"), vocab_size=300, progress=False))
    assert m["vocab_size"] == 300 and (tmp_path / "o" / "tokenizer").is_dir()
    assert sorted(decode_docs(tmp_path / "o", "train") + decode_docs(tmp_path / "o", "val")) == sorted(
        make_doc(100 + i) for i in range(10))


def test_invalid_utf8_is_replaced_and_counted(tmp_path, tokenizer_dir):
    (tmp_path / "bad.txt").write_bytes(make_doc(1).encode() + b" caf\xe9 \xff\xfe end.")
    m = prepare(config(tmp_path / "bad.txt", tmp_path / "o", tokenizer_dir))
    assert m["report"]["input"]["bad_utf8_docs"] == 1 and m["report"]["input"]["bad_utf8_chars"] == 3
    assert "\ufffd" in (decode_docs(tmp_path / "o", "train") + decode_docs(tmp_path / "o", "val"))[0]


def test_malformed_jsonl_line(tmp_path, tokenizer_dir):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"text": make_doc(1)}) + "\n{broken\n" + json.dumps({"text": make_doc(2)}) + "\n")
    with pytest.raises(EmberError, match=r"x\.jsonl:2: malformed JSONL.*--skip-bad-lines"):
        prepare(config(path, tmp_path / "o", tokenizer_dir))
    m = prepare(config(path, tmp_path / "o", tokenizer_dir, skip_bad_lines=True))
    assert m["report"]["input"]["bad_lines"] == 1 and m["report"]["kept"]["docs"] == 2


def test_empty_input_and_missing_field(tmp_path, tokenizer_dir):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(EmberError, match="empty input"):
        prepare(config(tmp_path / "empty.jsonl", tmp_path / "o", tokenizer_dir))
    (tmp_path / "d").mkdir()
    with pytest.raises(EmberError, match="no input files"):
        prepare(config(tmp_path / "d", tmp_path / "o", tokenizer_dir))
    with pytest.raises(EmberError, match="no such file"):
        prepare(config(tmp_path / "nope.txt", tmp_path / "o", tokenizer_dir))
    (tmp_path / "f.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(EmberError, match=r"f\.jsonl:1: field 'text' is missing.*--text-field"):
        prepare(config(tmp_path / "f.jsonl", tmp_path / "o", tokenizer_dir))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(EmberError, match="no column 'text'"):
        prepare(config(tmp_path / "p.parquet", tmp_path / "o", tokenizer_dir))
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(EmberError, match="every document was dropped.*min_words"):
        prepare(config(tmp_path / "short.txt", tmp_path / "o", tokenizer_dir))


def _snapshot(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_interrupted_prepare_keeps_the_previous_dataset(tmp_path, tokenizer_dir, monkeypatch):
    (tmp_path / "in").mkdir()
    write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    prepare(config(tmp_path / "in", out, tokenizer_dir))  # a complete earlier run in the same dir
    before = _snapshot(out)
    calls = {"n": 0}
    real = shards.write_shard

    def crash_on_second(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(shards, "write_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare(config(tmp_path / "in", out, tokenizer_dir))
    assert _snapshot(out) == before  # Ctrl-C mid-run: the old dataset is whole
    # only the finished files' stage-1 work is left beside it (for a resume), no half-built dataset
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.prepare-work", "in", "out"]
    assert len(list((tmp_path / ".out.prepare-work").glob("*.parquet"))) == 6
    with pytest.raises(EmberError):  # a mistyped --input: nothing is touched either
        prepare(config(tmp_path / "missing.jsonl", out, tokenizer_dir))
    assert _snapshot(out) == before
    TokenLoader(out, "train", 8, 2).next_batch()
    monkeypatch.setattr(shards, "write_shard", real)
    prepare(config(tmp_path / "in", out, tokenizer_dir))  # resumes, and a complete run cleans up
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k.suffix == ".bin"} == {k: v for k, v in before.items() if k.suffix == ".bin"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_rerun_replaces_only_embers_files(tmp_path, tokenizer_dir):
    (tmp_path / "in").mkdir()
    write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    prepare(config(tmp_path / "in", out, tokenizer_dir))
    (out / "notes.txt").write_text("mine")
    (out / "train_000099.bin").write_bytes(b"an old shard the manifest does not list")
    with pytest.raises(EmberError, match="train_000099.bin, which ember did not write"):
        prepare(config(tmp_path / "in", out, tokenizer_dir))
    (out / "train_000099.bin").unlink()
    cfg = config(tmp_path / "in", out, tokenizer_dir)
    cfg.split.shard_tokens = 50  # more, smaller shards than before
    m = prepare(cfg)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(e["file"] for v in m["splits"].values() for e in v)
    assert not list(out.glob(".*"))


def test_out_dot_never_deletes_the_users_files(tmp_path, tokenizer_dir, monkeypatch):
    (tmp_path / "in").mkdir()
    write_inputs(tmp_path / "in")
    work = tmp_path / "project"
    work.mkdir()
    own = {"report.json": b"my report", "manifest.json": b'{"mine": 1}', "train_000000.bin": b"my data"}
    for name, data in own.items():
        (work / name).write_bytes(data)
    monkeypatch.chdir(work)
    with pytest.raises(EmberError, match="ember did not write"):
        prepare(config(tmp_path / "in", Path("."), tokenizer_dir))
    assert {n: (work / n).read_bytes() for n in own} == own
    assert sorted(p.name for p in work.iterdir()) == sorted(own)


def test_outputs_honour_the_umask(tmp_path, tokenizer_dir):
    import os
    import stat

    (tmp_path / "in").mkdir()
    write_inputs(tmp_path / "in")
    old = os.umask(0o022)
    try:
        prepare(config(tmp_path / "in", tmp_path / "out", tokenizer_dir))
    finally:
        os.umask(old)
    out = tmp_path / "out"
    for p in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))


def test_cli(tmp_path, tokenizer_dir, capsys):
    from ember.cli import main

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": make_doc(i)}) + "\n" for i in range(6)))
    (tmp_path / "b.json").write_text(json.dumps([{"body": make_doc(10)}, {"body": make_doc(11)}]))
    (tmp_path / "c.txt").write_text(make_doc(12) + "\n@@\n" + make_doc(13))
    args = ["data", "prepare", "--out", str(tmp_path / "o"), "--tokenizer", tokenizer_dir, "--no-progress"]
    inputs = ["--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.json"), str(tmp_path / "c.txt")]
    assert main(args + inputs + ["--text-field", "body", "--txt-separator", "\\n@@\\n", "--num-proc", "1"]) == 0
    assert "kept" in capsys.readouterr().out
    assert shards.read_manifest(tmp_path / "o")["report"]["kept"]["docs"] == 10
    assert main(args + ["--input", str(tmp_path / "a.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "field 'text' is missing" in err and len(err.strip().splitlines()) == 1


def test_prepare_default_is_cached_and_idempotent(tmp_path, monkeypatch):
    """The bundled path (on a tiny stand-in corpus): prepared once, then found by its manifest."""
    from ember.data import bundled, pipeline

    assets = tmp_path / "assets"
    assets.mkdir()
    for k, name in enumerate(bundled.FILES):
        with lzma.open(assets / name, "wt") as f:
            f.write("".join(json.dumps({"text": make_doc(200 + 10 * k + i)}) + "\n" for i in range(6)))
    monkeypatch.setattr(bundled, "ASSETS", assets)
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "cache"))
    out = bundled.prepare_default(vocab_size=300, num_proc=1)
    assert out == tmp_path / "cache" / "prepared" / "default-v1-bpe300"
    assert shards.read_manifest(out)["docs"] == {"train": 8, "val": 4}

    def fail(*a, **kw):
        raise AssertionError("prepare ran again")

    monkeypatch.setattr(bundled, "prepare", fail)
    assert bundled.prepare_default(vocab_size=300) == out  # cached: no second prepare
    (out / "val_000000.bin").write_bytes(b"x")  # a damaged cache is rebuilt
    monkeypatch.setattr(bundled, "prepare", pipeline.prepare)
    assert bundled.prepare_default(vocab_size=300, num_proc=1) == out
    TokenLoader(out, "val", block_size=8, batch_size=2).next_batch()


def test_bundled_assets_match_their_readme():
    import hashlib

    from ember.data import bundled

    readme = (bundled.ASSETS / "README.md").read_text()
    total = 0
    for path in bundled.bundled_inputs():
        data = open(path, "rb").read()
        total += len(data)
        assert hashlib.sha256(data).hexdigest() in readme, path
    assert total < 3_000_000


def test_bad_compressed_inputs_and_null_fields_are_clear_errors(tmp_path):
    from ember.data.readers import ReadConfig, ReadStats, read_documents

    good = gzip.compress(("\n".join(json.dumps({"text": f"doc {i} " * 20}) for i in range(200)) + "\n").encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "fake.jsonl.gz").write_bytes(b'{"text": "not gzip at all"}\n')
    (tmp_path / "fake.jsonl.xz").write_bytes(b'{"text": "not xz at all"}\n')
    for name, kind in (("cut.jsonl.gz", "gzip"), ("fake.jsonl.gz", "gzip"), ("fake.jsonl.xz", "xz")):
        with pytest.raises(EmberError, match=rf"{name}: truncated or not a {kind} file"):
            list(read_documents([tmp_path / name], ReadConfig(), ReadStats()))
    (tmp_path / "n.jsonl").write_text('{"text": "fine"}\n{"text": null}\n{"body": "x"}\n{"text": 3}\n')
    with pytest.raises(EmberError, match=r"n.jsonl:2: field 'text' is null\. HINT: fix the record"):
        list(read_documents([tmp_path / "n.jsonl"], ReadConfig(), ReadStats()))
    stats = ReadStats()
    assert list(read_documents([tmp_path / "n.jsonl"], ReadConfig(skip_bad_lines=True), stats)) == ["fine"]
    assert stats.bad_lines == 3


def test_nonsense_split_and_chunk_values_are_refused(tmp_path):
    from ember.config import ConfigError, from_dict

    for data, msg in (({"split": {"shard_tokens": 0}}, "split.shard_tokens=0"),
                      ({"chunk_docs": 0}, "chunk_docs=0"), ({"split": {"val_fraction": 1.5}}, "val_fraction=1.5"),
                      ({"num_proc": 0}, "num_proc=0")):
        with pytest.raises(ConfigError, match=msg.replace(".", r"\.")):
            from_dict(PrepareConfig, data)


def test_cli_prepare_errors_are_single_prefixed_lines(tmp_path, capsys):
    from ember.cli import main

    assert main(["data", "prepare", "--split.shard-tokens", "0", "--input", "x", "--out", str(tmp_path / "o")]) == 2
    err = " ".join(capsys.readouterr().err.replace("│", " ").split())
    assert "shard_tokens=0: expected at least 1" in err and not (tmp_path / "o").exists()
    assert main(["data", "prepare", "--filter.min-words", "3"]) == 1
    err = capsys.readouterr().err
    assert "--filter.min-words: apply only with --input" in err
    assert main(["data", "prepare", "--input", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("ember data prepare:") == 1 and "error: " in err


def test_one_document_txt_dropped_by_max_words_hints_at_the_separator(tmp_path, tokenizer_dir):
    (tmp_path / "book.txt").write_text(" ".join(f"word{i % 50}" for i in range(3000)) + "\n")
    cfg = PrepareConfig(input=[str(tmp_path / "book.txt")], out=str(tmp_path / "o"), tokenizer=tokenizer_dir,
                        progress=False, num_proc=1)
    cfg.filter.max_words = 1000
    with pytest.raises(EmberError, match="max_words.*--txt-separator"):
        prepare(cfg)
