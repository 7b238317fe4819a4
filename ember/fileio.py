"""Atomic writes: write to a temporary sibling, fsync, then rename over the target.

A crash or Ctrl-C mid-write leaves the old file (or nothing), never a half-written one. Files and
directories get the modes the user's umask gives (mkstemp/mkdtemp alone would make them 0600/0700, so
a teammate or a serving account could not read a checkpoint).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def umask() -> int:
    """The process umask (read without changing it for longer than the call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(parent: str | Path, prefix: str) -> Path:
    """A new temporary directory in `parent` (created if needed), with the umask's mode."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~umask())
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; on success it replaces `path` whole."""
    path = Path(path)
    tmp = make_temp_dir(path.parent, prefix=f".{path.name}.")
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_out_dir(out: str | Path, overwrite: bool = False, sources: tuple = (), flag: str = "--out") -> Path:
    """Refuse an output directory that would lose data, before any work is done.

    It must not be a file; it must be new or empty unless `overwrite`; it must neither be, contain nor
    lie inside any of `sources` (replacing it would delete them); its nearest existing parent must be
    writable.
    """
    from ember.errors import EmberError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EmberError(f"{flag} {out}: is a file, expected a directory. HINT: choose a new {flag} directory")
    o = out.resolve()
    for src in sources:
        s = Path(src).resolve()
        if o == s or s.is_relative_to(o) or o.is_relative_to(s):
            rel = "is" if o == s else ("contains" if s.is_relative_to(o) else "is inside")
            raise EmberError(f"{flag} {out}: {rel} the source {src}; writing there would delete it. "
                             f"HINT: choose a {flag} directory outside {src}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise EmberError(f"{flag} {out}: already exists and is not empty; refusing to replace it. "
                         f"HINT: choose a new {flag} directory, or add --overwrite")
    check_writable(out, flag)
    return out


def check_writable(path: str | Path, flag: str = "--out") -> None:
    """Fail before any work when `path` (a directory, or a file to create) could not be written: its
    nearest existing ancestor must be a writable directory."""
    from ember.errors import EmberError

    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    if p.is_file() and p != Path(path).resolve():
        raise EmberError(f"{flag} {path}: {p} is a file, not a directory. HINT: choose another path")
    target = p if p.is_dir() else p.parent
    if not os.access(target, os.W_OK | os.X_OK):
        raise EmberError(f"{flag} {path}: {target} is not a writable directory. HINT: choose a path you can write to")
