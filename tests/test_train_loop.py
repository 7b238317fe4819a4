"""ember.train.loop: golden losses, gradient accumulation, NaN handling, and exact resume through `ember pretrain`."""

import json
import math
from pathlib import Path

import pytest
import torch

from ember.models import Transformer, preset
from ember.train.loop import NonFiniteLoss, TrainConfig, Trainer
from ember.train.loss import IGNORE_INDEX, LMLoss, LossConfig, LossOutput
from ember.train.optim import build_optimizer, build_scheduler


class SyntheticLoader:
    """Deterministic (inputs, targets) batches: sample i is a fixed pseudo-random sequence with a learnable
    pattern (every odd token is a function of the one before). Batch k of size B = samples kB .. kB+B-1,
    so two batches of B/2 equal one batch of B."""

    def __init__(self, batch_size=4, block_size=32, vocab=512, seed=0):
        self.B, self.T, self.V, self.seed, self.i = batch_size, block_size, vocab, seed, 0

    def sample(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        x = torch.randint(0, self.V, (self.T + 1,), generator=g)
        x[1::2] = (x[0::2][: len(x[1::2])] * 7 + 3) % self.V
        return x

    def next_batch(self):
        rows = torch.stack([self.sample(self.i + b) for b in range(self.B)])
        self.i += self.B
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, sd):
        self.i = sd["i"]


def make_trainer(tmp_path=None, batch_size=4, accum=1, fused_loss=True, loader=None, loss_fn=None, **train_kw):
    cfg = TrainConfig(**{**dict(max_steps=5, batch_size=batch_size, grad_accum_steps=accum, lr=3e-3, warmup_steps=2,
                                eval_every=0, eval_batches=2, log_every=100, seed=0), **train_kw})
    model = Transformer(preset("tiny"))
    model.init_weights(cfg.seed)
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)
    sched = build_scheduler(opt, cfg)
    return Trainer(model, opt, sched, loader or SyntheticLoader(batch_size), SyntheticLoader(batch_size, seed=1), cfg,
                   run_dir=tmp_path, loss_fn=loss_fn or LMLoss(LossConfig(fused=fused_loss)))


# Recorded once with torch 2.13.0+cpu (fp32, 1 thread or 2 gives the same to 1e-4). To regenerate after an
# intended numerics change: `python -c "from tests.test_train_loop import *; print(make_trainer().fit()['losses'])"`
GOLDEN = [6.253922462463379, 6.268247604370117, 6.2136383056640625, 6.250552654266357, 6.222886562347412]


def test_golden_losses_tiny():
    losses = make_trainer().fit()["losses"]
    assert losses == pytest.approx(GOLDEN, abs=1e-4)


def _steps_with_grads(**trainers):
    """One train_step of each trainer, with the gradients each had when its optimizer stepped."""
    grads = {}
    for name, tr in trainers.items():
        step = tr.optimizer.step

        def record(*a, _tr=tr, _name=name, _step=step, **k):
            grads[_name] = [p.grad.clone() for p in _tr.model.parameters()]
            return _step(*a, **k)

        tr.optimizer.step = record
    return [tr.train_step() for tr in trainers.values()], grads


@pytest.mark.parametrize("fused", [False, True], ids=["plain-loss", "fused-loss"])
def test_grad_accumulation_equals_full_batch(fused):
    # Adam's first update is ~lr * sign(grad), so fp32 summation-order noise in tiny gradients shows up
    # as ~1e-3 * lr in the parameters: a small lr keeps the comparison at 1e-6. The fused loss sums the
    # head's gradient over row chunks whose boundaries differ between B=4 and 2 x B=2, so for it the
    # gradients are compared (1e-7) but not the parameters after Adam's sign-like first step.
    # (lr 1e-4: a gradient near Adam's eps, ~2e-8 here, turns a 1% summation-order difference into
    # ~3e-3 * lr of update difference, so 5e-4 exceeded 1e-6)
    kw = dict(max_steps=1, lr=1e-4, warmup_steps=0, fused_loss=fused)
    full = make_trainer(batch_size=4, accum=1, **kw)
    acc = make_trainer(batch_size=2, accum=2, **kw)
    (r_full, r_acc), grads = _steps_with_grads(full=full, acc=acc)
    assert r_full["loss"] == pytest.approx(r_acc["loss"], abs=1e-6)
    assert r_full["grad_norm"] == pytest.approx(r_acc["grad_norm"], rel=1e-5)
    for a, b in zip(grads["full"], grads["acc"]):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)
    if fused:
        return
    for (name, a), (_, b) in zip(full.model.named_parameters(), acc.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name


class MaskedLoader(SyntheticLoader):
    """SyntheticLoader whose targets are -100 on an uneven, sample-dependent prefix (prompt-masked SFT)."""

    def next_batch(self):
        start = self.i
        x, y = super().next_batch()
        for b in range(len(y)):
            y[b, : (7 * (start + b)) % (self.T - 2)] = IGNORE_INDEX
        return x, y


@pytest.mark.parametrize("fused", [False, True], ids=["plain-loss", "fused-loss"])
def test_uneven_masks_under_accumulation_equal_one_big_batch(fused):
    """Micro-batches with different numbers of valid targets weigh what they hold: 2 x B=2 == 1 x B=4."""
    kw = dict(max_steps=1, lr=1e-4, warmup_steps=0, fused_loss=fused)
    full = make_trainer(batch_size=4, accum=1, loader=MaskedLoader(4), **kw)
    acc = make_trainer(batch_size=2, accum=2, loader=MaskedLoader(2), **kw)
    x, y = MaskedLoader(4).next_batch()
    counts = [(y[:2] != IGNORE_INDEX).sum().item(), (y[2:] != IGNORE_INDEX).sum().item()]
    assert counts[0] != counts[1]  # the case the old per-micro-batch mean got wrong
    (r_full, r_acc), grads = _steps_with_grads(full=full, acc=acc)
    assert r_full["loss"] == pytest.approx(r_acc["loss"], rel=1e-6)  # fp32 sums of ~600 nats
    for a, b in zip(grads["full"], grads["acc"]):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)
    # the old normalisation (mean of each micro-batch, divided by the number of micro-batches) differs
    model = Transformer(preset("tiny"))
    model.init_weights(0)
    lm = LMLoss(LossConfig(fused=fused))
    old = sum(lm(model, (x[i:i + 2], y[i:i + 2])).loss / c / 2 for i, c in zip((0, 2), counts))
    new = lm(model, (x, y)).loss / sum(counts)
    assert abs(old.item() - new.item()) > 1e-3


class PairLoss:
    """A DPO-shaped objective over dict batches: units are pairs; metrics are summed per pair."""

    def weight(self, batch):
        return float(batch["chosen"].shape[0])

    def __call__(self, model, batch):
        def logp(ids):
            return -torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten(),
                                                      reduction="none").view(len(ids), -1).sum(-1)

        margin = logp(batch["chosen"]) - logp(batch["rejected"])  # (pairs,)
        loss = -torch.nn.functional.logsigmoid(0.1 * margin)
        return LossOutput(loss.sum(), self.weight(batch), {"accuracy": (margin > 0).float().sum(),
                                                            "margin": margin.detach().sum()})


class PairLoader:
    def __init__(self, batch_size, seed=0):
        self.B, self.i, self.seed = batch_size, 0, seed

    def next_batch(self):
        g = torch.Generator().manual_seed(self.seed * 7919 + self.i)
        self.i += 1
        return {"chosen": torch.randint(0, 512, (self.B, 12), generator=g),
                "rejected": torch.randint(0, 512, (self.B, 12), generator=g)}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, sd):
        self.i = sd["i"]


def test_dict_batch_objective_and_frozen_model(tmp_path):
    """A preference-style loss over dict batches trains through the Trainer; a frozen model given as
    `frozen=` stays unchanged, in eval mode, out of the optimizer and out of the checkpoint."""
    cfg = TrainConfig(max_steps=3, batch_size=2, grad_accum_steps=2, lr=1e-3, warmup_steps=0, eval_every=0,
                      eval_batches=2, log_every=1)
    model = Transformer(preset("tiny", dropout=0.1))
    model.init_weights(0)
    ref = Transformer(preset("tiny", dropout=0.1))
    ref.init_weights(0)
    ref.train()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    opt = build_optimizer(model, cfg.lr)
    tr = Trainer(model, opt, build_scheduler(opt, cfg), PairLoader(2), PairLoader(2, seed=1), cfg,
                 loss_fn=PairLoss(), frozen={"reference": ref}, run_dir=tmp_path)
    out = tr.train_step()
    assert {"loss", "accuracy", "margin"} <= set(out) and 0 <= out["accuracy"] <= 1
    assert not ref.training and all(not p.requires_grad for p in ref.parameters())
    tr.fit()
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    ev = tr.evaluate()
    assert set(ev) == {"loss", "accuracy", "margin"}  # no perplexity: that is an LM metric
    path = tr.save()
    from ember.io.safe import load_dcp_metadata

    keys = load_dcp_metadata(path / "dcp" / ".metadata").state_dict_metadata
    assert any(k.startswith("model.") for k in keys)
    n_model = sum(1 for k in keys if k.startswith("model."))
    assert n_model == len(model.state_dict())  # the policy only; the reference is not saved
    with pytest.raises(Exception, match="shares parameters"):
        Trainer(model, opt, build_scheduler(opt, cfg), PairLoader(2), None, cfg, loss_fn=PairLoss(),
                frozen={"oops": model})


def _nan_after(step_to_fail):
    calls = {"n": 0}
    lm = LMLoss()

    def loss_fn(model, batch):
        calls["n"] += 1
        out = lm(model, batch)
        return LossOutput(out.loss * float("nan") if calls["n"] == step_to_fail else out.loss, out.weight)

    return loss_fn


def test_nan_stop_names_the_step():
    tr = make_trainer(on_nan="stop")
    tr.loss_fn = _nan_after(3)
    with pytest.raises(NonFiniteLoss, match=r"step 3: loss=nan.*HINT: lower --train.lr"):
        tr.fit()
    assert tr.step == 2


def test_nan_skip_skips_the_update():
    tr = make_trainer(on_nan="skip")
    tr.loss_fn = _nan_after(3)
    tr.train_step(), tr.train_step()
    before = [p.detach().clone() for p in tr.model.parameters()]
    out = tr.train_step()
    assert out["skipped"] and tr.skipped == 1 and tr.step == 3
    for a, b in zip(before, tr.model.parameters()):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in tr.model.parameters())
    assert math.isfinite(tr.train_step()["loss"])  # training goes on


def test_nan_skip_gives_up_after_max_consecutive():
    tr = make_trainer(on_nan="skip", max_consecutive_skips=2)
    tr.loss_fn = lambda m, b: LossOutput(LMLoss()(m, b).loss * float("nan"), LMLoss().weight(b))
    with pytest.raises(NonFiniteLoss, match="in a row"):
        tr.fit()


def test_huge_lr_is_caught():
    tr = make_trainer(lr=1e12, warmup_steps=0, grad_clip=0.0, max_steps=20, on_nan="stop")
    with pytest.raises(NonFiniteLoss, match=r"step \d+"):
        tr.fit()


def test_eval_is_deterministic_and_metrics_written(tmp_path):
    tr = make_trainer(tmp_path, max_steps=4, log_every=2, eval_every=2)
    tr.fit()
    a, b = tr.evaluate(), tr.evaluate()
    assert a == b and a["ppl"] == pytest.approx(math.exp(a["loss"]))
    tr.close()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "eta_s", "elapsed_s"} <= set(train[0])
    assert [r["step"] for r in recs if r["split"] == "val"] == [2]


def test_trainer_checkpoint_resume_exact(tmp_path):
    ref = make_trainer(max_steps=6).fit()["losses"]
    first = make_trainer(tmp_path, max_steps=6)
    first.fit(until=3)
    first.save()
    second = make_trainer(tmp_path, max_steps=6)
    from ember.train.state import latest_checkpoint

    second.resume(latest_checkpoint(tmp_path))
    assert second.step == 3
    assert second.fit()["losses"] == ref[3:]


# ----------------------------------------------------------------------------- through `ember pretrain`
def _train_losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["split"] == "train"}


def test_pretrain_resume_is_exact(tiny_data, tmp_path):
    """20 steps straight == 10 steps, stop, `--resume`, 10 more: identical losses (dropout on, so RNG matters)."""
    from ember.cli import main as cli

    def args(run, *extra):
        return ["pretrain", "--model-preset", "tiny", "--model.dropout", "0.1", "--data.data-dir", str(tiny_data),
                "--data.block-size", "32", "--run-dir", str(run), "--train.batch-size", "2", "--train.max-steps", "20",
                "--train.warmup-steps", "3", "--train.eval-every", "0", "--train.log-every", "1",
                "--train.save-every", "5", "--samples.num", "0", "--device", "cpu", *extra]

    assert cli(args(tmp_path / "straight")) == 0
    assert cli(args(tmp_path / "resumed", "--stop-at", "10")) == 0
    assert not (tmp_path / "resumed" / "final").exists()
    assert cli(args(tmp_path / "resumed", "--resume")) == 0
    straight, resumed = _train_losses(tmp_path / "straight"), _train_losses(tmp_path / "resumed")
    assert sorted(straight) == sorted(resumed) == list(range(1, 21))
    assert [resumed[s] for s in range(11, 21)] == [straight[s] for s in range(11, 21)]
    r1 = json.loads((tmp_path / "straight" / "result.json").read_text())
    r2 = json.loads((tmp_path / "resumed" / "result.json").read_text())
    assert r1["val_loss"] == r2["val_loss"] and r1["tokens_seen"] == r2["tokens_seen"]

    # SIGTERM (cluster preemption) to a real `ember pretrain` process at some point mid-run
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "preempted"
    proc = subprocess.Popen([sys.executable, "-m", "ember", *args(run, "--train.save-every", "0")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "SIGTERM: saved step" in out and "Traceback" not in out
    stopped = max(_train_losses(run))
    assert stopped < 20 and (run / "checkpoints" / f"step_{stopped:07d}").is_dir()
    assert cli(args(run, "--resume")) == 0
    preempted = _train_losses(run)
    assert [preempted[s] for s in range(1, 21)] == [straight[s] for s in range(1, 21)]


def test_signal_mid_step_stops_at_the_boundary_and_resumes_exactly(tmp_path):
    """SIGINT (or SIGTERM) delivered inside a step, after the loader moved on: the step finishes, fit stops
    after it, the checkpoint resumes to the uninterrupted losses (random step and micro-batch)."""
    import os
    import random
    import signal

    from ember.train.state import latest_checkpoint

    ref = make_trainer(max_steps=6, accum=2, batch_size=2).fit()["losses"]
    rng = random.Random(0)
    before = {s: signal.signal(s, h) for s, h in ((signal.SIGINT, signal.default_int_handler),
                                                   (signal.SIGTERM, signal.SIG_DFL))}  # as a terminal has them
    for sig in (signal.SIGINT, signal.SIGTERM):
        at_call = rng.randrange(2, 10)  # the loss_fn call (micro-batch) the signal lands in
        run = tmp_path / sig.name
        tr = make_trainer(run, max_steps=6, accum=2, batch_size=2)
        inner, calls = tr.loss_fn, {"n": 0}

        def interrupting(model, batch, _inner=inner, _calls=calls, _at=at_call, _sig=sig):
            _calls["n"] += 1
            if _calls["n"] == _at:
                os.kill(os.getpid(), _sig)
            return _inner(model, batch)

        interrupting.weight = inner.weight
        tr.loss_fn = interrupting
        summary = tr.fit()
        assert tr.stopped_by == sig and summary["stopped_by"] == sig
        assert tr.step == (at_call + 1) // 2 < 6  # the step in flight was completed, no further one
        tr.save()
        again = make_trainer(run, max_steps=6, accum=2, batch_size=2)
        again.resume(latest_checkpoint(run))
        assert summary["losses"] + again.fit()["losses"] == ref
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    for s, h in before.items():
        signal.signal(s, h)


def test_train_config_refuses_nonsense():
    for kw, msg in [(dict(max_steps=0), "train.max_steps=0"), (dict(lr=-1.0), "train.lr=-1.0"),
                    (dict(lr=float("nan")), "train.lr=nan"), (dict(grad_accum_steps=0), "grad_accum_steps=0"),
                    (dict(warmup_steps=-1), "warmup_steps=-1"), (dict(min_lr=1.0, lr=0.1), "min_lr=1.0"),
                    (dict(grad_clip=-1.0), "grad_clip"), (dict(weight_decay=-0.1), "weight_decay")]:
        with pytest.raises(ValueError, match=msg.replace(".", r"\.").replace("(", r"\(")):
            TrainConfig(**kw)
