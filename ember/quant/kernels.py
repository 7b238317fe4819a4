"""CPU kernels for weight-only int8 / int4 linears, compiled from `qkernels.c` on first use.

torch ships CPU kernels for these products (`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`),
but on an AVX2 laptop CPU they run slower than the fp32 GEMV they replace (bench/quant_decode.py prints
both). A decode step at batch 1..16 is bound by the bytes of weight it streams, so the kernels here
read each quantized weight row once for all input rows, widen it to fp32 in registers and accumulate
with FMA, one output row per thread (each row's arithmetic is the same whatever the batch: batch
invariant).

The C file is compiled once per machine with the system C compiler (`cc -O3 -march=native -fopenmp`)
into `$EMBER_CACHE_DIR/kernels/` (default `~/.cache/ember/kernels/`), written to a temp file and
renamed into place, and loaded with ctypes. Without a compiler (or with EMBER_QUANT_KERNELS=torch)
the modules fall back to torch's own ops, with the same results to float rounding.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

_SRC = Path(__file__).with_name("qkernels.c")
_lib: Optional[ctypes.CDLL] = None
_tried = False


def cache_dir() -> Path:
    root = os.environ.get("EMBER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ember")
    return Path(root) / "kernels"


def _cpu_id() -> str:
    try:
        flags = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith(("flags", "model name"))][:2]
    except OSError:
        flags = []
    return platform.machine() + "|".join(flags)


def _build() -> Optional[ctypes.CDLL]:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc/gcc) on PATH")
    src = _SRC.read_bytes()
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
    key = hashlib.sha256(src + " ".join(flags).encode() + _cpu_id().encode() + cc.encode()).hexdigest()[:16]
    out = cache_dir() / f"ember_qkernels_{key}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            r = subprocess.run([cc, *flags, str(_SRC), "-o", tmp], capture_output=True, text=True, timeout=120)
            if r.returncode:
                raise OSError(f"{cc} failed: {r.stderr.strip()[:500]}")
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.ember_q8_linear.argtypes = [p, p, p, p, p, i64, i64, i64, i32]
    lib.ember_q4_linear.argtypes = [p, p, p, p, p, p, p, i64, i64, i64, i64, i32]
    lib.ember_q8_linear.restype = lib.ember_q4_linear.restype = None
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, or None (no compiler, a failed build, or EMBER_QUANT_KERNELS=torch)."""
    global _lib, _tried
    if not _tried:
        _tried = True
        if os.environ.get("EMBER_QUANT_KERNELS", "").lower() != "torch":
            try:
                _lib = _build()
            except (OSError, subprocess.SubprocessError) as e:
                warnings.warn(f"ember.quant: could not build the CPU kernels ({e}); using torch's slower ops. "
                              "HINT: install a C compiler (apt-get install gcc)", stacklevel=2)
    return _lib


def available() -> bool:
    return library() is not None


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def q8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x (M, K) fp32 contiguous, q (N, K) int8, scale (N,) fp32 -> (M, N)."""
    M, K = x.shape
    N = q.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    library().ember_q8_linear(_ptr(x), _ptr(q), _ptr(scale), _ptr(bias), _ptr(y), M, N, K, torch.get_num_threads())
    return y


def q4_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              bias: Optional[torch.Tensor], group_size: int) -> torch.Tensor:
    """x (M, K) fp32 contiguous, q (N, K/2) uint8 (layout in qkernels.c), scale and zero (N, K/G) fp16 -> (M, N)."""
    M, K = x.shape
    N = q.shape[0]
    xsum = x.view(M, K // group_size, group_size).sum(-1).contiguous()
    y = torch.empty(M, N, dtype=torch.float32)
    library().ember_q4_linear(_ptr(x), _ptr(xsum), _ptr(q), _ptr(scale), _ptr(zero), _ptr(bias), _ptr(y),
                              M, N, K, group_size, torch.get_num_threads())
    return y
