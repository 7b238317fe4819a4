"""LoRA SFT on CPU: ember's training step vs PEFT on transformers, same model, rank, targets, batch and data.

    .venv/bin/python bench/finetune.py                          # Llama-shaped 8 x 512, vocab 8192, T 256, B 4
    .venv/bin/python bench/finetune.py --checkpoint runs/smollm2 --block 128   # real SmolLM2-135M weights

One process for the timing: an HF LlamaForCausalLM (random, or the checkpoint's weights through ember's
HF export map) with PEFT LoRA, and an ember Transformer holding the same weights with ember's LoRA on
the same targets. Both take the same batches (labels -100 on a random prompt prefix of each row, as
SFT masks them), compute the mean loss over valid targets, clip at 1.0 and step AdamW over the
adapters only. Rounds alternate the contenders; medians give tokens/s and the ratio.

Memory: each contender also runs alone in a child process (same steps), which prints its peak RSS
(VmHWM) and the bytes of its trained parameters + gradients + AdamW states, so the two do not share
one address space's high-water mark; a third child runs ember with the base's block linears in NF4
(QLoRA, --quant nf4). The RSS includes the Python and library baseline of each process (~400 MiB here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import machine_line, median, time_interleaved  # noqa: E402

TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
           "down": "down_proj"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="an ember checkpoint (Llama family) instead of random weights")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--embd", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--targets", default="q,k,v,o,gate,up,down")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", choices=["ember", "peft", "ember-qlora"], default=None,
                   help="(internal) memory run of one contender")
    return p.parse_args(argv)


def build(a):
    """(HF model with PEFT LoRA, ember model with LoRA), the same base weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from ember.models.hf import config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf
    from ember.models.transformer import from_state_dict
    from ember.peft import LoRAConfig, apply_lora

    torch.manual_seed(0)
    if a.checkpoint:
        from ember.io.checkpoint import load_checkpoint

        model, _ = load_checkpoint(a.checkpoint)
        cfg = model.cfg
        hf_cfg = LlamaConfig(**config_to_hf(cfg, "llama"))
        hf = LlamaForCausalLM(hf_cfg)
        hf.load_state_dict(state_dict_to_hf(model.state_dict(), cfg, "llama"), strict=False)
        hf.tie_weights()
    else:
        hf_cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.embd, intermediate_size=int(8 / 3 * a.embd // 64 * 64),
                             num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                             max_position_embeddings=a.block, tie_word_embeddings=True, attention_dropout=0.0)
        hf = LlamaForCausalLM(hf_cfg)
        cfg = config_from_hf(hf_cfg.to_dict())
    hf.config._attn_implementation = "sdpa"
    sd = {k: v.detach().clone() for k, v in state_dict_from_hf(hf.state_dict(), cfg, "llama").items()}
    ours = from_state_dict(cfg, sd).train()
    roles = a.targets.split(",")
    apply_lora(ours, LoRAConfig(r=a.r, alpha=2 * a.r, targets=roles))
    peft = get_peft_model(hf, LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=0.0,
                                         target_modules=[TARGETS[t] for t in roles], task_type="CAUSAL_LM")).train()
    return peft, ours, cfg


def batches(a, vocab: int, n: int = 4):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randint(0, vocab, (a.batch, a.block), generator=g)
        y = torch.randint(0, vocab, (a.batch, a.block), generator=g)
        for b in range(a.batch):  # a prompt prefix without loss, as SFT masks it
            y[b, : int(torch.randint(a.block // 4, a.block // 2, (1,), generator=g))] = -100
        out.append((x, y))
    return out


class Cycle:
    def __init__(self, items):
        self.items, self.i = items, 0

    def next_batch(self):
        b = self.items[self.i % len(self.items)]
        self.i += 1
        return {"input_ids": b[0], "labels": b[1]}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, sd):
        self.i = sd["i"]


def peft_step_fn(peft, data):
    params = [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    loader = Cycle(data)

    def step():
        b = loader.next_batch()
        logits = peft(input_ids=b["input_ids"]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step, params, opt


def ember_step_fn(model, data):
    from ember.train.loop import TrainConfig, Trainer
    from ember.train.loss import LMLoss
    from ember.train.optim import build_optimizer, build_scheduler

    cfg = TrainConfig(max_steps=10 ** 6, batch_size=data[0][0].shape[0], lr=1e-4, min_lr=1e-5, warmup_steps=1,
                      schedule="constant", weight_decay=0.0, grad_clip=1.0, eval_every=0, log_every=10 ** 9)
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay)
    tr = Trainer(model, opt, build_scheduler(opt, cfg), Cycle(data), None, cfg, loss_fn=LMLoss())
    return (lambda: tr.train_step()["loss"]), [p for p in model.parameters() if p.requires_grad], opt


def state_bytes(params, opt) -> int:
    """Trained parameters + their gradients + AdamW's two moments (what training holds beyond the base)."""
    n = sum(p.numel() * p.element_size() for p in params)
    return 4 * n  # the parameters, their gradients, exp_avg and exp_avg_sq (all fp32)


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(a) -> None:
    peft, ours, cfg = build(a)
    data = batches(a, cfg.vocab_size)
    nf4 = None
    if a.only.startswith("ember"):
        del peft
        if a.only == "ember-qlora":
            from ember.peft.qlora import nf4_bytes, quantize_base_nf4

            quantize_base_nf4(ours)
            nbytes, params = nf4_bytes(ours)
            nf4 = nbytes / params
        step, params, opt = ember_step_fn(ours, data)
    else:
        del ours
        step, params, opt = peft_step_fn(peft, data)
    for _ in range(a.warmup + 2):
        step()
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "state_mb": state_bytes(params, opt) / 2 ** 20,
                      "trainable": sum(p.numel() for p in params), "nf4_bytes_per_weight": nf4}))


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.only:
        return memory_child(a)
    print(machine_line())
    peft, ours, cfg = build(a)
    data = batches(a, cfg.vocab_size)
    fns = {"peft": peft_step_fn(peft, data)[0], "ember": ember_step_fn(ours, data)[0]}
    first = {k: fn() for k, fn in fns.items()}  # same weights, same batch: the same loss
    print(f"model: Llama-shaped {cfg.n_layer} x {cfg.n_embd}, vocab {cfg.vocab_size}, {cfg.num_params() / 1e6:.1f}M "
          f"params; LoRA r={a.r} on {a.targets}; batch {a.batch} x {a.block}")
    print("step-1 losses: " + ", ".join(f"{k} {v:.6f}" for k, v in first.items()))
    times = time_interleaved(fns, iters=a.iters, warmup=a.warmup)
    tokens = a.batch * a.block
    tps = {k: tokens / median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"  {k:6s} {tps[k]:8.1f} tok/s  median {median(v):.3f} s  (all: {' '.join(f'{t:.2f}' for t in v)})")
    paired = median([p / e for p, e in zip(times["peft"], times["ember"])])
    print(f"ratio ember/PEFT tokens/s: {tps['ember'] / tps['peft']:.2f}x (paired per round {paired:.2f}x)")
    mem = {}
    for who in ("ember", "peft", "ember-qlora"):
        cmd = [sys.executable, __file__, "--only", who] + [x for x in (argv or sys.argv[1:])]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, timeout=1800)
        mem[who] = json.loads(out.stdout.strip().splitlines()[-1])
    for who, m in mem.items():
        nf4 = f", base block linears NF4 at {m['nf4_bytes_per_weight']:.3f} B/weight" if m["nf4_bytes_per_weight"] else ""
        print(f"  {who:11s} peak RSS {m['peak_rss_mb']:.0f} MiB, trained params+grads+AdamW {m['state_mb']:.1f} MiB "
              f"({m['trainable']:,} trainable){nf4}")
    print(f"peak RSS ember/PEFT: {mem['ember']['peak_rss_mb'] / mem['peft']['peak_rss_mb']:.2f}x; "
          f"QLoRA/LoRA (ember): {mem['ember-qlora']['peak_rss_mb'] / mem['ember']['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
