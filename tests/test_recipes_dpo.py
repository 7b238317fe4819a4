"""DPO: losses and rewards == the published formulas, completion log-probs == a direct log_softmax sum,
ln 2 at step 0, adapter-disabled reference == an explicit frozen copy, `ember dpo` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from ember.cli import main as cli
from ember.train.loss import DPOConfig, DPOLoss, dpo_losses, sequence_logps


def _reference_dpo(loss, beta, ls, pc, pr, rc, rr):
    """TRL <= 0.28's DPOTrainer.dpo_loss, written out (the test's trusted reference)."""
    logits = (pc - pr) - (rc - rr)
    if loss == "sigmoid":
        out = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    elif loss == "robust":
        out = (-F.logsigmoid(beta * logits) * (1 - ls) + F.logsigmoid(-beta * logits) * ls) / (1 - 2 * ls)
    elif loss == "hinge":
        out = torch.relu(1 - beta * logits)
    else:
        out = (logits - 1 / (2 * beta)) ** 2
    return out, beta * (pc - rc), beta * (pr - rr)


@pytest.mark.parametrize("loss,ls", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
def test_dpo_losses_equal_the_formulas(loss, ls):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-20 * torch.rand(6, generator=g, dtype=torch.float64) for _ in range(4))
    ours = dpo_losses(DPOConfig(beta=0.3, loss=loss, label_smoothing=ls), pc, pr, rc, rr)
    ref = _reference_dpo(loss, 0.3, ls, pc, pr, rc, rr)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    zero = dpo_losses(DPOConfig(), pc, pr, pc, pr)  # policy == reference: ln 2, rewards 0
    assert torch.allclose(zero[0], torch.full_like(zero[0], math.log(2))) and not zero[1].any() and not zero[2].any()


def test_sequence_logps_equal_a_direct_sum():
    from ember.models import Transformer, preset

    m = Transformer(preset("tiny"))
    m.init_weights(0)
    m.eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (3, 10), generator=g)
    labels = torch.randint(0, 512, (3, 10), generator=g)
    labels[0, :4] = labels[2, 7:] = -100
    with torch.no_grad():
        ours = sequence_logps(m, ids, labels)
        lp = m(ids).log_softmax(-1)
    ref = [sum(float(lp[b, t, labels[b, t]]) for t in range(10) if labels[b, t] != -100) for b in range(3)]
    torch.testing.assert_close(ours, torch.tensor(ref), rtol=1e-5, atol=1e-4)


def test_adapter_disabled_reference_equals_a_frozen_copy():
    from ember.models import Transformer, preset
    from ember.peft import LoRAConfig, apply_lora

    base = Transformer(preset("tiny-llama"))
    base.init_weights(0)
    policy = Transformer(base.cfg)
    policy.load_state_dict(base.state_dict())
    apply_lora(policy, LoRAConfig(r=4, targets=["all-linear"]))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    batch = {k: torch.randint(0, 512, (2, 12), generator=g) for k in ("chosen_ids", "rejected_ids")}
    batch |= {k: torch.randint(0, 512, (2, 12), generator=g) for k in ("chosen_labels", "rejected_labels")}
    a = DPOLoss(DPOConfig())(policy, batch)
    b = DPOLoss(DPOConfig(), reference=base.eval())(policy, batch)
    torch.testing.assert_close(a.loss, b.loss)
    for k in a.metrics:
        torch.testing.assert_close(a.metrics[k], b.metrics[k])
    assert abs(float(a.metrics["rewards/margins"])) > 1e-4  # the adapter moved the policy off the reference


@pytest.fixture(scope="module")
def base(pref_base):
    return pref_base


def _args(base, run, *extra):
    return ["dpo", "--checkpoint", str(base / "base"), "--data.path", str(base / "pairs.jsonl"), "--run-dir", str(run),
            "--train.max-steps", "8", "--train.batch-size", "4", "--train.warmup-steps", "1", "--train.lr", "5e-3",
            "--train.eval-every", "4", "--train.eval-batches", "2", "--train.log-every", "1", "--train.save-every", "4",
            "--data.max-length", "64", "--device", "cpu", *extra]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_dpo_end_to_end(base, tmp_path, capsys, mode):
    from ember.io.checkpoint import load_checkpoint

    extra = ["--lora.r", "4", "--lora.targets", "all-linear"] if mode == "lora" else ["--train.lr", "1e-3"]
    run = tmp_path / mode
    assert cli(_args(base, run, *extra)) == 0
    out = capsys.readouterr().out
    assert "step-0 check passed: loss 0.693147" in out  # dropout 0.1 in the checkpoint: turned off for DPO
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["split"] == "train"]
    keys = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"}
    assert keys <= set(train[0]) and keys <= set(next(r for r in recs if r["split"] == "val"))
    assert train[-1]["rewards/margins"] > train[0]["rewards/margins"] and train[-1]["loss"] < math.log(2)
    model, meta = load_checkpoint(run / "final")
    assert ("adapter" in meta) == (mode == "lora")


def test_dpo_resume_is_exact_and_bad_records(base, tmp_path, capsys):
    lora = ["--lora.r", "4", "--lora.targets", "all-linear"]
    straight, resumed = tmp_path / "s", tmp_path / "r"
    assert cli(_args(base, straight, *lora)) == 0
    assert cli(_args(base, resumed, *lora, "--stop-at", "4")) == 0
    assert cli(_args(base, resumed, *lora, "--resume")) == 0

    def losses(run):
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
                if json.loads(x)["split"] == "train"]

    assert losses(resumed) == losses(straight)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "hi", "chosen": "a"}\n')
    assert cli(_args(base, tmp_path / "b", "--data.path", str(tmp_path / "bad.jsonl"))) == 1
    assert "bad.jsonl:1: expected 'chosen' and 'rejected'" in capsys.readouterr().err


def test_step0_check_names_dropout():
    from ember.errors import EmberError
    from ember.models import Transformer, preset
    from ember.recipes.dpo import check_step0

    m = Transformer(preset("tiny", dropout=0.3))
    m.init_weights(0)
    ref = Transformer(preset("tiny"))
    ref.load_state_dict(m.state_dict())
    m.train()
    g = torch.Generator().manual_seed(0)
    batch = {k: torch.randint(0, 512, (2, 16), generator=g) for k in
             ("chosen_ids", "rejected_ids", "chosen_labels", "rejected_labels")}
    with pytest.raises(EmberError, match="step-0 check failed.*dropout is on"):
        check_step0(DPOLoss(DPOConfig(), ref.eval()), m, batch, DPOConfig(), ref)


@pytest.mark.slow
def test_dpo_two_processes_equal_one(base, tmp_path):
    """`ember dpo --nproc-per-node 2` (DDP, gloo), frozen reference: the losses of 1 process on the same global batch."""
    common = ["--train.eval-every", "0", "--train.save-every", "0", "--train.lr", "1e-3"]
    assert cli(_args(base, tmp_path / "one", *common, "--train.batch-size", "4")) == 0
    assert cli(_args(base, tmp_path / "two", *common, "--train.batch-size", "2", "--nproc-per-node", "2",
                     "--parallel.data-parallel", "ddp")) == 0

    def losses(run):
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
                if json.loads(x)["split"] == "train"]

    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)


def test_per_token_logps_equal_trls_selective_log_softmax():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    from ember.models import Transformer, preset
    from ember.train.loss import token_logps

    m = Transformer(preset("tiny-llama"))
    m.init_weights(0)
    m.eval()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 512, (2, 9), generator=g)
    labels = torch.randint(0, 512, (2, 9), generator=g)
    with torch.no_grad():
        ours = token_logps(m, ids, labels)
        theirs = trl_utils.selective_log_softmax(m(ids).float(), labels)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(m, ids, labels), theirs.sum(-1), rtol=1e-5, atol=1e-4)
