"""Training checkpoints with exact resume, and export to the plain safetensors checkpoint.

A training checkpoint is a directory `run_dir/checkpoints/step_0000100/`:

    dcp/            model + optimizer, `torch.distributed.checkpoint` (sharded on FSDP2; loads into
                    any world size, 2 -> 1 included, and without a process group)
    trainer.json    step, tokens seen, world/dp size, model config, resolved run config, tokenizer dir
    scheduler.pt    LambdaLR state        (torch.save of plain values; loaded with weights_only=True)
    rank_00000.pt   per-rank: loader state, RNG states (python, numpy, torch cpu, cuda), extra counters

Loading never runs code from these files: DCP goes through `ember.io.safe.dcp_load` (a restricted
unpickler for `.metadata`, `weights_only=True` for bytes items) and the `.pt` files through
`ember.io.safe.load_pt`.

It is written into `checkpoints/.step_0000100.tmp/` by every rank and renamed by rank 0 after a
barrier, so a crash never leaves a directory that looks complete. Multi-node runs need `run_dir` on
a shared file system. `export_final` / `export_to_safetensors` write the inference checkpoint
(`ember.io.checkpoint`: model.safetensors + ember.json + tokenizer/).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from ember.errors import EmberError
from ember.fileio import atomic_write_text
from ember.io.safe import dcp_load, load_pt
from ember.log import log, warn

CKPT_DIR = "checkpoints"
STATE_VERSION = 1


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _world() -> int:
    return dist.get_world_size() if _dist() else 1


@contextlib.contextmanager
def _quiet_dcp():
    """DCP warns that it assumes a single process when no process group exists: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _barrier() -> None:
    if _dist():
        dist.barrier()


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete training checkpoints of a run, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / "trainer.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# ------------------------------------------------------------------------------------ RNG state
def rng_state() -> dict:
    """Python, numpy, torch CPU (and CUDA) generator states as weights_only-loadable values."""
    py = random.getstate()
    npst = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [npst[0], torch.from_numpy(npst[1].astype(np.int64)), int(npst[2]), int(npst[3]),
                       float(npst[4])],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------ save
def save_train_state(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: Any = None, loader: Any = None, *, tokens_seen: int = 0, dp_size: int = 1,
                     dp_rank: int = 0, model_config: Optional[dict] = None, config: Optional[dict] = None,
                     tokenizer_dir: Optional[str] = None, extra: Optional[dict] = None,
                     keep_last: int = 0) -> Path:
    """Save a training checkpoint for `step` (collective: call on every rank). Returns its path.

    `loader` is this rank's data loader (its `state_dict()` is saved per rank); `extra` is a small
    dict of per-rank counters (restored by `load_train_state`). Keeps the newest `keep_last`
    checkpoints (0 = all).
    """
    final = step_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    try:
        _write_state(tmp, step, model, optimizer, scheduler, loader, tokens_seen, dp_size, dp_rank, model_config,
                     config, tokenizer_dir, extra)
    except (OSError, RuntimeError, CheckpointException) as e:  # disk full, quota, permissions: keep what was there
        if isinstance(e, RuntimeError) and "writ" not in str(e).lower():  # torch.save: "file write failed"
            raise
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise EmberError(f"{final}: could not write the checkpoint ({_os_reason(e)}); the run's earlier "
                         "checkpoints are untouched. HINT: free disk space (or pick another --run-dir) and "
                         "resume with --resume") from None
    _barrier()
    if _rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _prune(run_dir, keep_last)
    _barrier()
    return final


# frozen parameters (a LoRA run's base weights) are inputs of the run, not its state: never saved
_TRAINABLE = StateDictOptions(ignore_frozen_params=True)


def _write_state(tmp: Path, step: int, model, optimizer, scheduler, loader, tokens_seen: int, dp_size: int,
                 dp_rank: int, model_config, config, tokenizer_dir, extra) -> None:
    msd, osd = get_state_dict(_parts(model), optimizer, options=_TRAINABLE)
    with _quiet_dcp():
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
    per_rank = {"loader": loader.state_dict() if loader is not None else None, "rng": rng_state(),
                "extra": dict(extra or {}), "dp_rank": dp_rank}
    torch.save(per_rank, tmp / f"rank_{_rank():05d}.pt")
    dp_ranks = [dp_rank] * _world()  # global rank -> data-parallel rank, so a resume reads one rank file
    if _dist():
        dist.all_gather_object(dp_ranks, dp_rank)
    if _rank() == 0:
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        meta = {"version": STATE_VERSION, "step": step, "tokens_seen": tokens_seen, "world_size": _world(),
                "dp_size": dp_size, "dp_ranks": dp_ranks, "model_config": model_config,
                "tokenizer_dir": tokenizer_dir, "config": config}
        atomic_write_text(tmp / "trainer.json", json.dumps(meta, indent=2, default=str) + "\n")


def _os_reason(e: BaseException) -> str:
    """The OS's words for a failed write, also when DCP wrapped the OSError."""
    if isinstance(e, CheckpointException):
        for exc, _ in e.failures.values():
            if isinstance(exc, OSError):
                e = exc
                break
    return getattr(e, "strerror", None) or str(e).splitlines()[0]


def _prune(run_dir: str | Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------ load
def read_trainer_meta(ckpt: str | Path) -> dict:
    path = Path(ckpt) / "trainer.json"
    if not path.is_file():
        raise EmberError(f"{ckpt}: not a training checkpoint (no trainer.json). HINT: pass a "
                         f"run_dir/{CKPT_DIR}/step_XXXXXXX directory, or --resume to pick the latest one.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EmberError(f"{path}: not valid JSON ({e}). HINT: the checkpoint is damaged; "
                         "resume from an older one.") from None


def load_train_state(ckpt: str | Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                     scheduler: Any = None, loader: Any = None, *, dp_size: int = 1,
                     dp_rank: Optional[int] = None, restore_rng: bool = True) -> dict:
    """Restore a training checkpoint into built (and parallelized) objects; collective.

    Model and optimizer load at any layout (DCP reshards DTensors of any mesh). Loader and RNG states are
    per data-parallel rank (tensor- and pipeline-parallel peers share them): with the same dp_size they
    are restored whatever the world size; with another one a loader that can re-cut its sample sequence
    (TokenLoader) continues it and the RNG starts afresh; otherwise a warning says the data order differs.
    dp_rank: this process's data-parallel rank (default: its global rank). Returns trainer.json plus
    this rank's "extra".
    """
    ckpt = Path(ckpt)
    meta = read_trainer_meta(ckpt)
    if optimizer is not None:
        msd, osd = get_state_dict(_parts(model), optimizer, options=_TRAINABLE)
        sd = {"model": msd, "optim": osd}
        with _quiet_dcp():
            dcp_load(sd, ckpt / "dcp")
        # strict=False: the frozen parameters are deliberately absent; every trainable one was loaded by
        # DCP above (it fails on a key the checkpoint lacks)
        set_state_dict(_parts(model), optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
    else:
        load_model_state(ckpt, model)
    if scheduler is not None and (ckpt / "scheduler.pt").is_file():
        scheduler.load_state_dict(load_pt(ckpt / "scheduler.pt"))
    meta["extra"] = {}
    # data-parallel rank -> the first global rank that saved it (tensor/pipeline peers hold the same state)
    saved: dict[int, int] = {}
    for g, d in enumerate(meta.get("dp_ranks") or range(meta.get("world_size", 1))):
        saved.setdefault(int(d), g)
    saved = {d: g for d, g in saved.items() if (ckpt / f"rank_{g:05d}.pt").is_file()}
    my_dp = dp_rank if dp_rank is not None else _rank()
    if meta.get("dp_size", 1) == dp_size and my_dp in saved:
        per_rank = load_pt(ckpt / f"rank_{saved[my_dp]:05d}.pt")
        if loader is not None and per_rank["loader"] is not None:
            loader.load_state_dict(per_rank["loader"])
        if restore_rng:
            set_rng_state(per_rank["rng"])
        meta["extra"] = per_rank.get("extra", {})
        if meta.get("world_size", 1) != _world():
            log(f"{ckpt}: saved on {meta.get('world_size')} process(es), resumed on {_world()} with the same "
                f"data-parallel size {dp_size}: model and optimizer resharded, data order and RNG continued")
    elif saved and loader is not None and _loader_converts(loader):
        per_rank = load_pt(ckpt / f"rank_{saved[min(saved)]:05d}.pt")
        loader.load_state_dict(per_rank["loader"])  # the same global sample sequence, re-cut for dp_size
        meta["extra"] = per_rank.get("extra", {})
        log(f"{ckpt}: data-parallel size {meta.get('dp_size')} -> {dp_size}: model and optimizer resharded, the "
            "data order continued (the global batch must stay the same: batch_size x dp_size); dropout RNG "
            "streams start afresh")
    elif loader is not None or restore_rng:
        warn(f"{ckpt}: saved with world size {meta.get('world_size')} (dp {meta.get('dp_size')}), now "
             f"{_world()} (dp {dp_size}): model and optimizer are resharded, but the data order and RNG "
             "streams start afresh, so losses will not match the original run exactly.")
    return meta


def _loader_converts(loader: Any) -> bool:
    """Loaders whose state can be re-cut for another data-parallel size (TokenLoader says so)."""
    return bool(getattr(loader, "resumes_across_dp_sizes", False))


def load_model_state(ckpt: str | Path, model: nn.Module) -> None:
    """Load only the model weights of a training checkpoint (any world size, no optimizer needed)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    msd = get_model_state_dict(_parts(model))
    sd = {"model": msd}
    with _quiet_dcp():
        dcp_load(sd, Path(ckpt) / "dcp")
    set_model_state_dict(_parts(model), sd["model"])


# ------------------------------------------------------------------------------------ export
def _parts(model: nn.Module) -> nn.Module:
    """What DCP and the state-dict helpers take: a pipeline's view of its stage parts under the whole
    model's parameter names (PipelineModel.state_view), else the model."""
    return model.state_view() if hasattr(model, "state_view") else model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights as plain CPU tensors on rank 0 (collective; other ranks get {}).

    Under pipeline parallelism each pipeline rank gathers its stages' weights (over its data/tensor
    mesh) and rank 0 collects every stage's over the pipeline group."""
    if not hasattr(model, "state_view"):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # every rank gets the full tensors of its own stages; rank 0 of each pipeline group merges them
    sd = get_model_state_dict(model.state_view(), options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    mine = {k: v.detach().cpu() for k, v in sd.items()}
    group = model.pp_group
    dst = dist.get_global_rank(group, 0)
    gathered = [None] * dist.get_world_size(group) if dist.get_rank() == dst else None
    dist.gather_object(mine, gathered, dst=dst, group=group)
    if _rank() != 0:
        return {}
    out: dict[str, torch.Tensor] = {}
    for sd in gathered:
        out.update(sd)
    return out


def export_final(model: nn.Module, out_dir: str | Path, tokenizer_dir: Optional[str | Path] = None,
                 extra: Optional[dict] = None, head: Optional[dict] = None) -> Optional[Path]:
    """Gather the full weights and write the plain checkpoint (rank 0) to `out_dir`; collective.
    `head`: the checkpoint's head kind (default a language model)."""
    sd = full_state_dict(model)
    out = None
    if _rank() == 0:
        from ember.io.checkpoint import save_state_dict

        from ember.parallel import unwrap

        cfg = getattr(unwrap(model), "cfg", None)  # DDP / torch.compile wrappers hold it on the inner model
        if cfg is None:
            raise EmberError("export_final: the model has no .cfg (ModelConfig). HINT: pass an ember Transformer.")
        save_state_dict(sd, cfg, out_dir, tokenizer_dir=tokenizer_dir, extra=extra, head=head)
        out = Path(out_dir)
    _barrier()
    return out


def export_to_safetensors(train_ckpt: str | Path, out_dir: str | Path,
                          tokenizer_dir: Optional[str | Path] = None) -> Path:
    """Turn a training checkpoint (any world size) into a plain safetensors checkpoint; 1 process."""
    from ember.models import ModelConfig, Transformer

    meta = read_trainer_meta(train_ckpt)
    if not meta.get("model_config"):
        raise EmberError(f"{train_ckpt}/trainer.json: no model_config recorded, expected a dict. "
                         "HINT: this checkpoint was not written by ember pretrain.")
    cfg = ModelConfig.from_dict(meta["model_config"])
    model = Transformer(cfg)
    load_model_state(train_ckpt, model)
    tok = tokenizer_dir or meta.get("tokenizer_dir")
    if tok and not Path(tok).is_dir():
        warn(f"tokenizer dir {tok} is gone; exporting without a tokenizer")
        tok = None
    from ember.io.checkpoint import save_state_dict

    save_state_dict(model.state_dict(), cfg, out_dir, tokenizer_dir=tok,
                    extra={"step": meta.get("step"), "tokens_seen": meta.get("tokens_seen")})
    log(f"exported {train_ckpt} -> {out_dir}")
    return Path(out_dir)
