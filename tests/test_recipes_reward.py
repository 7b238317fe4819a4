"""Reward models: Bradley-Terry loss == its formula on the pooled scores, the score is read at the last real
token (never padding), `ember reward train / score` end to end with head kind "reward"."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from ember.cli import main as cli
from ember.data.pref import reward_batch
from ember.models import Transformer, preset
from ember.train.loss import RewardConfig, RewardLoss, pooled_logits


def _pairs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda k: [int(t) for t in torch.randint(5, 500, (k,), generator=g)]  # noqa: E731
    return [((mk(4 + i), None), (mk(7 - i), None)) for i in range(n)]


def test_bradley_terry_loss_and_real_token_pooling():
    m = Transformer(preset("tiny-llama"), n_out=1)
    m.init_weights(0)
    m.eval()
    batch = reward_batch(_pairs(), pad_id=0)
    cfg = RewardConfig(margin=0.5, center=0.01)
    with torch.no_grad():
        out = RewardLoss(cfg)(m, batch)
        rc = pooled_logits(m, {"input_ids": batch["chosen_ids"], "last": batch["chosen_last"]}).squeeze(-1)
        rr = pooled_logits(m, {"input_ids": batch["rejected_ids"], "last": batch["rejected_last"]}).squeeze(-1)
        ref = (-F.logsigmoid(rc - rr - 0.5) + 0.01 * (rc + rr) ** 2).sum()
        torch.testing.assert_close(out.loss, ref)
        assert out.weight == 3 and float(out.metrics["accuracy"]) == float((rc > rr).sum())
        other = reward_batch(_pairs(), pad_id=9)  # the padding token never matters
        torch.testing.assert_close(RewardLoss(cfg)(m, other).loss, out.loss, rtol=0, atol=0)


def test_reward_train_and_score(pref_base, tmp_path, capsys):
    base = pref_base
    from ember.io.checkpoint import load_checkpoint

    run = tmp_path / "rm"
    assert cli(["reward", "train", "--checkpoint", str(base / "base"), "--data.path", str(base / "pairs.jsonl"),
                "--run-dir", str(run), "--train.max-steps", "12", "--train.batch-size", "4", "--train.lr", "3e-3",
                "--train.warmup-steps", "1", "--train.eval-every", "6", "--train.eval-batches", "2",
                "--train.log-every", "2", "--train.save-every", "0", "--data.max-length", "64", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "final reward model" in out
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in recs if r["split"] == "val"]
    assert val[-1]["accuracy"] == 1.0 and val[-1]["margin"] > 0  # an easy pattern: learned
    model, meta = load_checkpoint(run / "final", kinds=("reward",))
    assert meta["head"] == {"kind": "reward"} and model.output.weight.shape == (1, model.cfg.n_embd)
    assert cli(["reward", "score", "--checkpoint", str(run / "final"), "--prompt", "Is the sky blue?",
                "--completion", "Yes, it is blue.", "--json"]) == 0
    good = json.loads(capsys.readouterr().out)["score"]
    assert cli(["reward", "score", "--checkpoint", str(run / "final"), "--prompt", "Is the sky blue?",
                "--completion", "No, it is green."]) == 0
    bad = float(capsys.readouterr().out)
    assert good > bad
    assert cli(["generate", "--checkpoint", str(run / "final"), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "holds a reward head" in err and "ember reward score" in err
