"""ParallelDims: the process topology, and the only code in ember that reads the torchrun environment.

torchrun (or `python -m torch.distributed.run`) sets WORLD_SIZE, RANK and LOCAL_RANK for every process.
`init_distributed()` reads them, starts the process group when there is more than one process (gloo on
CPU, nccl on CUDA with gloo beside it for CPU tensors) and returns a `ParallelDims`. A single process is
a `ParallelDims` with every degree 1 and `mesh=None`, not a separate code path.

The degrees come from ParallelConfig (`--parallel.dp-replicate/dp-shard/tp/pp`); their product must be
the world size (`resolve_degrees`, dp_shard=-1 takes what is left). The world DeviceMesh has one
named dimension per degree (MESH_DIMS) plus "dp", the data-parallel dimensions flattened: the loader,
the loss normalisation and the metric sums use "dp" only, so tensor- and pipeline-parallel peers read
the same batch.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from ember.errors import EmberError


MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
"""The world mesh's dimensions, outermost first (torchtitan's order): pipeline stages are furthest
apart, tensor-parallel peers closest (on one node, where the interconnect is fastest)."""


@dataclass
class ParallelDims:
    """Who this process is, its place in the (pp, dp_replicate, dp_shard, tp) grid, and its device.

    world_size = pp x dp_replicate x dp_shard x tp. Data parallelism is dp_replicate x dp_shard: replicas
    (DDP, or HSDP's replicate dimension) times FSDP shards. Processes of one tensor-parallel or
    pipeline group read the same batch; only the data-parallel rank picks the slice.
    """

    world_size: int = 1
    """Number of processes in the job."""
    rank: int = 0
    """This process's global rank (0 .. world_size-1)."""
    local_rank: int = 0
    """This process's rank on its node (selects the GPU)."""
    dp_size: int = 1
    """Data-parallel degree, dp_replicate x dp_shard: how many slices the global batch is cut into."""
    dp_rank: int = 0
    """This process's data-parallel rank: which slice of the global batch it reads."""
    device: torch.device = torch.device("cpu")
    """The device this process computes on (cuda:LOCAL_RANK or cpu)."""
    mesh: Optional["torch.distributed.device_mesh.DeviceMesh"] = None
    """The world DeviceMesh, dimensions MESH_DIMS (sizes pp, dp_replicate, dp_shard, tp; size-1
    dimensions included), with "dp" (dp_replicate x dp_shard flattened) beside them; None on 1 process."""
    dp_replicate: int = 1
    """Data-parallel replicas (DDP; with dp_shard > 1, HSDP's replicate dimension)."""
    dp_shard: int = 1
    """FSDP2 shard degree: parameters, gradients and optimizer state are split over this many processes."""
    tp: int = 1
    """Tensor-parallel degree (Megatron-style column/row splits of every block's projections)."""
    pp: int = 1
    """Pipeline-parallel degree (stages cut by layer)."""
    tp_rank: int = 0
    pp_rank: int = 0
    _dp_mesh: Optional["torch.distributed.device_mesh.DeviceMesh"] = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the one that logs and writes plain files)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is running (world_size > 1)."""
        return self.world_size > 1

    def submesh(self, *names: str):
        """The sub-mesh over `names` (e.g. "tp", "dp", ("dp_replicate", "dp_shard")); None on 1 process."""
        if self.mesh is None:
            return None
        return self.mesh[names[0]] if len(names) == 1 else self.mesh[names]

    @property
    def dp_mesh(self):
        """1-D mesh of the data-parallel peers (dp_replicate x dp_shard flattened)."""
        return self._dp_mesh

    @property
    def tp_mesh(self):
        return self.submesh("tp")

    @property
    def pp_mesh(self):
        return self.submesh("pp")

    @property
    def fsdp_mesh(self):
        """The mesh FSDP2 shards over: 1-D "dp_shard", or 2-D (dp_replicate, dp_shard) for HSDP."""
        if self.mesh is None:
            return None
        return self.submesh("dp_replicate", "dp_shard") if self.dp_replicate > 1 else self.submesh("dp_shard")

    @property
    def dp_group(self):
        """The process group of the data-parallel peers (None: a single process, or dp_size 1 with the
        whole world in one tensor/pipeline group, where sums over data-parallel ranks are no-ops)."""
        if self.mesh is None or self.dp_size == 1:
            return None
        return self.dp_mesh.get_group()

    def describe(self) -> str:
        parts = [f"{n} {getattr(self, n)}" for n in ("dp_replicate", "dp_shard", "tp", "pp") if getattr(self, n) > 1]
        return " x ".join(parts) if parts else "1 process"


def resolve_degrees(world_size: int, dp_replicate: int = 1, dp_shard: int = -1, tp: int = 1, pp: int = 1
                    ) -> tuple[int, int, int, int]:
    """(dp_replicate, dp_shard, tp, pp) with dp_shard=-1 resolved to what is left of the world; an
    EmberError naming the degrees and their product when they do not multiply to world_size."""
    for name, v in (("dp-replicate", dp_replicate), ("tp", tp), ("pp", pp)):
        if v < 1:
            raise EmberError(f"--parallel.{name} {v}: expected a degree >= 1")
    if dp_shard == 0 or dp_shard < -1:
        raise EmberError(f"--parallel.dp-shard {dp_shard}: expected a degree >= 1, or -1 (what is left of the world)")
    fixed = dp_replicate * tp * pp
    if dp_shard == -1:
        if world_size % fixed:
            raise EmberError(f"world size {world_size} is not divisible by dp_replicate {dp_replicate} x tp {tp} x pp "
                             f"{pp} = {fixed}, so dp_shard=-1 has no value. HINT: pick degrees whose product divides "
                             f"{world_size} (--nproc-per-node, or torchrun's --nproc-per-node x --nnodes, sets the world size)")
        dp_shard = world_size // fixed
    product = dp_replicate * dp_shard * tp * pp
    if product != world_size:
        raise EmberError(f"parallel degrees dp_replicate {dp_replicate} x dp_shard {dp_shard} x tp {tp} x pp {pp} = "
                         f"{product}, but the world size is {world_size}. HINT: make the product equal the number "
                         "of processes, or pass --parallel.dp-shard -1 to take what is left")
    return dp_replicate, dp_shard, tp, pp


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


def init_distributed(device: str = "auto", timeout_s: int = 600, parallel=None) -> ParallelDims:
    """Read the torchrun environment, start the process group if WORLD_SIZE > 1, return the dims.

    device: "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu", "cuda" or "cuda:N".
    timeout_s: how long a collective may wait before the job fails (a wedged rank).
    parallel: a ParallelConfig whose degrees lay out the world (None: all data parallel, sharded or
    replicated as its data_parallel says). Calling it again in the same process reuses the group.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise EmberError(f"RANK={rank} with WORLD_SIZE={world_size}: expected 0 <= RANK < WORLD_SIZE. "
                         "HINT: launch with torchrun --nproc-per-node N")
    rep, shard, tp, pp = degrees_from_config(parallel, world_size)
    dev = _pick_device(device, local_rank)
    if world_size == 1:
        return ParallelDims(device=dev)
    if not dist.is_initialized():
        # nccl for CUDA tensors, gloo for CPU ones (CPU offload, DCP metadata, object collectives)
        backend = "cuda:nccl,cpu:gloo" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, (pp, rep, shard, tp), mesh_dim_names=MESH_DIMS)
    dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    coord = mesh.get_coordinate()  # this rank's (pp, dp_replicate, dp_shard, tp) indices
    return ParallelDims(world_size=world_size, rank=rank, local_rank=local_rank, dp_size=rep * shard,
                        dp_rank=coord[1] * shard + coord[2], device=dev, mesh=mesh, dp_replicate=rep,
                        dp_shard=shard, tp=tp, pp=pp, tp_rank=coord[3], pp_rank=coord[0], _dp_mesh=dp_mesh)


def degrees_from_config(parallel, world_size: int) -> tuple[int, int, int, int]:
    """(dp_replicate, dp_shard, tp, pp) for a ParallelConfig (or None) on world_size processes.

    data_parallel "ddp" with dp_replicate and dp_shard left at their defaults puts every data-parallel
    process in dp_replicate (plain replicas); otherwise dp_shard=-1 takes what is left.
    """
    if parallel is None:
        return resolve_degrees(world_size)
    rep, shard = parallel.dp_replicate, parallel.dp_shard
    if parallel.data_parallel == "ddp" and rep == 1 and shard == -1:
        rest = world_size // max(1, parallel.tp * getattr(parallel, "pp", 1))
        rep, shard = max(1, rest), 1
    return resolve_degrees(world_size, rep, shard, parallel.tp, getattr(parallel, "pp", 1))


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
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=dims.dp_group)
        out /= dims.dp_size
    return out
