"""GRPO: group advantages and the clipped objective == the formulas on a fixed rollout batch, zero-std
groups give zero advantage, `ember grpo` raises a reward on a tiny model and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from ember.cli import main as cli
from ember.train.loss import GRPOConfig, GRPOLoss, group_advantages, token_logps


def test_group_advantages_and_zero_std_groups():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(r, 4, eps=1e-4)
    g = r[:4]
    ref = (g - g.mean()) / (g.std() + 1e-4)  # unbiased std, as TRL
    torch.testing.assert_close(adv[:4], ref)
    assert torch.equal(adv[4:], torch.zeros(4))  # all equal rewards: nothing to learn from this group


@pytest.mark.parametrize("agg", ["token", "sequence"])
def test_grpo_loss_equals_the_formula(agg):
    from ember.models import Transformer, preset

    m = Transformer(preset("tiny"))
    m.init_weights(0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (4, 10), generator=g)
    labels = torch.full((4, 10), -100)
    labels[:, 4:] = torch.randint(0, 512, (4, 6), generator=g)
    labels[1, 8:] = -100
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75])
    with torch.no_grad():
        old = token_logps(m, ids, labels) + 0.3 * torch.randn(4, 10, generator=g) * (labels != -100)
    batch = {"input_ids": ids, "labels": labels, "advantages": adv, "old_logps": old}
    cfg = GRPOConfig(epsilon=0.2, aggregation=agg)
    out = GRPOLoss(cfg)(m, batch)
    logp = token_logps(m, ids, labels)
    mask = (labels != -100).float()
    ratio = (logp - old).exp()
    per_tok = -torch.minimum(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None]) * mask
    ref = per_tok.sum() if agg == "token" else (per_tok.sum(1) / mask.sum(1)).sum()
    torch.testing.assert_close(out.loss, ref)
    assert out.weight == (mask.sum() if agg == "token" else 4)
    fresh = GRPOLoss(GRPOConfig(aggregation="sequence"))(m, {**batch, "old_logps": None,
                                                              "advantages": adv - adv.mean()})
    assert abs(float(fresh.loss.detach())) < 1e-6  # ratio 1 and zero-mean advantages: the loss is 0 by construction


@pytest.fixture(scope="module")
def rl(tmp_path_factory, pref_base):
    root = tmp_path_factory.mktemp("rl")
    (root / "rewards.py").write_text(
        "def brevity(prompts, completions):\n"
        "    return [max(0.0, 1.0 - len(c) / 24) for c in completions]\n")
    (root / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in
                                                  ["Is the sky blue?", "What colour is grass?"] * 3) + "\n")
    return root, pref_base


def _args(root, base, run, *extra):
    return ["grpo", "--checkpoint", str(base / "base"), "--data.path", str(root / "prompts.jsonl"),
            "--reward", f"{root / 'rewards.py'}:brevity", "--run-dir", str(run), "--train.max-steps", "30",
            "--train.lr", "3e-3", "--data.max-new-tokens", "16", "--rl.group-size", "8", "--train.save-every", "15",
            "--device", "cpu", *extra]


def _metric(run, key):
    return [json.loads(x)[key] for x in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["split"] == "train"]


def test_grpo_raises_the_reward_and_resumes_exactly(rl, tmp_path, capsys):
    root, base = rl
    run = tmp_path / "g"
    assert cli(_args(root, base, run)) == 0
    assert "learning shows in the reward column" in capsys.readouterr().out
    rewards = _metric(run, "reward")
    assert sum(rewards[-10:]) / 10 > sum(rewards[:5]) / 5 + 0.1  # shorter answers, as the reward asks
    assert {"kl", "clip_fraction", "reward_std", "zero_std_groups", "completion_length"} <= set(
        json.loads((run / "metrics.jsonl").read_text().splitlines()[0]))
    assert len((run / "samples.jsonl").read_text().splitlines()) == 30 * 2 * 8
    resumed = tmp_path / "r"
    assert cli(_args(root, base, resumed, "--stop-at", "15")) == 0
    assert cli(_args(root, base, resumed, "--resume")) == 0
    assert _metric(resumed, "loss") == _metric(run, "loss")
    assert cli(_args(root, base, tmp_path / "x", "--reward", "nope.py:f")) == 1
    assert "nope.py not found" in capsys.readouterr().err


def test_gae_equals_a_reference_loop():
    from ember.train.loss import gae

    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    mask = torch.zeros(3, 7)
    mask[0, 2:6] = mask[1, 0:7] = mask[2, 4:5] = 1
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for b in range(3):
        idx = mask[b].nonzero().flatten().tolist()
        a_next = v_next = 0.0
        for t in reversed(idx):  # the textbook recursion over the completion tokens only
            delta = float(rewards[b, t]) + 0.9 * v_next - float(values[b, t])
            a_next = delta + 0.9 * 0.8 * a_next
            v_next = float(values[b, t])
            assert float(adv[b, t]) == pytest.approx(a_next, abs=1e-5)
            assert float(ret[b, t]) == pytest.approx(a_next + float(values[b, t]), abs=1e-5)
    assert torch.equal(adv * (1 - mask), torch.zeros_like(adv))


def test_ppo_mode_learns_and_exports_the_policy_only(rl, tmp_path):
    from ember.io.checkpoint import load_checkpoint

    root, base = rl
    run = tmp_path / "ppo"
    assert cli(_args(root, base, run, "--rl.algo", "ppo", "--rl.beta", "0.02")) == 0
    rewards = _metric(run, "reward")
    assert sum(rewards[-10:]) / 10 > sum(rewards[:5]) / 5 + 0.1
    assert "value_loss" in json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    model, _ = load_checkpoint(run / "final")  # a plain policy: the value head stayed behind
    assert not hasattr(model, "value_head")


@pytest.mark.slow
def test_grpo_on_two_processes(rl, tmp_path, capsys):
    """`ember grpo --nproc-per-node 2` (DDP, gloo): each rank rolls out its share of the prompts; the reward rises."""
    root, base = rl
    run = tmp_path / "two"
    assert cli(_args(root, base, run, "--nproc-per-node", "2", "--parallel.data-parallel", "ddp",
                     "--data.prompts-per-step", "1")) == 0
    rewards = _metric(run, "reward")
    assert len(rewards) == 30 and sum(rewards[-10:]) / 10 > sum(rewards[:5]) / 5
    assert (run / "samples.rank0.jsonl").is_file() and (run / "samples.rank1.jsonl").is_file()
    assert cli(_args(root, base, tmp_path / "f", "--nproc-per-node", "2")) != 0  # FSDP2 (the default): refused
