"""Loading that never runs code from a file.

Pickle-based files are the risk: `torch.load(weights_only=False)` and plain `pickle.load` call whatever
a crafted file names. ember reads three kinds of pickled file:

* `.pt` files (scheduler and per-rank training state): `torch.load(weights_only=True)`; a file it
  refuses is reported in one line naming the file (`load_pt`).
* torch DCP's `.metadata`: torch's `FileSystemReader` unpickles it with no restriction. `SafeReader`
  reads it with `MetadataUnpickler`, which admits only the classes DCP writes there (its metadata
  dataclasses, `torch.Size`, dtypes, layouts, paths) and refuses everything else before it runs.
* DCP items stored as bytes (non-tensor optimizer values such as lr and betas): torch's
  `DefaultLoadPlanner.load_bytes` uses `torch.load(weights_only=False)`; `SafeLoadPlanner` uses
  `weights_only=True`.

`dcp_load(state_dict, checkpoint_dir)` is `dcp.load` with both in place: what every ember resume and
export calls.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from ember.errors import EmberError

# (module, name) pairs DCP's filesystem writer puts in `.metadata` (checked on torch 2.6-2.13)
_DCP_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint._extension", "StreamTransformExtension"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch._utils", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("pathlib._local", "PosixPath"), ("pathlib._local", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class UnsafeFileError(EmberError):
    """A file that could only be loaded by running code from it (refused)."""


def _refused(path: str | Path, what: str) -> UnsafeFileError:
    return UnsafeFileError(f"{path}: refused to load: {what}. ember loads only files it can read without "
                           "running code from them. HINT: this is not a file ember wrote (or it was "
                           "tampered with); use a checkpoint from a source you trust, or re-create it")


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP `.metadata` and nothing else: any other global is refused before it is called."""

    def __init__(self, file: Any, path: str | Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _refused(self.path, f"it names {module}.{name}, which is not part of a DCP checkpoint's metadata")


def load_dcp_metadata(path: str | Path) -> Any:
    """Read a DCP `.metadata` file with `MetadataUnpickler`."""
    try:
        with open(path, "rb") as f:
            return MetadataUnpickler(f, path).load()
    except UnsafeFileError:
        raise
    except FileNotFoundError:
        raise EmberError(f"{path}: missing. HINT: the checkpoint is incomplete; resume from an older one") from None
    except Exception as e:  # truncated or garbled pickle
        raise EmberError(f"{path}: not a readable DCP metadata file ({type(e).__name__}: {e}). "
                         "HINT: the checkpoint is damaged; resume from an older one") from None


class SafeReader(FileSystemReader):
    """torch's `FileSystemReader` whose metadata is read by `MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        metadata = load_dcp_metadata(path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """`DefaultLoadPlanner` that reads bytes items with `torch.load(weights_only=True)`."""

    checkpoint_id: str = "checkpoint"

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        obj = load_pt(value, where=f"{self.checkpoint_id} (item {read_item.dest_index.fqn})")
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner uses

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def dcp_load(state_dict: dict, checkpoint_dir: str | Path) -> None:
    """`torch.distributed.checkpoint.load` into `state_dict`, never running code from the files."""
    import torch.distributed.checkpoint as dcp

    from torch.distributed.checkpoint.api import CheckpointException

    load_dcp_metadata(Path(checkpoint_dir) / ".metadata")  # refuse a crafted file before DCP's fallbacks
    planner = SafeLoadPlanner()
    planner.checkpoint_id = str(checkpoint_dir)
    try:
        dcp.load(state_dict, storage_reader=SafeReader(str(checkpoint_dir)), planner=planner)
    except CheckpointException as e:  # DCP wraps each rank's error; ours is the one-line message
        for exc, _trace in e.failures.values():
            if isinstance(exc, EmberError):
                raise exc from None
        raise


def _unpickling_reason(e: Exception) -> str:
    """The informative line of torch's weights_only refusal ("... unsupported GLOBAL posix.system ...")."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln:
            return ln
    return lines[-1] if lines else type(e).__name__


def load_pt(file: str | Path | io.BytesIO, where: str | None = None, map_location: str = "cpu") -> Any:
    """`torch.load(file, weights_only=True)`; a refused or unreadable file is one EmberError naming it."""
    name = where or str(file)
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refused(name, f"it is not a plain tensor/number file ({_unpickling_reason(e)[:200]})") from None
    except FileNotFoundError:
        raise EmberError(f"{name}: missing. HINT: the checkpoint is incomplete") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise EmberError(f"{name}: not a readable torch file ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}). "
                         "HINT: the file is damaged or is not one of ember's") from None
