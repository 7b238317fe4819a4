"""Shared helpers for the bench/ scripts: timing, the machine's fp32 GEMM peak and memory bandwidth.

Benchmarks run ember and its peer side by side in one process. The machine may be shared (a VM,
other jobs on the same cores), so `time_interleaved` alternates the contenders iteration by
iteration: a slow spell then hits both alike and the ratio stays honest.

    from bench.common import measure_gemm_peak_flops, measure_memory_bandwidth, time_interleaved
    peak = measure_gemm_peak_flops()        # FLOP/s of a square fp32 matmul on the current threads
    bw = measure_memory_bandwidth()         # bytes/s: {"copy": r+w, "read": sum}
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device | str = "cpu") -> None:
    """Wait for queued device work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], iters: int, warmup: int = 1, device: str = "cpu") -> list[float]:
    """Wall seconds of `iters` calls of fn after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def time_interleaved(fns: dict[str, Callable[[], object]], iters: int, warmup: int = 1,
                     device: str = "cpu") -> dict[str, list[float]]:
    """Wall seconds per call of each fn, alternating the fns each round (fair on a noisy machine)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def measure_gemm_peak_flops(n: int = 2048, iters: int = 10, dtype: torch.dtype = torch.float32,
                            device: str = "cpu") -> float:
    """FLOP/s of an (n x n) @ (n x n) matmul on the current thread count: the best of `iters` runs.

    The best run (not the median) estimates what the hardware can do; it is the MFU denominator.
    """
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty(n, n, dtype=dtype, device=device)
    ts = time_fn(lambda: torch.mm(a, b, out=c), iters=iters, warmup=2, device=device)
    return 2 * n ** 3 / min(ts)


def measure_memory_bandwidth(mib: int = 256, iters: int = 5, device: str = "cpu") -> dict[str, float]:
    """Memory bandwidth in bytes/s, best of `iters`: 'copy' counts read + write, 'read' a sum's reads."""
    n = mib * 2 ** 20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t_copy = min(time_fn(lambda: dst.copy_(src), iters=iters, warmup=1, device=device))
    t_read = min(time_fn(lambda: src.sum(), iters=iters, warmup=1, device=device))
    return {"copy": 2 * n * 4 / t_copy, "read": n * 4 / t_read}


def machine_line() -> str:
    """One line naming the machine and torch set-up, printed at the top of every bench."""
    cap = torch.backends.cpu.get_cpu_capability()
    return (f"torch {torch.__version__}, {platform.processor() or platform.machine()}, cpu capability {cap}, "
            f"threads {torch.get_num_threads()}")


def hf_from_checkpoint(path: str):
    """(HF model with an ember checkpoint's weights, HF model type): the reference for real weights."""
    import transformers

    from ember.io.checkpoint import load_checkpoint
    from ember.models import hf as hfconv

    model, _ = load_checkpoint(path)
    model_type = hfconv.hf_model_type(model.cfg)
    hf_cfg = hfconv.config_to_hf(model.cfg, model_type)
    cls = transformers.GPT2LMHeadModel if model_type == "gpt2" else transformers.LlamaForCausalLM
    config_cls = transformers.GPT2Config if model_type == "gpt2" else transformers.LlamaConfig
    hf = cls(config_cls(**hf_cfg)).float().eval()
    missing, unexpected = hf.load_state_dict(hfconv.state_dict_to_hf(model.state_dict(), model.cfg, model_type),
                                             strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    hf.tie_weights()
    return hf, model_type
