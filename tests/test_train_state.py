"""ember.train.state: checkpoint layout, pruning, RNG round trip, errors, and 2-process FSDP2 -> 1-process loads."""

import json
import lzma
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from ember.errors import EmberError
from ember.models import Transformer, preset
from ember.train import state
from ember.train.optim import build_optimizer


def _model_opt(seed=0):
    model = Transformer(preset("tiny"))
    model.init_weights(seed)
    opt = build_optimizer(model, 1e-3)
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(seed))
    model(x).logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def test_save_load_prune_and_layout(tmp_path):
    model, opt = _model_opt()
    for step in (1, 2, 3):
        path = state.save_train_state(tmp_path, step, model, opt, model_config=model.cfg.to_dict(), keep_last=2)
    assert [p.name for p in state.list_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]
    assert state.latest_checkpoint(tmp_path) == path
    assert {p.name for p in path.iterdir()} == {"dcp", "trainer.json", "rank_00000.pt"}
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temp dirs left
    model2, opt2 = _model_opt(seed=1)
    meta = state.load_train_state(path, model2, opt2)
    assert meta["step"] == 3 and model2.output.weight is model2.tok_embeddings.weight
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)


def test_interrupted_save_is_not_listed(tmp_path):
    (tmp_path / "checkpoints" / ".step_0000009.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_0000008").mkdir()  # no trainer.json: incomplete
    assert state.latest_checkpoint(tmp_path) is None


def test_rng_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    saved = state.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    state.set_rng_state(saved)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_not_a_checkpoint_is_clear_error(tmp_path):
    with pytest.raises(EmberError, match="trainer.json"):
        state.read_trainer_meta(tmp_path)
    (tmp_path / "trainer.json").write_text("{oops")
    with pytest.raises(EmberError, match="not valid JSON"):
        state.read_trainer_meta(tmp_path)


def _worker_with_rank(parent: int, rank: int):
    """The pid of the torchrun worker with RANK=rank among the descendants of `parent` (Linux /proc)."""
    todo, seen = [parent], set()
    while todo:
        pid = todo.pop()
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for kid in map(int, kids):
            if kid in seen:
                continue
            seen.add(kid)
            try:
                env = Path(f"/proc/{kid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
                return kid
            todo.append(kid)
    return None


@pytest.mark.slow
def test_fsdp2_two_process_resume_and_load_into_one(tmp_path):
    """`ember pretrain --nproc-per-node 2` (FSDP2, gloo): resuming from step 4 gives the straight run's losses;
    the sharded checkpoint loads into 1 process (export and load_train_state) with the 2-process final weights."""
    from ember.cli import main as cli
    from ember.data.bundled import ASSETS
    from ember.data.pipeline import PrepareConfig, prepare
    from ember.io.checkpoint import load_checkpoint

    lines = lzma.open(ASSETS / "tinyshakespeare.jsonl.xz", "rt").read().splitlines()[:40]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    data = tmp_path / "data"
    prepare(PrepareConfig(input=[str(tmp_path / "in.jsonl")], out=str(data), vocab_size=384, num_proc=1,
                          progress=False))

    def args(run, *extra):
        return ["pretrain", "--model-preset", "tiny", "--data.data-dir", str(data), "--data.block-size", "32",
                "--run-dir", str(run), "--nproc-per-node", "2", "--parallel.data-parallel", "fsdp",
                "--train.batch-size", "2", "--train.max-steps", "8", "--train.warmup-steps", "2",
                "--train.eval-every", "0", "--train.log-every", "1", "--train.save-every", "4",
                "--samples.num", "0", "--device", "cpu", *extra]

    assert cli(args(tmp_path / "a")) == 0  # 8 steps, checkpoints at 4 and 8
    assert cli(args(tmp_path / "b", "--resume-from", str(tmp_path / "a" / "checkpoints" / "step_0000004"))) == 0

    def losses(run):
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in recs if r["split"] == "train"}

    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [lb[s] for s in range(5, 9)] == [la[s] for s in range(5, 9)]

    # SIGTERM to ONE rank mid-run: every rank stops after the same step and saves; --resume continues exactly
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, "-m", "ember", *args(run, "--train.save-every", "0")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, worker = time.time() + 120, None
    while time.time() < deadline and proc.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            worker = _worker_with_rank(proc.pid, 1)
            if worker is not None:
                break
        time.sleep(0.05)
    assert worker is not None, "rank 1 not found"
    os.kill(worker, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert "SIGTERM: saved step" in out, out
    stopped = state.latest_checkpoint(run)
    assert stopped is not None and len(list(stopped.glob("rank_*.pt"))) == 2
    assert cli(args(run, "--resume")) == 0
    lc = losses(run)
    assert [lc[s] for s in range(1, 9)] == [la[s] for s in range(1, 9)]
    final, _ = load_checkpoint(tmp_path / "a" / "final")
    ckpt = state.latest_checkpoint(tmp_path / "a")
    assert ckpt.name == "step_0000008" and len(list(ckpt.glob("rank_*.pt"))) == 2
    state.export_to_safetensors(ckpt, tmp_path / "exported")
    exported, _ = load_checkpoint(tmp_path / "exported")
    one = Transformer(final.cfg)
    one.init_weights(123)
    opt = build_optimizer(one, 1e-3)
    state.load_train_state(ckpt, one, opt, dp_size=1)  # 2 -> 1: resharded (warns that data order restarts)
    for (n, a), (_, b), (_, c) in zip(final.state_dict().items(), exported.state_dict().items(),
                                      one.state_dict().items()):
        assert torch.equal(a, b) and torch.equal(a, c), n



def test_disk_full_during_save_is_clear_and_leaves_no_tmp(tmp_path, monkeypatch):
    import errno

    from ember.io import checkpoint as plain

    model, opt = _model_opt()
    good = state.save_train_state(tmp_path, 1, model, opt, model_config=model.cfg.to_dict())
    real_save = torch.save

    def full(obj, f, *a, **k):
        if str(f).endswith(".pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(EmberError, match=r"step_0000002: could not write the checkpoint \(No space left on device\)"):
        state.save_train_state(tmp_path, 2, model, opt, model_config=model.cfg.to_dict())
    monkeypatch.undo()
    assert state.list_checkpoints(tmp_path) == [good] and not list((tmp_path / "checkpoints").glob(".*"))

    plain.save_checkpoint(model, tmp_path / "final")
    before = (tmp_path / "final" / "model.safetensors").read_bytes()

    def full_file(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_file)
    with pytest.raises(EmberError, match="No space left on device.*nothing there was replaced"):
        plain.save_checkpoint(model, tmp_path / "final")
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "final"]


def test_huge_block_size_in_ember_json_is_a_clear_error(tmp_path):
    from ember.io import checkpoint as plain

    model, _ = _model_opt()
    plain.save_checkpoint(model, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "ember.json").read_text())
    meta["model"]["block_size"] = 10 ** 12
    (tmp_path / "ck" / "ember.json").write_text(json.dumps(meta))
    with pytest.raises(EmberError, match=r"ember.json: 'model' is not a valid ModelConfig \(block_size=1000000000000"):
        plain.load_checkpoint(tmp_path / "ck")
