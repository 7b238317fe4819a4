"""`ember generate` and `ember chat` end to end on a tiny checkpoint (save_checkpoint + a tiny trained BPE)."""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ember import cli
from ember.errors import EmberError
from ember.infer import api
from ember.infer.generate import generate as generate_ids
from ember.infer.sample import SamplingParams
from ember.models import Transformer, preset
from ember.tokenizer import Tokenizer, train_bpe
from ember.io.checkpoint import CheckpointError, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TEXT = ["the quick brown fox jumps over the lazy dog. ", "hello world, hello there! ", "once upon a time "]


@pytest.fixture(autouse=True)
def one_thread(set_threads):
    """Tiny models are overhead-bound: one thread is faster (and steadier on a busy machine)."""
    set_threads(1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tok = train_bpe(iter([t * 30 for t in TEXT]), vocab_size=300)
    tok.save(root / "tok")
    model = Transformer(preset("tiny", block_size=64))  # vocab 512 > 300: padded rows are never sampled
    model.init_weights(0)
    save_checkpoint(model, root / "ck", tokenizer_dir=root / "tok")
    small = Transformer(preset("tiny", vocab_size=260))  # smaller than the tokenizer: a mismatch
    small.init_weights(0)
    save_checkpoint(small, root / "small", tokenizer_dir=root / "tok")
    return root


def _greedy_ids(ckpt, prompt, n):
    model, tok = api.load(ckpt / "ck")
    return generate_ids(model, [tok.encode(prompt)], n, SamplingParams(temperature=0), stop_ids=[tok.eos_id],
                        vocab_limit=tok.vocab_size)[0]


def test_generate_streams_greedy_text(ckpt, capsys):
    assert cli.main(["generate", "--checkpoint", str(ckpt / "ck"), "--prompt", "hello", "--temperature", "0",
                     "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr()
    tok = Tokenizer.load(ckpt / "tok")
    ids = [i for i in _greedy_ids(ckpt, "hello", 12) if i != tok.eos_id]
    assert out.out == tok.decode(ids) + "\n"
    assert "tok/s" in out.err


def test_python_api_samples_and_seed(ckpt):
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=20, seed=3)
    a = api.generate(str(ckpt / "ck"), ["hello", "the quick"], num_samples=2, **kw)
    assert len(a) == 4 and a == api.generate(str(ckpt / "ck"), ["hello", "the quick"], num_samples=2, **kw)
    import ember

    assert ember.generate(str(ckpt / "ck"), "hello", **kw) == api.generate(str(ckpt / "ck"), "hello", **kw)
    # a model object with a tokenizer path (or object) gives the same text
    model, tok = api.load(ckpt / "ck")
    assert api.generate(model, "hello", tokenizer=str(ckpt / "tok"), **kw) == api.generate(str(ckpt / "ck"), "hello", **kw)
    assert api.generate(model, "hello", tokenizer=tok, **kw) == api.generate(str(ckpt / "ck"), "hello", **kw)
    with pytest.raises(EmberError, match="tokenizer"):
        api.generate(model, "hello")


def test_stop_strings_cut_the_text(ckpt):
    full = api.generate(str(ckpt / "ck"), "once", max_new_tokens=30, temperature=0)[0]
    assert len(full) > 6
    stop = full[3:6]
    cut = api.generate(str(ckpt / "ck"), "once", max_new_tokens=30, temperature=0, stop=[stop])[0]
    assert cut == full[: full.index(stop)]


def test_prompt_file_batches_match_one_by_one(ckpt, tmp_path):
    prompts = ["hello", "the quick brown fox", "once upon", "a"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n\n")
    for name in ("p.jsonl", "p.txt"):
        out = tmp_path / (name + ".out.jsonl")
        assert cli.main(["generate", "--checkpoint", str(ckpt / "ck"), "--prompt-file", str(tmp_path / name),
                         "--temperature", "0", "--max-new-tokens", "8", "--batch-size", "3", "--out", str(out)]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["prompt"] for r in rows] == prompts
        single = [api.generate(str(ckpt / "ck"), p, max_new_tokens=8, temperature=0)[0] for p in prompts]
        assert [r["completion"] for r in rows] == single


def test_batched_printout_per_prompt(ckpt, capsys):
    assert cli.main(["generate", "--checkpoint", str(ckpt / "ck"), "--prompt", "hi", "--num-samples", "2",
                     "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "=== prompt 0, sample 0 ===" in out and "=== prompt 0, sample 1 ===" in out


def test_context_window_errors_truncation_and_clamping(ckpt, capsys):
    long = "hello world " * 40  # far more than the 64-token context
    with pytest.raises(EmberError, match="--truncate"):
        api.generate(str(ckpt / "ck"), long, max_new_tokens=5)
    assert cli.main(["generate", "--checkpoint", str(ckpt / "ck"), "--prompt", long, "--max-new-tokens", "5"]) == 1
    assert "--truncate" in capsys.readouterr().err
    capsys.readouterr()
    assert len(api.generate(str(ckpt / "ck"), long, max_new_tokens=5, truncate=True)) == 1
    err = capsys.readouterr().err
    n = len(api.load(str(ckpt / "ck"))[1].encode(long))
    assert f"--truncate cut its first {n - 59} of {n} tokens (kept the last 59" in err
    # max_new_tokens beyond the window: clamped with a warning
    api.generate(str(ckpt / "ck"), "hello", max_new_tokens=500, temperature=0)
    assert "exceeds the context window" in capsys.readouterr().err


def test_empty_prompt_samples_unconditionally(ckpt):
    """An empty prompt starts from the EOS id (the document separator): the same text as that token."""
    model, tok = api.load(str(ckpt / "ck"))
    out = api.generate(str(ckpt / "ck"), "", max_new_tokens=6, temperature=1.0, top_k=None, seed=3)
    ref = api.generate_texts(model, tok, [[tok.eos_id]], 6, api.SamplingParams(1.0, None), (), (),
                             torch.Generator().manual_seed(3), None, 8)
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)
    assert out == ref and out[0]  # the same sample as from [EOS], and not empty


def test_bad_checkpoint_tokenizer_and_prompt_file(ckpt, tmp_path, capsys):
    with pytest.raises(CheckpointError):
        api.generate(str(tmp_path / "missing"), "hi")
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "hi"]) == 1
    assert "missing" in capsys.readouterr().err
    with pytest.raises(EmberError, match="tokenizer vocab_size 300 > model vocab_size 260"):
        api.generate(str(ckpt / "small"), "hi")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert cli.main(["generate", "--checkpoint", str(ckpt / "ck"), "--prompt-file", str(tmp_path / "bad.jsonl")]) == 1
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert cli.main(["generate", "--checkpoint", str(ckpt / "ck")]) == 1  # neither --prompt nor --prompt-file
    assert cli.main(["generate", "--checkpoint", str(ckpt / "ck"), "--prompt", "x", "--top-p", "0"]) == 1


# ------------------------------------------------------------------------------------------- chat
def test_chat_with_piped_stdin(ckpt):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stdin = "hello\n/system be brief\nwhat now?\n/reset\n/bogus\n\nhi again\n"  # ends with EOF (Ctrl-D)
    r = subprocess.run([sys.executable, "-m", "ember", "chat", "--checkpoint", str(ckpt / "ck"),
                        "--max-new-tokens", "6"], input=stdin, capture_output=True, text=True, timeout=120,
                       cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") >= 7 and "Traceback" not in r.stderr
    assert "[cut: 6 tokens, the limit of --max-new-tokens]" in r.stdout  # a 6-token reply rarely ends by itself
    for msg in ("system prompt set", "conversation cleared", "unknown command '/bogus'"):
        assert msg in r.stderr


def test_chat_ctrl_c_ends_the_reply_not_the_session(ckpt, monkeypatch, capsys):
    from ember.infer import text as text_mod

    lines = iter(["first", "second", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    pushes = {"n": 0}
    real_push = text_mod.TextStream.push

    def push(self, token):
        pushes["n"] += 1
        if pushes["n"] == 3:  # Ctrl-C in the middle of the first reply
            raise KeyboardInterrupt
        return real_push(self, token)

    monkeypatch.setattr(text_mod.TextStream, "push", push)
    assert cli.main(["chat", "--checkpoint", str(ckpt / "ck"), "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "[stopped]" in out and pushes["n"] > 3  # the second message still got a reply


def test_chat_history_drops_oldest_turns_keeps_system(ckpt):
    from ember.recipes.chat import encode_chat, fit_history

    tok = Tokenizer.load(ckpt / "tok")
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"question {i} hello world"},
                    {"role": "assistant", "content": f"answer {i} the quick brown fox"}]
    history.append({"role": "user", "content": "last one"})
    ids, dropped = fit_history(tok, "be nice", history, budget=60)
    assert len(ids) <= 60 and dropped > 0 and dropped % 2 == 0
    assert history[0]["role"] == "user" and history[-1]["content"] == "last one"
    assert ids == encode_chat(tok, [{"role": "system", "content": "be nice"}] + history)
    with pytest.raises(EmberError, match="shorter"):
        fit_history(tok, "be nice", [{"role": "user", "content": "x " * 200}], budget=60)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_without_cuda_blames_the_device_not_the_checkpoint(ckpt, capsys):
    for device, msg in (("cuda", "CUDA is not available on this machine"), ("tpu", "device='tpu'"),
                        ("cuda:x", "not a device")):
        assert cli.main(["generate", "--checkpoint", str(ckpt / "ck"), "--prompt", "hi", "--device", device]) == 1
        err = capsys.readouterr().err
        assert msg in err and "safetensors" not in err and "Traceback" not in err


def test_unwritable_out_fails_before_generating(ckpt, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert cli.main(["generate", "--checkpoint", str(ckpt / "ck"), "--prompt", "hi", "--out",
                     str(blocker / "out.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err and "Traceback" not in err
