"""`ember data prepare` beyond one machine: global dedup, the Ray executor (== local, byte for byte),
fsspec URLs in and out, globs, and resuming a killed run at file granularity."""

import hashlib
import math
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ember.data import shards
from ember.data.dedup import DedupConfig, Deduper, global_decisions
from ember.data.loader import TokenLoader
from ember.data.pipeline import PrepareConfig, SplitConfig, prepare
from ember.errors import EmberError

sys.path.insert(0, str(Path(__file__).parent))
from test_data_prepare import make_doc  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from ember.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("tok")
    train_bpe([make_doc(i) for i in range(50)], 300).save(path)
    return str(path)


def planted_corpus(d: Path) -> dict:
    """Eight files; exact and near duplicates planted across different files, including a chain
    A ~ B ~ C where A and C are not near each other (B is dropped, C kept)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir(parents=True, exist_ok=True)
    docs = [make_doc(100 + i, n=120) for i in range(30)]
    w = " ".join(make_doc(200 + i, n=120) for i in range(3)).split()
    a, b, c = (" ".join(w[k:k + 200]) for k in (0, 15, 30))  # Jaccard: a~b, b~c about 0.85; a~c about 0.73
    docs[0] = a
    near = docs[5].replace(".", ";", 2)
    files = {
        "f0.jsonl": [docs[0], docs[2], docs[3], docs[4]],
        "f1.jsonl": [docs[6], docs[7], b, docs[8]],
        "f2.jsonl": [docs[9], c, docs[10], docs[2]],  # exact dup of f0's docs[2]
        "f3.jsonl": [docs[5], docs[11], docs[12]],
        "f4.jsonl": [docs[13], near, docs[14], docs[15], "too short"],
        "f5.jsonl": [docs[16], docs[17], "  " + docs[3].replace(" ", "  ")],  # whitespace-only copy
    }
    for name, texts in files.items():
        (d / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    pq.write_table(pa.table({"text": [docs[18], docs[19], near, docs[20]]}), d / "f6.parquet")  # near again
    (d / "f7.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[21:30] + [docs[9]]))
    return {"b": b, "c": c, "near": near}


def cfg_for(inp, out, tok, **kw):
    kw = {"num_proc": 2, "chunk_docs": 3, **kw}
    return PrepareConfig(input=[str(inp)], out=str(out), tokenizer=tok, progress=False,
                         split=SplitConfig(val_fraction=0.2, min_val_docs=2, shard_tokens=700), **kw)


def files_of(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def comparable(manifest: dict) -> dict:
    m = json.loads(json.dumps(manifest))
    m["report"].pop("seconds")
    m["report"].pop("mb_per_s")
    return m


def test_global_dedup_equals_the_in_order_deduper():
    """The grouped formulation (what the Ray executor computes) decides exactly as `Deduper`, on random
    signatures with exact copies, near pairs and chains, for every exact/near setting."""
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(150):
        cfg = DedupConfig(threshold=0.5, num_perm=32, exact=bool(trial % 3), near=bool(trial % 5))
        base = [rng.integers(0, 2**32, 32).astype(np.uint64) for _ in range(4)]
        docs = []
        for g in range(40):
            if docs and rng.random() < 0.25:  # an exact copy: same text, so same hash and signature
                _, digest, sig = docs[rng.integers(len(docs))]
            else:
                sig = base[rng.integers(4)].copy()
                flip = rng.random(32) < rng.choice([0.0, 0.3, 0.5, 0.7])
                sig[flip] = rng.integers(0, 2**32, int(flip.sum()))
                digest = hashlib.blake2b(sig.tobytes(), digest_size=16).digest()
            docs.append(((g // 7) << 32 | g, digest, sig if cfg.near else None))
        ref, deduper = {}, Deduper(cfg)
        for g, digest, sig in docs:
            if reason := deduper.check(digest, sig):
                ref[g] = reason
        assert global_decisions(docs, cfg) == ref, trial
        checked += len(ref)
    assert checked > 1000  # the cases are not trivially empty


def test_planted_duplicates_local(tmp_path, tokenizer_dir):
    planted = planted_corpus(tmp_path / "in")
    m = prepare(cfg_for(tmp_path / "in", tmp_path / "out", tokenizer_dir))
    r = m["report"]
    assert r["dropped"]["exact_dup"]["docs"] == 3 and r["dropped"]["near_dup"]["docs"] == 3  # b, near x2
    assert r["dropped"]["min_words"]["docs"] == 1 and r["input"]["files"] == 8
    from test_data_prepare import decode_docs

    got = decode_docs(tmp_path / "out", "train") + decode_docs(tmp_path / "out", "val")
    assert planted["c"] in got and planted["b"] not in got  # the chain: C stays, as Deduper decides


def test_memory_urls_in_and_out_and_streaming_loader(tmp_path, tokenizer_dir, monkeypatch):
    """Inputs globbed from memory://, the dataset written to memory://, and TokenLoader reading it
    through its local cache: identical to the local-path run and its batches."""
    import fsspec

    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "cache"))
    planted_corpus(tmp_path / "in")
    fs = fsspec.filesystem("memory")
    for p in sorted((tmp_path / "in").iterdir()):
        fs.pipe_file(f"/corpus/{p.name}", p.read_bytes())
    fs.pipe_file("/corpus/notes.bin", b"not an input")  # the glob and the directory skip other types
    local = prepare(cfg_for(tmp_path / "in", tmp_path / "out", tokenizer_dir))
    url = "memory://datasets/planted"
    remote_m = prepare(PrepareConfig(**{**cfg_for("memory://corpus/f*.*", url, tokenizer_dir).__dict__}))
    assert comparable(remote_m) == comparable(local) | {"config": comparable(remote_m)["config"]}
    assert comparable(remote_m)["splits"] == comparable(local)["splits"]
    for name, data in files_of(tmp_path / "out").items():
        if name not in ("manifest.json", "report.json"):
            assert fs.cat_file(f"/datasets/planted/{name}") == data, name
    assert not fs.exists("/datasets/.planted.prepare-work")  # the work dir is gone after success
    with pytest.raises(EmberError, match="no such file"):
        prepare(cfg_for("memory://corpus/missing.jsonl", url, tokenizer_dir))
    with pytest.raises(EmberError, match="matches no file"):
        prepare(cfg_for("memory://corpus/*.csv", url, tokenizer_dir))

    ref = TokenLoader(tmp_path / "out", "train", block_size=16, batch_size=4, dp_rank=1, dp_size=2, seed=3)
    got = TokenLoader(url, "train", block_size=16, batch_size=4, dp_rank=1, dp_size=2, seed=3)
    assert got.files == ref.files
    for _ in range(5):
        for a, b in zip(ref.next_batch(), got.next_batch()):
            assert a.equal(b)
    state = got.state_dict()
    again = TokenLoader(url, "train", block_size=16, batch_size=4, dp_rank=1, dp_size=2, seed=3)
    again.load_state_dict(state)  # exact resume from the URL too
    for a, b in zip(ref.next_batch(), again.next_batch()):
        assert a.equal(b)
    cached = list((tmp_path / "cache" / "remote").iterdir())
    assert len(cached) == 1 and (cached[0] / "tokenizer").is_dir()
    # a corrupted shard at the source is refused, not cached
    first = got.files[0]["file"]
    (cached[0] / first).unlink()
    fs.pipe_file(f"/datasets/planted/{first}", b"EMBERTOK" + b"\0" * 200)
    with pytest.raises(EmberError, match="sha256"):
        TokenLoader(url, "train", block_size=16, batch_size=4).next_batch()
    assert not (cached[0] / first).exists()


def test_glob_inputs_local(tmp_path, tokenizer_dir):
    planted_corpus(tmp_path / "in")
    a = prepare(cfg_for(tmp_path / "in", tmp_path / "a", tokenizer_dir))
    b = prepare(cfg_for(str(tmp_path / "in" / "f*"), tmp_path / "b", tokenizer_dir))
    assert comparable(a)["splits"] == comparable(b)["splits"]


_CHILD = """
import sys, time
from ember.data import pipeline
real = pipeline.process_doc
def slow(text, cfg, decontam=None):
    if "marker-slow" in text:
        time.sleep(600)
    return real(text, cfg, decontam)
pipeline.process_doc = slow
sys.path.insert(0, {tests!r})
from test_data_scale import cfg_for
pipeline.prepare(cfg_for({inp!r}, {out!r}, {tok!r}, num_proc=1))
"""


def test_killed_prepare_resumes_without_redoing_finished_files(tmp_path, tokenizer_dir, monkeypatch):
    """SIGKILL mid-run: finished files' fragments survive, no partial fragment or shard is left that
    looks valid, and the rerun reads only the files that were not finished; output == a clean run."""
    planted_corpus(tmp_path / "in")
    slow = tmp_path / "in" / "f5.jsonl"
    slow.write_text(slow.read_text() + json.dumps({"text": make_doc(999, n=80) + " marker-slow"}) + "\n")
    out, work = tmp_path / "out", tmp_path / ".out.prepare-work"
    code = _CHILD.format(tests=str(Path(__file__).parent), inp=str(tmp_path / "in"), out=str(out), tok=tokenizer_dir)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list(work.glob("*.parquet"))) < 5:
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    done = sorted(p.name for p in work.glob("*.parquet"))
    assert [n[:6] for n in done] == ["000000", "000001", "000002", "000003", "000004"]
    assert not out.exists()  # nothing that looks like a dataset
    from ember.data import pipeline

    seen, real_read = [], pipeline.read_file
    monkeypatch.setattr(pipeline, "read_file", lambda path, *a: (seen.append(Path(path).name), real_read(path, *a))[1])
    resumed = prepare(cfg_for(tmp_path / "in", out, tokenizer_dir, num_proc=1))
    assert seen == ["f5.jsonl", "f6.parquet", "f7.jsonl"]
    assert not work.exists()
    fresh = prepare(cfg_for(tmp_path / "in", tmp_path / "fresh", tokenizer_dir, num_proc=1))
    assert comparable(resumed)["splits"] == comparable(fresh)["splits"]
    assert comparable(resumed)["report"] == comparable(fresh)["report"]


# --------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_executor_equals_local_byte_for_byte(tmp_path, tokenizer_dir, ray_local):
    planted_corpus(tmp_path / "in")
    out_l, out_r = tmp_path / "local" / "ds", tmp_path / "ray" / "ds"
    ml = prepare(cfg_for(tmp_path / "in", out_l, tokenizer_dir))
    mr = prepare(cfg_for(tmp_path / "in", out_r, tokenizer_dir, executor="ray"))
    assert comparable(ml) == comparable(mr)
    fl, fr = files_of(out_l), files_of(out_r)
    assert fl.keys() == fr.keys()
    for name in fl:
        if name not in ("manifest.json", "report.json"):  # these two differ only in the timings
            assert fl[name] == fr[name], name
    assert mr["report"]["dropped"]["near_dup"]["docs"] == 3 and mr["report"]["dropped"]["exact_dup"]["docs"] == 3
    # a trained tokenizer too (trained on the driver from the same kept documents)
    ml2 = prepare(cfg_for(tmp_path / "in", tmp_path / "l2", "", vocab_size=300))
    mr2 = prepare(cfg_for("file://" + str(tmp_path / "in"), "file://" + str(tmp_path / "r2"), "", vocab_size=300,
                          executor="ray"))
    assert comparable(ml2)["splits"] == comparable(mr2)["splits"]
    assert (tmp_path / "l2" / "tokenizer" / "tokenizer.json").read_bytes() == \
        (tmp_path / "r2" / "tokenizer" / "tokenizer.json").read_bytes()


@pytest.mark.slow
def test_ray_job_resumes_after_a_failure_redoing_only_unfinished_files(tmp_path, tokenizer_dir, ray_local, capsys):
    planted_corpus(tmp_path / "in")
    good = (tmp_path / "in" / "f4.jsonl").read_bytes()
    (tmp_path / "in" / "f4.jsonl").write_text('{"text": "fine"}\nnot json\n')
    out, work = tmp_path / "out", tmp_path / ".out.prepare-work"
    with pytest.raises(EmberError, match=r"f4\.jsonl:2: malformed JSONL"):
        prepare(cfg_for(tmp_path / "in", out, tokenizer_dir, executor="ray"))
    kept = {p.name: p.stat().st_mtime_ns for p in work.glob("*.parquet")}
    assert len(kept) == 7 and not any(n.startswith("000004") for n in kept) and not out.exists()
    (tmp_path / "in" / "f4.jsonl").write_bytes(good)
    capsys.readouterr()
    m = prepare(cfg_for(tmp_path / "in", out, tokenizer_dir, executor="ray"))
    assert "resuming: 7 of 8 input files already done" in capsys.readouterr().out
    assert not work.exists()
    ref = prepare(cfg_for(tmp_path / "in", tmp_path / "ref", tokenizer_dir))
    assert comparable(m) == comparable(ref)


def test_ray_refuses_process_local_urls(tmp_path, tokenizer_dir):
    pytest.importorskip("ray.data")
    with pytest.raises(EmberError, match="memory:// filesystem lives in one process"):
        prepare(cfg_for("memory://corpus/x.jsonl", tmp_path / "o", tokenizer_dir, executor="ray"))


# --------------------------------------------------------------------------- mixtures
@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("mix")
    outs = []
    for k, seeds in enumerate((range(300, 340), range(400, 430))):
        (root / f"in{k}").mkdir()
        (root / f"in{k}" / "d.jsonl").write_text("".join(json.dumps({"text": make_doc(s)}) + "\n" for s in seeds))
        prepare(cfg_for(root / f"in{k}", root / f"ds{k}", tokenizer_dir))
        outs.append(root / f"ds{k}")
    return outs


def test_mixture_weights_rows_and_exact_resume(two_datasets):
    from ember.data.loader import MixtureLoader, parse_mix

    a, b = map(str, two_datasets)
    src = parse_mix(f"{a}:7,{b}:3")
    assert src == [(a, 0.7), (b, 0.3)]
    kw = dict(block_size=16, batch_size=8, dp_rank=1, dp_size=2, seed=5)
    mix = MixtureLoader(src, "train", **kw)
    refs = [TokenLoader(a, "train", **kw), TokenLoader(b, "train", **kw)]
    counts = np.zeros(2)
    for step in range(200):
        x, y = mix.next_batch()
        src_rows = mix.last_sources
        counts += np.bincount(src_rows, minlength=2)
        for k in (0, 1):  # each row is the next window of its own dataset's stream
            rows = np.flatnonzero(src_rows == k)
            rx, ry = refs[k].take(len(rows))
            assert x[torch_idx(rows)].equal(rx) and y[torch_idx(rows)].equal(ry)
        if step == 120:
            saved = mix.state_dict()
            rest = [mix.next_batch() for _ in range(3)]
            for ld, r in zip(refs, mix.loaders):
                ld.load_state_dict(r.state_dict())
    frac = counts[0] / counts.sum()
    n = counts.sum()
    assert abs(frac - 0.7) < 3 * np.sqrt(0.21 / n), frac  # within sampling error
    again = MixtureLoader(src, "train", **kw)
    again.load_state_dict(saved)
    for (x1, y1), (x2, y2) in zip(rest, [again.next_batch() for _ in range(3)]):
        assert x1.equal(x2) and y1.equal(y2)
    assert sum(1 for _ in mix.iter_eval(4)) == 3 + 1  # round(4 * 0.7) + round(4 * 0.3)


def torch_idx(rows):
    import torch

    return torch.from_numpy(rows)


def test_mixture_bad_specs_are_clear(two_datasets, tmp_path, tokenizer_dir):
    from ember.data.loader import MixtureLoader, parse_mix

    for spec, msg in (("a", "not SOURCE:WEIGHT"), ("a:0", "weight > 0"), ("a:x", "not SOURCE:WEIGHT"),
                      ("a:1,a:2", "named twice"), ("", "no sources")):
        with pytest.raises(EmberError, match=msg):
            parse_mix(spec)
    from ember.tokenizer import train_bpe

    train_bpe([make_doc(i) for i in range(40)], 280).save(tmp_path / "tok2")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "d.jsonl").write_text("".join(json.dumps({"text": make_doc(s)}) + "\n" for s in range(20)))
    prepare(cfg_for(tmp_path / "in", tmp_path / "other", str(tmp_path / "tok2")))
    with pytest.raises(EmberError, match="needs one tokenizer"):
        MixtureLoader([(str(two_datasets[0]), 0.5), (str(tmp_path / "other"), 0.5)], "train", 16, 4)


def test_pretrain_on_a_mix_of_a_dir_and_a_url(two_datasets, tmp_path, monkeypatch, capsys):
    """`ember pretrain --data.mix DIR:0.6,memory://...:0.4` trains and resumes exactly (same losses)."""
    import fsspec

    from ember.cli import main as cli

    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    for p in sorted(two_datasets[1].rglob("*")):
        if p.is_file():
            fs.pipe_file(f"/mixsrc/{p.relative_to(two_datasets[1]).as_posix()}", p.read_bytes())
    mix = f"{two_datasets[0]}:0.6,memory://mixsrc:0.4"

    def args(run, *extra):
        return ["pretrain", "--model-preset", "tiny", "--data.mix", mix, "--data.block-size", "32", "--run-dir",
                str(run), "--train.batch-size", "4", "--train.warmup-steps", "0", "--train.schedule", "constant",
                "--train.eval-every", "0",
                "--train.log-every", "1", "--train.save-every", "2", "--samples.num", "0", "--device", "cpu", *extra]

    assert cli(args(tmp_path / "full", "--train.max-steps", "4")) == 0
    assert cli(args(tmp_path / "half", "--train.max-steps", "2")) == 0
    assert cli(args(tmp_path / "half", "--train.max-steps", "4", "--resume")) == 0

    def losses(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}

    full, half = losses(tmp_path / "full"), losses(tmp_path / "half")
    assert full[3] == pytest.approx(half[3], abs=1e-6) and full[4] == pytest.approx(half[4], abs=1e-6)
    result = json.loads((tmp_path / "full" / "result.json").read_text())
    assert math.isfinite(result["unigram_entropy"]) and result["val_loss"] < 10


_RAY_CHILD = """
from ember.data.pipeline import PrepareConfig, prepare
prepare(PrepareConfig(input=[{inp!r}], out={out!r}, tokenizer={tok!r}, progress=False, executor="ray", num_proc=2))
"""


@pytest.mark.slow
def test_killed_ray_job_resumes(tmp_path, tokenizer_dir, ray_local, capsys):
    """SIGKILL of the Ray driver while the big file is still in a worker: the finished files' fragments
    survive, the rerun redoes only the big file, and the output equals the local executor's."""
    inp = tmp_path / "in"
    inp.mkdir()
    for k in range(6):
        (inp / f"f{k}.jsonl").write_text("".join(json.dumps({"text": make_doc(k * 1000 + i)}) + "\n" for i in range(10)))
    (inp / "f6.jsonl").write_text("".join(json.dumps({"text": make_doc(90_000 + i, n=300)}) + "\n" for i in range(1800)))
    out, work = tmp_path / "out", tmp_path / ".out.prepare-work"
    child = subprocess.Popen([sys.executable, "-c", _RAY_CHILD.format(inp=str(inp), out=str(out), tok=tokenizer_dir)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and len(list(work.glob("*.parquet"))) < 6:
            time.sleep(0.1)
    finally:  # the whole job dies, as under a scheduler's kill: the driver and the Ray instance it started
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    time.sleep(1)
    done = sorted(p.name[:6] for p in work.glob("*.parquet"))
    assert done == ["000000", "000001", "000002", "000003", "000004", "000005"] and not out.exists()
    capsys.readouterr()
    cfg = PrepareConfig(input=[str(inp)], out=str(out), tokenizer=tokenizer_dir, progress=False, executor="ray")
    resumed = prepare(cfg)
    assert "resuming: 6 of 7 input files already done" in capsys.readouterr().out
    ref = prepare(PrepareConfig(input=[str(inp)], out=str(tmp_path / "ref"), tokenizer=tokenizer_dir, progress=False))
    assert comparable(resumed) == comparable(ref)


def test_decontamination_keys_are_the_same_in_every_process():
    """The n-gram index built by the driver is used by workers (Ray: other processes, other machines), so
    its keys must not depend on Python's per-process string hash seed."""
    from ember.data.decontam import ngram_keys, words

    text = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat today again"
    code = ("from ember.data.decontam import ngram_keys, words; "
            f"print(list(ngram_keys(words({text!r}), 5)))")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        assert json.loads(out) == list(ngram_keys(words(text), 5))


def test_rerun_into_a_url_replaces_the_dataset_and_refuses_foreign_files(tmp_path, tokenizer_dir):
    import fsspec

    fs = fsspec.filesystem("memory")
    planted_corpus(tmp_path / "in")
    url = "memory://rerun/ds"
    big = prepare(cfg_for(tmp_path / "in", url, tokenizer_dir))
    small = cfg_for(tmp_path / "in", url, tokenizer_dir)
    small.split.shard_tokens = 100_000  # one shard per split now: the old extra shards must go
    m = prepare(small)
    names = {p.rsplit("/", 1)[-1] for p in fs.ls("/rerun/ds", detail=False)}
    assert len(big["splits"]["train"]) > 1 and len(m["splits"]["train"]) == 1
    assert names == {"manifest.json", "report.json", "tokenizer", "train_000000.bin", "val_000000.bin"}
    assert json.loads(fs.cat_file("/rerun/ds/manifest.json")) == json.loads(json.dumps(m))
    fs.pipe_file("/foreign/ds/train_000000.bin", b"someone else's")
    with pytest.raises(EmberError, match="ember did not write"):
        prepare(cfg_for(tmp_path / "in", "memory://foreign/ds", tokenizer_dir))
    assert fs.cat_file("/foreign/ds/train_000000.bin") == b"someone else's"
