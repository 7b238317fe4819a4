"""Forward+backward tokens/s on CPU: ember vs Hugging Face `GPT2LMHeadModel`, same config and weights.

    .venv/bin/python bench/forward_backward.py                 # 6 layers x 384, block 256, batch 8, vocab 50304
    .venv/bin/python bench/forward_backward.py --no-compile    # eager contenders only (fast)

One process: HF's random weights are copied into ember (ember.models.hf), every contender computes
the mean next-token cross-entropy of the same batch and runs backward. HF's loss is computed from its
logits with F.cross_entropy (not `labels=`, whose internal shift copies the 412 MB logits: that would
slow HF down). Contenders (fp32, dropout 0):

    hf            GPT2LMHeadModel eager, default attention (sdpa), CE from logits
    hf_compiled   torch.compile of HF forward + CE
    ember         ember eager, plain path: cross_entropy(model(x), y)
    ember_fused   ember eager, fused head + CE (ember.train.loss.model_loss)
    ember_compiled  blocks compiled in place (block.compile(), as --parallel.compile) + fused head + CE

Timings alternate the contenders each round (fair on a shared machine); the medians give tokens/s.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import machine_line, median, time_interleaved  # noqa: E402
from ember.models import from_state_dict  # noqa: E402
from ember.models.hf import config_from_hf, state_dict_from_hf  # noqa: E402
from ember.train.loss import model_loss  # noqa: E402
from ember.train.loss import cross_entropy  # noqa: E402


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The GPT-2-style shape and timing flags shared with bench/train_throughput.py."""
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--embd", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--iters", type=int, default=5, help="timed rounds (each contender once per round)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--chunk", type=int, default=None, help="rows per chunk of the fused loss (default: by size)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the compiled contenders (first calls compile: minutes on 2 cores)")
    return p.parse_args(argv)


def build_models(a: argparse.Namespace):
    """An HF GPT-2 with random weights and an ember Transformer holding the same weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hcfg = GPT2Config(vocab_size=a.vocab, n_positions=a.block, n_embd=a.embd, n_layer=a.layers, n_head=a.heads,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                      bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(hcfg).train()
    cfg = config_from_hf(hcfg.to_dict())
    sd = {k: v.detach().clone() for k, v in state_dict_from_hf(hf.state_dict(), cfg, "gpt2").items()}
    model = from_state_dict(cfg, sd)  # its own copy: from_state_dict assigns, and both models are trained
    assert model.output.weight is model.tok_embeddings.weight
    return hf, model.train()


def step_fn(loss_fn, params):
    """A callable running one forward+backward (grads reset first); returns the loss."""
    def step():
        for p in params:
            p.grad = None
        loss = loss_fn()
        loss.backward()
        return loss.detach()
    return step


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(machine_line())
    hf, model = build_models(a)
    V = a.vocab
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (a.batch, a.block), generator=g)
    y = torch.randint(0, V, (a.batch, a.block), generator=g)

    def hf_loss(m=hf):
        return F.cross_entropy(m(input_ids=x).logits.view(-1, V), y.view(-1))

    fns = {
        "hf": step_fn(hf_loss, list(hf.parameters())),
        "ember": step_fn(lambda: cross_entropy(model(x), y), list(model.parameters())),
        "ember_fused": step_fn(lambda: model_loss(model, x, y, chunk_size=a.chunk), list(model.parameters())),
    }
    if a.compile:
        hf_c = torch.compile(hf_loss)
        fns["hf_compiled"] = step_fn(hf_c, list(hf.parameters()))
        mc = copy.deepcopy(model)
        mc.tie_weights()
        for block in mc.layers.values():
            block.compile()
        fns["ember_compiled"] = step_fn(lambda: model_loss(mc, x, y, chunk_size=a.chunk), list(mc.parameters()))

    # same weights, same batch: the losses must agree
    losses = {k: fn().item() for k, fn in fns.items()}
    print("losses: " + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()))
    print("max |loss - hf|: " + f"{max(abs(v - losses['hf']) for v in losses.values()):.2e}")

    tokens = a.batch * a.block
    print(f"config: {a.layers} layers x {a.embd}, {a.heads} heads, block {a.block}, batch {a.batch}, "
          f"vocab {V}, fp32, fwd+bwd; {a.iters} rounds after {a.warmup} warm-up (alternating)")
    times = time_interleaved(fns, iters=a.iters, warmup=a.warmup)
    tps = {k: tokens / median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"  {k:15s} {tps[k]:8.1f} tok/s   median {median(v):.3f} s  best {min(v):.3f} s  "
              f"(all: {' '.join(f'{t:.2f}' for t in v)})")
    best = "ember_compiled" if "ember_compiled" in tps else "ember_fused"
    print(f"ratio ember/HF (eager HF, sdpa): {tps[best] / tps['hf']:.2f}x  [{best}, the best supported ember config]")
    print(f"ratio ember_fused (eager)/HF eager: {tps['ember_fused'] / tps['hf']:.2f}x; "
          f"plain ember eager/HF eager: {tps['ember'] / tps['hf']:.2f}x")
    paired = {k: median([h / t for h, t in zip(times["hf"], v)]) for k, v in times.items() if k != "hf"}
    print("paired ratios vs hf (median over rounds of hf time / time, robust to load shifts between rounds): "
          + ", ".join(f"{k} {r:.2f}x" for k, r in paired.items()))
    if "hf_compiled" in tps:
        print(f"ratio {best}/hf_compiled: {tps[best] / tps['hf_compiled']:.2f}x")


if __name__ == "__main__":
    main()
