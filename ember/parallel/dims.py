"""ParallelDims: the process topology, and the only code in ember that reads the torchrun environment.

torchrun (or `python -m torch.distributed.run`) sets WORLD_SIZE, RANK and LOCAL_RANK for every process.
`init_distributed()` reads them, starts the process group when there is more than one process (gloo on
CPU, nccl on CUDA with gloo beside it for CPU tensors) and returns a `ParallelDims`. A single process is
a `ParallelDims` with every degree 1 and `mesh=None`, not a separate code path.

Today the only degree is data parallelism (dp_size == world_size); tensor/pipeline degrees will join
as extra mesh dimensions ("dp", "tp", "pp") without changing callers.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ember.errors import EmberError


@dataclass
class ParallelDims:
    """Who this process is and which devices it talks to."""

    world_size: int = 1
    """Number of processes in the job."""
    rank: int = 0
    """This process's global rank (0 .. world_size-1)."""
    local_rank: int = 0
    """This process's rank on its node (selects the GPU)."""
    dp_size: int = 1
    """Data-parallel degree (== world_size until TP/PP exist)."""
    dp_rank: int = 0
    """This process's data-parallel rank: which slice of the global batch it reads."""
    device: torch.device = torch.device("cpu")
    """The device this process computes on (cuda:LOCAL_RANK or cpu)."""
    mesh: Optional["torch.distributed.device_mesh.DeviceMesh"] = None
    """1-D DeviceMesh named ("dp",) over all processes; None on a single process."""

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the one that logs and writes plain files)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is running (world_size > 1)."""
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun / torch.distributed.run (WORLD_SIZE is set)."""
    return bool(os.environ.get("WORLD_SIZE"))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise EmberError(f"environment variable {name}={value!r}: expected an integer. "
                         "HINT: launch with torchrun, which sets WORLD_SIZE, RANK and LOCAL_RANK") from None


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """"auto" | "cpu" | "cuda" | "cuda:N" -> a usable torch.device, or one EmberError saying why not."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise EmberError(f"device={device!r}: not a device, expected cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise EmberError(f"device={device!r}: ember runs on cpu or cuda. HINT: pass --device cpu (or auto)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EmberError(f"device={device!r}: CUDA is not available on this machine (torch {torch.__version__}), "
                             "expected 'cpu' or 'auto'. HINT: pass --device cpu (or auto)")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        elif dev.index >= torch.cuda.device_count():
            raise EmberError(f"device={device!r}: this machine has {torch.cuda.device_count()} GPU(s). "
                             "HINT: pass --device cuda:0")
    return dev


def _pick_device(device: str, local_rank: int) -> torch.device:
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: str = "auto", timeout_s: int = 600) -> ParallelDims:
    """Read the torchrun environment, start the process group if WORLD_SIZE > 1, return the dims.

    device: "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu", "cuda" or "cuda:N".
    timeout_s: how long a collective may wait before the job fails (a wedged rank).
    Calling it again in the same process returns the same topology (the group is reused).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise EmberError(f"RANK={rank} with WORLD_SIZE={world_size}: expected 0 <= RANK < WORLD_SIZE. "
                         "HINT: launch with torchrun --nproc-per-node N")
    dev = _pick_device(device, local_rank)
    if world_size == 1:
        return ParallelDims(device=dev)
    if not dist.is_initialized():
        # nccl for CUDA tensors, gloo for CPU ones (CPU offload, DCP metadata, object collectives)
        backend = "cuda:nccl,cpu:gloo" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, (world_size,), mesh_dim_names=("dp",))
    return ParallelDims(world_size=world_size, rank=rank, local_rank=local_rank, dp_size=world_size,
                        dp_rank=rank, device=dev, mesh=mesh)


def destroy_distributed() -> None:
    """Shut the process group down (no-op on a single process).

    Every rank first meets the others at a barrier, so no peer still has a collective in flight when the
    gloo pairs close: tearing a pair down under a peer's pending send aborted a rank in CI ("terminate
    called without an active exception", SIGABRT at exit).
    """
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # a peer already failed; still release this rank's resources
            pass
        gc.collect()  # drop finished Work objects (and the tensors they hold) while the group is alive
        dist.destroy_process_group()


def barrier(dims: ParallelDims) -> None:
    """Wait for every process (no-op on a single process)."""
    if dims.distributed:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """Mean of a tensor over the data-parallel ranks (a copy; the input is unchanged). For logging."""
    out = value.detach().clone()
    if dims.dp_size > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dims.dp_size
    return out
