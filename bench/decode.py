"""Decode speed: ember vs `transformers.generate` on the same weights, and ember vs the bandwidth roofline.

    .venv/bin/python bench/decode.py                       # GPT-2 124M shape, random fp32 weights, CPU
    .venv/bin/python bench/decode.py --model smollm2       # SmolLM2-135M shape (Llama, GQA, tied)
    .venv/bin/python bench/decode.py --compile             # also ember with torch.compile'd decode step
    .venv/bin/python bench/decode.py --checkpoint runs/smollm2   # real weights (e.g. converted from GGUF)

One HF model (GPT2LMHeadModel or LlamaForCausalLM, random init, fp32) is converted into ember with
ember.models.hf, so both run the very same weights. Both decode greedily from the same random prompt
(`--prompt-len` tokens) for `--new-tokens` tokens with a KV cache (HF: use_cache=True), at batch 1 and
batch 8; runs alternate (bench.common.time_interleaved) so machine noise hits both alike.
tok/s = batch * new_tokens / wall time of the whole generate call (prefill included, both sides).

Roofline (batch 1): each new token reads every weight once (the tied embedding once, as the head)
plus the KV cache; bandwidth is measured in the same run (a large tensor sum), so
roofline tok/s = bandwidth / bytes per token, and ember's decode-step rate is reported against it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import hf_from_checkpoint, machine_line, measure_memory_bandwidth, median, time_interleaved  # noqa: E402
from ember.infer.generate import PACK_MAX_BATCH, Batch, compiled_decode_step, decode_step, generate  # noqa: E402
from ember.infer.sample import SamplingParams  # noqa: E402
from ember.models import Transformer, from_state_dict  # noqa: E402
from ember.models import hf as hfconv  # noqa: E402
from ember.models.kv_cache import clear_caches, setup_caches  # noqa: E402
from ember.infer.decode import decode_fused, fused_views, fused_weight, pack_for_decode, unpack  # noqa: E402


def build_hf(name: str):
    import transformers

    torch.manual_seed(0)
    if name == "gpt2":  # GPT-2 small: 124M params, vocab 50257, tied head
        cfg = transformers.GPT2Config()
        return transformers.GPT2LMHeadModel(cfg).eval(), "gpt2"
    cfg = transformers.LlamaConfig(  # SmolLM2-135M shape
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval(), "llama"


def to_ember(hf, model_type: str) -> Transformer:
    cfg = hfconv.config_from_hf(hf.config.to_dict())
    return from_state_dict(cfg, hfconv.state_dict_from_hf(hf.state_dict(), cfg, model_type))


def bytes_per_token(model: Transformer, context: int) -> int:
    """Weight bytes read per decode step at batch 1 (embedding rows are a lookup; a tied head counts once)."""
    emb = {id(m.weight) for m in (model.tok_embeddings, model.pos_embeddings) if m is not None}
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (id(p) in emb and p is not model.output.weight):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    c = model.cfg
    kv = 2 * c.n_layer * c.n_kv_head * c.head_dim * context * 4  # keys and values, fp32
    return total + kv


def hf_generate(hf, ids: torch.Tensor, n: int) -> torch.Tensor:
    with torch.inference_mode():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, use_cache=True, pad_token_id=0)[:, ids.shape[1]:]


def ember_generate(model, ids: torch.Tensor, n: int, compile: bool = False, pack: bool = True) -> list[list[int]]:
    return generate(model, ids.tolist(), n, SamplingParams(temperature=0), compile=compile, pack=pack)


def decode_step_rate(model, ids: torch.Tensor, n: int, compile: bool) -> tuple[float, float]:
    """ember decode steps per second (prefill excluded), batch = ids.shape[0]: (by wall time, by CPU time / threads).

    The CPU-time rate discounts time the process spent descheduled on a busy machine (it still
    counts OpenMP spin-waiting), so with 1 thread it is the steadier number."""
    step = compiled_decode_step() if compile else decode_step
    batch = Batch(ids.tolist(), n, ids.device)
    with torch.inference_mode(), fused_views(model):  # as generate runs it
        setup_caches(model, batch.B, batch.S)
        h = model.hidden_states(batch.tokens, input_pos=batch.slots[: batch.T])[:, -1]
        tok = model.output(h).argmax(-1, keepdim=True)
        for i in range(3):  # warm-up (and compile)
            step(model, tok, batch.slots[batch.T + i: batch.T + i + 1], None, None)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(3, n):
            pos = batch.slots[batch.T + i: batch.T + i + 1]
            tok = step(model, tok, pos, None, None).argmax(-1, keepdim=True)
        dt, dc = time.perf_counter() - t0, (time.process_time() - c0) / torch.get_num_threads()
        clear_caches(model)
    return (n - 3) / dt, (n - 3) / dc


def weight_products(model: Transformer) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) of every product a packed batch-1 decode step runs, in order (fused groups as one)."""
    out = []
    for layer in model.layers.values():
        att, ffn = layer.attention, layer.feed_forward
        out.append(fused_weight([att.wq, att.wk, att.wv]) or (att.wq.weight, att.wq.bias))
        out.append((att.wo.weight, att.wo.bias))
        if hasattr(ffn, "w3"):
            out.append(fused_weight([ffn.w1, ffn.w3]) or (ffn.w1.weight, ffn.w1.bias))
        else:
            out.append((ffn.w1.weight, ffn.w1.bias))
        out.append((ffn.w2.weight, ffn.w2.bias))
    out.append((model.output.weight, None))
    return out


def product_chain_rate(model: Transformer, steps: int) -> float:
    """Steps per second of the weight products ALONE (the same split GEMVs, no attention, norms or
    Python around them): the ceiling of any decode step built on these kernels."""
    prods = weight_products(model)
    xs = {w.shape[1]: torch.randn(1, 1, w.shape[1]) for w, _ in prods}
    with torch.inference_mode():
        for w, b in prods:
            decode_fused(xs[w.shape[1]], w, b)
        t0 = time.perf_counter()
        for _ in range(steps):
            for w, b in prods:
                decode_fused(xs[w.shape[1]], w, b)
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["gpt2", "smollm2"], default="gpt2")
    ap.add_argument("--checkpoint", default=None, help="an ember checkpoint (real weights) instead of --model")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5, help="alternating bandwidth / decode-step rounds for the roofline")
    ap.add_argument("--compile", action="store_true", help="also time ember with a torch.compile'd decode step")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line(), f"| load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    hf, model_type = hf_from_checkpoint(args.checkpoint) if args.checkpoint else build_hf(args.model)
    model = to_ember(hf, model_type)  # packed below for batches <= PACK_MAX_BATCH, as generate does
    plain = to_ember(hf, model_type)  # row-major weights as loaded: ember without infer/decode
    n_params = model.num_params()
    what = f"{args.checkpoint} ({model_type})" if args.checkpoint else f"{args.model}-shaped {model_type}, random weights"
    print(f"model: {what}, {n_params / 1e6:.1f}M params, fp32; "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy")
    n = args.new_tokens
    hf_rate1 = None
    for B in args.batch_sizes:
        if B <= PACK_MAX_BATCH:  # generate switches layouts by batch size; switch outside the timed calls
            pack_for_decode(model)
        else:
            unpack(model)
        ids = torch.randint(0, model.cfg.vocab_size, (B, args.prompt_len), generator=torch.Generator().manual_seed(B))
        same = ember_generate(model, ids, n) == hf_generate(hf, ids, n).tolist()
        fns = {"hf": lambda: hf_generate(hf, ids, n), "ember": lambda: ember_generate(model, ids, n),
               "ember(unpacked)": lambda: ember_generate(plain, ids, n, pack=False)}
        if args.compile:
            fns["ember+compile"] = lambda: ember_generate(model, ids, n, compile=True)
        times = time_interleaved(fns, iters=args.iters, warmup=1)
        rate = {k: B * n / median(v) for k, v in times.items()}
        line = ", ".join(f"{k} {v:.1f} tok/s" for k, v in rate.items())
        ratios = ", ".join(f"{k}/hf {v / rate['hf']:.2f}x" for k, v in rate.items() if k != "hf")
        print(f"batch {B}: {line} | {ratios} | greedy outputs identical: {same}")
        if B == 1:
            hf_rate1 = rate["hf"]
    # roofline at batch 1: bandwidth and decode steps measured in alternating rounds, so a busy
    # spell of this (shared, virtual) machine hits both; the median round is reported
    pack_for_decode(model)
    nbytes = bytes_per_token(model, args.prompt_len + n // 2)
    ids = torch.randint(0, model.cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    runs = [("eager", model, False), ("eager, unpacked", plain, False)]
    runs += [("compiled", model, True)] if args.compile else []
    chain = []
    rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _, _ in runs}
    for _ in range(args.rounds):
        for name, m, comp in runs:
            bw = measure_memory_bandwidth(iters=3)["read"]
            wall, cpu = decode_step_rate(m, ids, n, comp)
            rows[name].append((wall / (bw / nbytes), wall, bw))
        chain.append(product_chain_rate(model, n))
    print(f"roofline: {nbytes / 1e6:.1f} MB read per token (fp32 weights once, the tied head once, the KV cache); "
          f"bandwidth = a {torch.get_num_threads()}-thread sum over 256 MiB, measured before each of "
          f"{args.rounds} rounds")
    for name, vals in rows.items():
        frac, wall, bw = sorted(vals)[len(vals) // 2]
        print(f"ember batch-1 decode step ({name}): median round {wall:.1f} tok/s at {bw / 1e9:.1f} GB/s "
              f"-> {frac:.0%} of roofline (rounds: {', '.join(f'{v[0]:.0%}' for v in vals)})")
    chain_rate = sorted(chain)[len(chain) // 2]
    line = f"weight products alone (same split GEMVs, nothing else): median round {chain_rate:.1f} steps/s"
    if hf_rate1 is not None:
        line += f" = {chain_rate / hf_rate1:.2f}x HF's end-to-end batch-1 rate (the ceiling for ember's ratio)"
    print(line)
    if hf_rate1 is not None:
        bws = sorted(v[2] for vals in rows.values() for v in vals)
        need = 2 * hf_rate1 * nbytes
        print(f"2x HF at batch 1 = {2 * hf_rate1:.1f} tok/s end to end = {need / 1e9:.1f} GB/s of weight reads, "
              f"{need / bws[len(bws) // 2]:.0%} of the median bandwidth measured above")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
