"""`ember plan` (parallel/plan.py): its memory arithmetic against what a built model holds and saves, its
verdicts against published runs, and the command line.

The multi-process checks (model state exact on every rank of 2, 4 and 8 gloo processes; activations of
tensor-parallel and FSDP2 ranks within 10%) ride on the launches of tests/test_parallel_layouts.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ember.errors import EmberError
from ember.models import Transformer, preset
from ember.parallel.ac import apply_activation_checkpointing
from ember.parallel.memory import SavedActivations, local_state_bytes
from ember.parallel.plan import (HARDWARE, PUBLISHED, Layout, activation_bytes, bubble, check_published,
                                 evaluate, in_flight, layouts, plan, rank_state_bytes)
from ember.train.loss import LMLoss, LossConfig

GiB = 2 ** 30


def _measure(cfg, ac: str, fused: bool, batch: int, seq: int) -> int:
    torch.manual_seed(0)
    model = Transformer(cfg)
    apply_activation_checkpointing(model, ac)
    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    y = torch.randint(0, cfg.vocab_size, (batch, seq))
    with SavedActivations(model) as saved:
        LMLoss(LossConfig(fused=fused))(model, (x, y))
    return saved.bytes


@pytest.mark.parametrize("name,over", [("tiny", {}), ("tiny-llama", {}),
                                       ("tiny-llama", {"n_embd": 128, "n_kv_head": 1, "tie_embeddings": True})])
@pytest.mark.parametrize("ac", ["none", "selective", "full"])
@pytest.mark.parametrize("fused", [False, True])
def test_activation_bytes_match_saved_tensors_on_one_process(name, over, ac, fused):
    """What autograd keeps after one forward (saved_tensors_hooks; selective AC's kept outputs too) ==
    the plan's formula, for GPT-2 and Llama blocks, each AC mode, the fused and the plain loss, and a
    batch large enough for the fused q/k/v projection and one below it."""
    cfg = dataclasses.replace(preset(name), **over)
    for batch, seq in ((4, 64), (1, 32)):
        measured = _measure(cfg, ac, fused, batch, seq)
        predicted = activation_bytes(cfg, Layout(ac=ac), batch, seq, fused_loss=fused)
        assert predicted == pytest.approx(measured, rel=0.10), (batch, seq)
        assert predicted == pytest.approx(measured, rel=0.01)  # in fact exact to the targets' copy


def test_ac_modes_order_and_selective_saves_less_than_none():
    cfg = preset("small")
    none, sel, full = (activation_bytes(cfg, Layout(ac=m), 4, 256) for m in ("none", "selective", "full"))
    assert full < sel < none


def test_model_state_bytes_equal_a_built_models_tensors_on_one_process():
    """fp32 parameters, gradients and AdamW state (exp_avg, exp_avg_sq, a 4-byte step per tensor)."""
    for name in ("tiny", "tiny-llama"):
        cfg = preset(name)
        model = Transformer(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randint(0, cfg.vocab_size, (2, 16))
        LMLoss()(model, (x, x)).loss.backward()
        opt.step()
        assert local_state_bytes(model.parameters(), opt) == rank_state_bytes(cfg, Layout())


def test_sharding_divides_state_and_tp_divides_blocks():
    cfg = preset("llama-3-8b")
    one = rank_state_bytes(cfg, Layout())
    fsdp8 = rank_state_bytes(cfg, Layout(dp_shard=8))
    assert fsdp8["parameters"] == pytest.approx(one["parameters"] / 8, rel=1e-3)
    tp8 = rank_state_bytes(cfg, Layout(tp=8))
    assert tp8["parameters"] == pytest.approx(one["parameters"] / 8, rel=1e-3)  # norms stay whole: a hair over
    assert tp8["parameters"] > one["parameters"] / 8
    # an untied embedding's gradient comes back whole under TP without FSDP2 (torch's sharded embedding)
    assert tp8["gradients"] - tp8["parameters"] == 4 * cfg.vocab_size * cfg.n_embd * 7 // 8


def test_pipeline_schedules_in_flight_and_bubble():
    lay = Layout(pp=4, pp_schedule="1f1b")
    assert [in_flight(lay, 8, r) for r in range(4)] == [4, 3, 2, 1]
    assert in_flight(dataclasses.replace(lay, pp_schedule="gpipe"), 8) == 8
    assert bubble(lay, 8) == pytest.approx(3 / 8)
    assert bubble(dataclasses.replace(lay, pp_schedule="interleaved-1f1b", pp_virtual_stages=2), 8) == pytest.approx(3 / 16)
    assert bubble(dataclasses.replace(lay, pp_schedule="zbv"), 8) == 0


def test_every_published_run_gets_the_verdict_its_authors_saw():
    """Megatron-LM's GPT-3 175B (TP 8 x PP 8 on 1,024 A100s) and torchtitan's Llama 3 8B / 70B / 405B
    layouts fit; 70B with data parallelism only (or FSDP on one node) on 8 x 80 GB and 405B with 1-D
    FSDP on 128 H100s do not."""
    checks = check_published()
    assert len(checks) == len(PUBLISHED) >= 7
    for c in checks:
        assert c["agrees"], (c["run"].name, c["row"].memory["total"] / GiB)
    by = {c["run"].name: c for c in checks}
    # torchtitan's measured 82.4 GiB for Llama 3.1 8B (FSDP 8, local batch 2, selective AC) within 10%
    assert by["torchtitan Llama 3.1 8B"]["row"].memory["total"] / GiB == pytest.approx(82.4, rel=0.10)
    # throughputs within a factor of 1.6 at the default efficiency
    for c in checks:
        if c["run"].tokens_per_gpu_s:
            assert 1 / 1.6 < c["tokens_per_gpu_s"] / c["run"].tokens_per_gpu_s < 1.6, c["run"].name


def test_the_ranking_puts_fitting_layouts_first_fastest_first():
    rows = plan(preset("llama-3-8b"), HARDWARE["h100"], 8, 8192, 16, precisions=("bf16",))
    fits = [r for r in rows if r.fits]
    assert fits and not rows[-1].fits
    assert rows[:len(fits)] == fits
    assert [r.step_s for r in fits] == sorted(r.step_s for r in fits)
    assert all(r.layout.world == 8 for r in rows)
    assert {r.layout.tp for r in rows} <= {1, 2, 4, 8}


def test_70b_on_eight_gpus_fits_only_with_offload():
    cfg = preset("llama-3-70b")
    assert not any(r.fits for r in plan(cfg, HARDWARE["h100"], 8, 8192, 8))
    off = [r for r in plan(cfg, HARDWARE["h100"], 8, 8192, 8, offload=True) if r.fits]
    assert off and all(r.layout.offload for r in off)


def test_layouts_respect_what_ember_can_run():
    cfg = preset("tiny-llama")  # 4 heads, 2 KV heads: tp 4 is refused by check_tp
    lays = layouts(cfg, HARDWARE["cpu"], 8, 8)
    assert lays and max(lay.tp for lay in lays) == 2
    assert all(lay.pp <= cfg.n_layer + 2 for lay in lays)
    assert all(8 % lay.dp == 0 for lay in lays)


def test_fp8_is_faster_than_bf16_on_h100():
    cfg = preset("llama-3-8b")
    bf16 = evaluate(cfg, Layout(dp_shard=8, precision="bf16"), HARDWARE["h100"], 4096, 8)
    fp8 = evaluate(cfg, Layout(dp_shard=8, precision="fp8"), HARDWARE["h100"], 4096, 8)
    assert fp8.step_s < bf16.step_s
    assert fp8.memory["total"] == bf16.memory["total"]


# ------------------------------------------------------------------------------------- the command
def test_cli_plan_prints_a_ranked_table(capsys):
    from ember.cli import main as cli

    assert cli(["plan", "llama-3-8b", "--gpus", "8", "--gpu", "h100", "--seq-len", "8192", "--global-batch", "16",
                "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "ember plan: llama-3-8b on 8 x h100" in out and "total GiB" in out and "tok/s/GPU" in out


def test_cli_plan_json_and_filters(capsys):
    from ember.cli import main as cli

    assert cli(["plan", "gpt3-175b", "--gpus", "1024", "--gpu", "a100", "--seq-len", "2048", "--global-batch",
                "1536", "--tp", "8", "--pp", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fit"] > 0 and data["gpus"] == 1024
    assert all(p["layout"]["tp"] == 8 and p["layout"]["pp"] == 8 for p in data["plans"])
    assert data["plans"][0]["fits"]


def test_cli_plan_says_when_nothing_fits(capsys):
    from ember.cli import main as cli

    assert cli(["plan", "llama-3-70b", "--gpus", "8", "--gpu", "h100", "--seq-len", "8192", "--global-batch", "8"]) == 0
    assert "No layout fits" in capsys.readouterr().out


def test_cli_plan_published_agrees(capsys):
    from ember.cli import main as cli

    assert cli(["plan", "--published", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(r["agrees"] for r in rows)


def test_cli_plan_errors_name_the_flag(capsys):
    from ember.cli import main as cli

    assert cli(["plan", "gpt2", "--gpus", "0"]) == 1
    assert "--gpus" in capsys.readouterr().err
    assert cli(["plan", "gpt2", "--gpus", "8", "--global-batch", "3", "--tp", "8"]) == 1
    err = capsys.readouterr().err
    assert "no layout" in err and "HINT" in err
    assert cli(["plan", "gpt2", "--gpu", "a100", "--precision", "fp8"]) == 1
    assert "--precision fp8" in capsys.readouterr().err
    with pytest.raises(EmberError):
        from ember.recipes.plan import Config, main

        main(Config(model="no-such-model"))
