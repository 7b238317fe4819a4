"""Training tokens/s and MFU on CPU: ember's training step vs Hugging Face GPT-2 in a plain PyTorch loop.

    .venv/bin/python bench/train_throughput.py                 # 6 layers x 384, block 256, batch 8, vocab 50304
    .venv/bin/python bench/train_throughput.py --no-compile    # eager contenders only

One process, same config, same initial weights (HF's copied into ember), same batches (random
tokens, a fixed cycle). Contenders, each a full optimizer step (fwd, bwd, clip 1.0, AdamW, zero_grad):

    hf              GPT2LMHeadModel, CE from logits, torch.optim.AdamW(model.parameters()) (default impl),
                    clip_grad_norm_: the plain loop a user writes
    hf_compiled     the same with torch.compile(model)
    ember           ember.train.loop.Trainer.train_step, plain loss (--loss.fused false: logits + CE)
    ember_fused     Trainer.train_step with the fused head + CE (LMLoss(LossConfig(fused=True)), the default)
    ember_compiled  the same with blocks compiled in place (ember.parallel.apply_compile, --parallel.compile)

MFU = flops_per_token (ModelConfig.flops_per_token: 6N incl. the head + attention) x tokens/s / peak,
where the peak is an fp32 2048^2 matmul timed in the same rounds as the steps (so a busy machine
slows both alike); the best matmul of the run is printed too.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import machine_line, measure_gemm_peak_flops, median, time_interleaved  # noqa: E402
from bench.forward_backward import add_model_args, build_models  # noqa: E402
from ember.parallel.parallelize import apply_compile  # noqa: E402
from ember.train.loop import Trainer, TrainConfig  # noqa: E402
from ember.train.loss import LMLoss, LossConfig  # noqa: E402
from ember.train.optim import build_optimizer, build_scheduler  # noqa: E402

GEMM_N = 2048


class CycleLoader:
    """`next_batch()` over a fixed list of (inputs, targets) batches."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next_batch(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, sd):
        self.i = sd["i"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    return p.parse_args(argv)


def hf_step_fn(hf, batches, lr: float, V: int):
    opt = torch.optim.AdamW(hf.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    loader = CycleLoader(batches)

    def step():
        x, y = loader.next_batch()
        loss = F.cross_entropy(hf(input_ids=x).logits.view(-1, V), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def ember_step_fn(model, batches, lr: float, fused_loss: bool):
    cfg = TrainConfig(batch_size=batches[0][0].shape[0], lr=lr, warmup_steps=1, schedule="constant",
                      grad_clip=1.0, eval_every=0, log_every=10 ** 9)
    opt = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    trainer = Trainer(model, opt, build_scheduler(opt, cfg), CycleLoader(batches), None, cfg,
                      loss_fn=LMLoss(LossConfig(fused=fused_loss)))
    return lambda: trainer.train_step()["loss"]


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(machine_line())
    hf, model = build_models(a)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, a.vocab, (a.batch, a.block), generator=g),
                torch.randint(0, a.vocab, (a.batch, a.block), generator=g)) for _ in range(4)]
    models = {"ember": model, "ember_fused": copy.deepcopy(model)}
    fns = {"hf": hf_step_fn(hf, batches, a.lr, a.vocab),
           "ember": ember_step_fn(models["ember"], batches, a.lr, fused_loss=False),
           "ember_fused": ember_step_fn(models["ember_fused"], batches, a.lr, fused_loss=True)}
    if a.compile:
        hf_c = copy.deepcopy(hf)
        fns["hf_compiled"] = hf_step_fn(torch.compile(hf_c), batches, a.lr, a.vocab)
        mc = models["ember_compiled"] = copy.deepcopy(model)
        apply_compile(mc)
        fns["ember_compiled"] = ember_step_fn(mc, batches, a.lr, fused_loss=True)
    for m in models.values():
        m.tie_weights()

    first = {k: fn() for k, fn in fns.items()}  # step 1 (compiles); same weights and batch: same loss
    print("step-1 losses: " + ", ".join(f"{k} {v:.6f}" for k, v in first.items()))
    a_ = torch.randn(GEMM_N, GEMM_N)
    b_ = torch.randn(GEMM_N, GEMM_N)
    c_ = torch.empty(GEMM_N, GEMM_N)
    fns["gemm"] = lambda: [torch.mm(a_, b_, out=c_) for _ in range(5)]
    times = time_interleaved(fns, iters=a.iters, warmup=a.warmup - 1 if a.warmup > 1 else 0)
    peak_run = 5 * 2 * GEMM_N ** 3 / median(times.pop("gemm"))
    peak_best = max(peak_run, measure_gemm_peak_flops(GEMM_N))
    fpt = model.cfg.flops_per_token(a.block)
    tokens = a.batch * a.block
    print(f"config: {a.layers} layers x {a.embd}, {a.heads} heads, block {a.block}, batch {a.batch}, "
          f"vocab {a.vocab}, fp32; {fpt / 1e6:.1f} MFLOP/token; {a.iters} rounds (alternating)")
    print(f"fp32 GEMM {GEMM_N}^2: {peak_run / 1e9:.1f} GFLOP/s median over the rounds, "
          f"{peak_best / 1e9:.1f} GFLOP/s best")
    tps = {}
    for k, v in times.items():
        tps[k] = tokens / median(v)
        print(f"  {k:15s} {tps[k]:8.1f} tok/s  MFU {fpt * tps[k] / peak_run:6.1%} (of best: "
              f"{fpt * tps[k] / peak_best:6.1%})  median {median(v):.3f} s  (all: {' '.join(f'{t:.2f}' for t in v)})")
    best = "ember_compiled" if "ember_compiled" in tps else "ember_fused"
    print(f"ratio ember/HF (plain eager loop): {tps[best] / tps['hf']:.2f}x  [{best}]; "
          f"ember_fused eager {tps['ember_fused'] / tps['hf']:.2f}x; ember default-loss eager "
          f"{tps['ember'] / tps['hf']:.2f}x")
    paired = {k: median([h / t for h, t in zip(times["hf"], v)]) for k, v in times.items() if k != "hf"}
    print("paired ratios vs hf (median over rounds of hf time / time, robust to load shifts between rounds): "
          + ", ".join(f"{k} {r:.2f}x" for k, r in paired.items()))
    if "hf_compiled" in tps:
        print(f"ratio {best}/hf_compiled: {tps[best] / tps['hf_compiled']:.2f}x")
    print(f"ember MFU ({best}): {fpt * tps[best] / peak_run:.1%} of the GEMM peak measured in the same rounds")


if __name__ == "__main__":
    main()
