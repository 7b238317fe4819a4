"""ember.train.optim: no-decay groups and the learning-rate schedules at their key steps."""

import math
from types import SimpleNamespace

import pytest

from ember.errors import EmberError
from ember.models import Transformer, preset
from ember.train.optim import build_optimizer, build_scheduler, lr_at, param_group_names, param_groups


def _cfg(**kw):
    base = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, schedule="cosine", decay_frac=0.2,
                decay_shape="linear")
    return SimpleNamespace(**{**base, **kw})


def test_no_decay_on_norms_biases_embeddings():
    model = Transformer(preset("tiny"))
    names = param_group_names(model)
    assert "tok_embeddings.weight" in names["no_decay"]
    assert "pos_embeddings.weight" in names["no_decay"]
    assert "output.weight" not in names["decay"] + names["no_decay"]  # tied: counted once, as the embedding
    for n in names["no_decay"]:
        assert "norm" in n or n.endswith("bias") or "embeddings" in n, n
    for n in names["decay"]:
        assert n.endswith("weight") and "norm" not in n and "embeddings" not in n, n
    assert "layers.0.attention.wq.weight" in names["decay"]
    assert "layers.1.feed_forward.w2.weight" in names["decay"]
    # every parameter in exactly one group, shared ones once
    groups = param_groups(model, 0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})
    assert sum(p.numel() for g in groups for p in g["params"]) == model.num_params()


def test_untied_llama_head_decays_rmsnorm_does_not():
    model = Transformer(preset("tiny-llama"))
    names = param_group_names(model)
    assert "output.weight" in names["decay"]
    assert "layers.0.attention_norm.weight" in names["no_decay"]
    assert "norm.weight" in names["no_decay"]


def test_frozen_params_left_out():
    model = Transformer(preset("tiny"))
    model.tok_embeddings.weight.requires_grad_(False)
    names = param_group_names(model)
    assert "tok_embeddings.weight" not in names["no_decay"] + names["decay"]


def test_optimizer_groups_and_foreach():
    model = Transformer(preset("tiny"))
    opt = build_optimizer(model, lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.defaults["foreach"] is True and opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_cosine_shape():
    c = _cfg()
    assert lr_at(0, c) == pytest.approx(0.1)  # warmup: lr * 1/10
    assert lr_at(4, c) == pytest.approx(0.5)
    assert lr_at(9, c) == pytest.approx(1.0)  # warmup done
    assert lr_at(10, c) == pytest.approx(1.0)
    assert lr_at(60, c) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert lr_at(110, c) == pytest.approx(0.1)
    assert lr_at(500, c) == pytest.approx(0.1)  # past the end: min_lr
    lrs = [lr_at(s, c) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay


def test_wsd_shape():
    c = _cfg(schedule="wsd")  # decay over the last 22 steps: 88 -> 110
    assert lr_at(5, c) == pytest.approx(0.6)
    assert lr_at(50, c) == pytest.approx(1.0)
    assert lr_at(87, c) == pytest.approx(1.0)
    assert lr_at(88, c) == pytest.approx(1.0)
    assert lr_at(99, c) == pytest.approx(0.55)  # half-way down, linear
    assert lr_at(110, c) == pytest.approx(0.1)
    cc = _cfg(schedule="wsd", decay_shape="cosine")
    assert lr_at(99, cc) == pytest.approx(0.55)
    assert lr_at(93, cc) > lr_at(93, c)  # cosine starts slower than linear


def test_constant_shape():
    c = _cfg(schedule="constant")
    assert lr_at(0, c) == pytest.approx(0.1)
    assert lr_at(10, c) == lr_at(109, c) == 1.0


def test_no_warmup():
    c = _cfg(warmup_steps=0, max_steps=100)
    assert lr_at(0, c) == 1.0
    assert lr_at(100, c) == pytest.approx(0.1)


def test_unknown_schedule_is_clear_error():
    with pytest.raises(EmberError, match="schedule"):
        lr_at(0, _cfg(schedule="linear"))


def test_lambda_lr_follows_lr_at_and_round_trips():
    c = _cfg(lr=2e-3, min_lr=2e-4)
    model = Transformer(preset("tiny"))
    opt = build_optimizer(model, lr=c.lr)
    sched = build_scheduler(opt, c)
    seen = []
    for _ in range(30):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, c) for s in range(30)])
    sd = sched.state_dict()
    opt2 = build_optimizer(model, lr=c.lr)
    sched2 = build_scheduler(opt2, c)
    sched2.load_state_dict(sd)
    opt2.step()
    sched2.step()
    sched.step()
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    assert math.isclose(sched.get_last_lr()[0], lr_at(31, c))
