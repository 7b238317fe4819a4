"""Serving throughput and latency: `ember serve` (over HTTP) vs transformers `generate` on the same weights.

    .venv/bin/python bench/serve.py --checkpoint runs/smollm2                 # 64 requests, both arrival modes
    .venv/bin/python bench/serve.py --checkpoint runs/smollm2 --quick         # 16 short requests (smoke run)
    .venv/bin/python bench/serve.py --checkpoint runs/smollm2 --batch-invariant off

Workload (fixed seed): `--requests` prompts of random token ids, lengths uniform in [16, --max-prompt],
each asking for exactly its own number of new tokens, uniform in [16, --max-output] (`ignore_eos`,
so both sides produce the same token counts). ember: the real HTTP server (uvicorn, 127.0.0.1) in this
process, `--clients` streaming clients, requests sent all at once or with Poisson arrivals at `--rate`
per second. transformers: `model.generate` on static, left-padded batches of `--hf-batch` requests in
arrival order (each batch runs as long as its longest request), and one by one on the first
`--one-by-one` requests. Throughput counts the tokens each request asked for (padding excluded).

Reported: output tokens/s, requests/s, time to first token and inter-token latency (p50/p99, ember;
HF static has no streaming: its TTFT is the time its batch finishes), and KV memory: the mean share of
allocated KV slots holding no token (internal fragmentation, sampled every 50 ms while requests run)
and the peak share of the pool in use.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import hf_from_checkpoint, machine_line  # noqa: E402


def workload(n: int, max_prompt: int, max_output: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = rng.randint(16, max_prompt)
        out.append(([rng.randrange(vocab) for _ in range(p)], rng.randint(16, max_output)))
    return out


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# ------------------------------------------------------------------------------------- ember
def stream_one(port: int, name: str, prompt: list[int], n: int) -> dict:
    """One streamed completion; times of arrival of each chunk."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    body = {"model": name, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    times, usage = [], None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        ev = json.loads(line[6:])
        if ev.get("usage"):
            usage = ev["usage"]
        if ev.get("choices"):
            times.append(time.perf_counter())
    conn.close()
    return {"start": t0, "times": times, "tokens": usage["completion_tokens"] if usage else len(times)}


def run_ember(server, reqs, clients: int, arrival: str, rate: float) -> dict:
    rng = random.Random(1)
    offsets, t = [], 0.0
    for _ in reqs:
        offsets.append(t if arrival == "poisson" else 0.0)
        t += rng.expovariate(rate)
    results: list = [None] * len(reqs)
    sem = threading.Semaphore(clients)
    kv_samples, stop = [], threading.Event()

    def sample_kv():
        eng = server.engine
        while not stop.is_set():
            u = eng.kv_usage()
            if u["blocks_used"]:
                kv_samples.append((u["waste"], u["blocks_used"] / u["blocks_total"]))
            time.sleep(0.05)

    def client(i, t_start):
        delay = t_start + offsets[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        with sem:
            results[i] = stream_one(server.port, server.name, reqs[i][0], reqs[i][1])

    sampler = threading.Thread(target=sample_kv, daemon=True)
    sampler.start()
    t_start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i, t_start)) for i in range(len(reqs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t_start
    stop.set()
    sampler.join()
    assert all(r["tokens"] == n for r, (_, n) in zip(results, reqs)), "a request came back short"
    ttft = [r["times"][0] - r["start"] for r in results]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(n for _, n in reqs)
    return {"tok_s": tokens / wall, "req_s": len(reqs) / wall, "wall": wall, "ttft": ttft, "itl": itl,
            "waste": statistics.mean(w for w, _ in kv_samples) if kv_samples else 0.0,
            "peak": max((u for _, u in kv_samples), default=0.0)}


# ----------------------------------------------------------------------------------- transformers
@torch.inference_mode()
def run_hf(hf, reqs, batch: int, pad_id: int) -> dict:
    t0 = time.perf_counter()
    done_at = []
    for i in range(0, len(reqs), batch):
        chunk = reqs[i:i + batch]
        T = max(len(p) for p, _ in chunk)
        n = max(k for _, k in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for b, (p, _) in enumerate(chunk):
            ids[b, T - len(p):] = torch.tensor(p)
            mask[b, T - len(p):] = 1
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=pad_id, use_cache=True)
        done_at += [time.perf_counter() - t0] * len(chunk)
    wall = time.perf_counter() - t0
    tokens = sum(k for _, k in reqs)
    return {"tok_s": tokens / wall, "req_s": len(reqs) / wall, "wall": wall, "ttft": done_at, "itl": []}


def row(name: str, r: dict, base: float | None) -> str:
    ms = lambda xs, q: f"{pct(xs, q) * 1e3:8.0f}" if xs else "       -"  # noqa: E731
    kv = f"{r['waste'] * 100:6.1f}% {r['peak'] * 100:6.1f}%" if "waste" in r else "      -       -"
    ratio = f"{r['tok_s'] / base:6.2f}x" if base else "      -"
    return (f"{name:<34} {r['tok_s']:9.1f} {r['req_s']:7.3f} {ms(r['ttft'], 50)} {ms(r['ttft'], 99)} "
            f"{ms(r['itl'], 50)} {ms(r['itl'], 99)} {kv} {ratio}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="runs/smollm2")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--max-output", type=int, default=256)
    ap.add_argument("--clients", type=int, default=64, help="concurrent HTTP clients")
    ap.add_argument("--max-num-seqs", type=int, default=32, help="the engine's running batch")
    ap.add_argument("--arrival", choices=["all", "poisson", "both"], default="both")
    ap.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals per second")
    ap.add_argument("--hf-batch", type=int, default=8)
    ap.add_argument("--one-by-one", type=int, default=4, help="HF one by one on this many requests (0: skip)")
    ap.add_argument("--batch-invariant", choices=["on", "off"], default="on")
    ap.add_argument("--quick", action="store_true", help="16 requests, prompts <= 128, outputs <= 64")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.max_prompt, args.max_output = 16, 128, 64
    if not os.path.isdir(args.checkpoint):
        sys.exit(f"bench/serve.py: no checkpoint at {args.checkpoint}. HINT: see the README's SmolLM2 section "
                 "(ember convert --from-gguf ...) or pass --checkpoint DIR.")
    print(machine_line())
    from ember.infer.engine import EngineConfig
    from ember.recipes.serve import Config, ServerThread

    server = ServerThread(Config(checkpoint=args.checkpoint, max_queue=4096, engine=EngineConfig(
        batch_invariant=args.batch_invariant == "on", max_num_seqs=args.max_num_seqs)))
    tok = server.engine.tokenizer
    reqs = workload(args.requests, args.max_prompt, args.max_output, tok.vocab_size)
    n_prompt, n_out = sum(len(p) for p, _ in reqs), sum(k for _, k in reqs)
    print(f"workload: {len(reqs)} requests, {n_prompt} prompt + {n_out} output tokens "
          f"(prompts 16-{args.max_prompt}, outputs 16-{args.max_output}); engine: batch-invariant "
          f"{args.batch_invariant}, {server.engine.pool.num_blocks} KV blocks of {server.engine.pool.block_size}, "
          f"{args.max_num_seqs} running, {args.clients} clients")
    stream_one(server.port, server.name, reqs[0][0][:16], 4)  # warm up
    results = {}
    modes = ["all", "poisson"] if args.arrival == "both" else [args.arrival]
    for mode in modes:
        label = "all at once" if mode == "all" else f"Poisson {args.rate}/s"
        results[f"ember serve ({label})"] = run_ember(server, reqs, args.clients, mode, args.rate)
        print(f"  ember ({label}): {results[f'ember serve ({label})']['wall']:.1f} s", flush=True)
    server.stop()
    hf, _ = hf_from_checkpoint(args.checkpoint)
    pad = tok.fill_id
    results[f"HF generate, static batches of {args.hf_batch}"] = hf_static = run_hf(hf, reqs, args.hf_batch, pad)
    print(f"  HF static: {hf_static['wall']:.1f} s", flush=True)
    if args.one_by_one:
        sub = reqs[: args.one_by_one]
        results[f"HF generate, one by one ({len(sub)} req.)"] = run_hf(hf, sub, 1, pad)
    print()
    print(f"{'':<34} {'out tok/s':>9} {'req/s':>7} {'TTFT p50':>8} {'p99':>8} {'ITL p50':>8} {'p99':>8} "
          f"{'KV waste':>7} {'peak':>7} {'vs HF st.':>7}")
    for name, r in results.items():
        print(row(name, r, hf_static["tok_s"]))
    print("(times in ms; HF static: TTFT = when its batch finished; KV waste = allocated slots holding no token)")


if __name__ == "__main__":
    main()
