"""One rank-0 print helper for the library (no bare `print` elsewhere in ember/)."""

from __future__ import annotations

import sys


def rank() -> int:
    """This process's rank; 0 unless torch.distributed is imported and initialised (never imports torch)."""
    dist = sys.modules.get("torch.distributed")
    return dist.get_rank() if dist is not None and dist.is_available() and dist.is_initialized() else 0


def log(*parts: object, all_ranks: bool = False, file=None) -> None:
    """Print on rank 0 only (or on every rank, prefixed, with `all_ranks=True`)."""
    r = rank()
    if r == 0 or all_ranks:
        prefix = f"[rank{r}] " if all_ranks else ""
        print(prefix + " ".join(str(p) for p in parts), file=file or sys.stdout, flush=True)


def warn(*parts: object) -> None:
    log("warning:", *parts, file=sys.stderr)
