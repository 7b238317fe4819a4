"""ember.infer.sample: greedy, top-k/top-p/min-p masks, repetition penalty vs transformers, seeds."""

import pytest
import torch

from ember.errors import EmberError
from ember.infer.sample import (SamplingParams, apply_min_p, apply_repetition_penalty, apply_top_k, apply_top_p,
                                process_logits, sample, seen_mask, update_seen)

V = 50


def _logits(B=4, seed=0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def _draws(logits, params, n=2000, seed=0):
    """n independent draws per row, in one batched call: (n, B)."""
    g = torch.Generator().manual_seed(seed)
    B = logits.shape[0]
    return sample(logits.repeat(n, 1), params, generator=g).view(n, B)


def test_greedy_is_argmax():
    x = _logits()
    assert torch.equal(sample(x, SamplingParams(temperature=0)), x.argmax(-1))
    # greedy ignores the warpers and the generator
    assert torch.equal(sample(x, SamplingParams(temperature=0, top_k=1, top_p=0.1)), x.argmax(-1))


def test_top_k_never_samples_outside_top_k():
    x = _logits()
    draws = _draws(x, SamplingParams(temperature=1.0, top_k=5))
    topk = x.topk(5, dim=-1).indices  # (B, 5)
    for b in range(x.shape[0]):
        assert set(draws[:, b].tolist()) <= set(topk[b].tolist())
    assert len(set(draws[:, 0].tolist())) > 1  # it does sample


def test_top_p_keeps_smallest_nucleus():
    x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(apply_top_p(x, 0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7 <= 0.8
    assert torch.isfinite(apply_top_p(x, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(apply_top_p(x, 0.01)).sum() == 1  # the top token always survives
    draws = _draws(_logits(), SamplingParams(temperature=1.0, top_p=0.6))
    allowed = torch.isfinite(apply_top_p(_logits(), 0.6))
    for b in range(draws.shape[1]):
        assert allowed[b, draws[:, b]].all()


def test_top_k_top_p_match_transformers():
    hf = pytest.importorskip("transformers.generation.logits_process")
    x = _logits(B=3, seed=1)
    ref_k = hf.TopKLogitsWarper(top_k=7)(None, x.clone())
    assert torch.equal(torch.isfinite(apply_top_k(x, 7)), torch.isfinite(ref_k))
    ref_p = hf.TopPLogitsWarper(top_p=0.8)(None, x.clone())
    assert torch.equal(torch.isfinite(apply_top_p(x, 0.8)), torch.isfinite(ref_p))
    ref_m = hf.MinPLogitsWarper(min_p=0.1)(None, x.clone())
    assert torch.equal(torch.isfinite(apply_min_p(x, 0.1)), torch.isfinite(ref_m))


def test_min_p_threshold():
    x = torch.log(torch.tensor([[0.6, 0.3, 0.07, 0.03]]))
    assert torch.isfinite(apply_min_p(x, 0.1)).tolist() == [[True, True, True, False]]  # 0.03 < 0.06 <= 0.07
    draws = _draws(x, SamplingParams(temperature=1.0, min_p=0.2), n=500)
    assert set(draws[:, 0].tolist()) <= {0, 1}


def test_repetition_penalty_matches_transformers():
    hf = pytest.importorskip("transformers.generation.logits_process")
    x = _logits(B=2, seed=2)
    ids = torch.tensor([[1, 5, 5, 7, 40], [0, 2, 3, 3, 49]])
    ref = hf.RepetitionPenaltyLogitsProcessor(penalty=1.3)(ids, x.clone())
    ours = apply_repetition_penalty(x, seen_mask(ids, V), 1.3)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    # pad entries (valid=False) do not count as seen; update_seen adds new tokens
    seen = seen_mask(ids, V, valid=torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool))
    assert not seen[0, 1] and seen[0, 5] and seen[1, 0]
    update_seen(seen, torch.tensor([1, 4]))
    assert seen[0, 1] and seen[1, 4]


def test_seed_reproduces_and_differs():
    x = _logits()
    p = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, min_p=0.01)
    a, b, c = _draws(x, p, n=50, seed=3), _draws(x, p, n=50, seed=3), _draws(x, p, n=50, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_temperature_sharpens():
    x = _logits(B=1)
    cold = process_logits(x, SamplingParams(temperature=0.5)).softmax(-1).max()
    hot = process_logits(x, SamplingParams(temperature=2.0)).softmax(-1).max()
    assert cold > x.softmax(-1).max() > hot


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5),
                                         ("min_p", 2.0), ("repetition_penalty", 0.0), ("top_k", -3)])
def test_invalid_params_are_ember_errors(field, value):
    with pytest.raises(EmberError, match=field):
        SamplingParams(**{field: value}).validate()
