"""Paths anywhere fsspec reaches: local paths, `file://`, `s3://`, `gs://`, `hf://`, `memory://`, ...

`ember data prepare` reads inputs and writes datasets through these helpers, and `TokenLoader` reads a
prepared dataset at a URL through a local cache (`ember.data.cache`). A plain path (no `scheme://`)
stays a local path and never imports fsspec. Object-store protocols need their fsspec package
(`s3fs`, `gcsfs`, `huggingface_hub`); a missing one is a clear error naming the package.
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path

from ember.errors import EmberError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_MAGIC = re.compile(r"[*?\[]")
# protocols whose storage is private to one process (a Ray worker cannot see what the driver wrote)
PROCESS_LOCAL = ("memory",)


def is_url(path: str | os.PathLike) -> bool:
    """True for `scheme://...` (file:// included); False for a plain local path."""
    return isinstance(path, str) and bool(_SCHEME.match(path))


def protocol(url: str) -> str:
    return url.split("://", 1)[0].lower() if is_url(url) else "file"


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL; a clear error when its package is missing."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise EmberError(f"{url}: reading {protocol(url)}:// needs a package that is not installed ({e}). "
                         "HINT: pip install s3fs (s3://), gcsfs (gs://) or huggingface_hub (hf://)") from None
    except ValueError as e:
        raise EmberError(f"{url}: not a URL fsspec knows ({e}). HINT: check the scheme") from None
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or a URL."""
    if is_url(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return str(Path(base, *parts))


def sibling(path: str, name: str) -> str:
    """`name` in the same directory as `path` (a URL or a local path)."""
    if is_url(path):
        head = path.rstrip("/").rsplit("/", 1)[0]
        return f"{head}/{name}"
    return str(Path(path).resolve().parent / name)


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] if is_url(path) else Path(path).resolve().name


def open_file(path: str | Path, mode: str = "rb"):
    """A file object for a local path or a URL."""
    if not is_url(path):
        return open(path, mode)
    fs, p = filesystem(str(path))
    return fs.open(p, mode)


def file_identity(path: str | Path) -> dict:
    """What changes when a file changes: size and modification time (or ETag/version on object stores)."""
    if not is_url(path):
        st = os.stat(path)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    fs, p = filesystem(str(path))
    info = fs.info(p)
    stamp = next((info[k] for k in ("mtime", "LastModified", "last_modified", "ETag", "etag", "created",
                                    "version_id", "md5Hash") if info.get(k) is not None), None)
    return {"size": info.get("size"), "stamp": str(stamp)}


def expand(paths: list[str], accept) -> list[str]:
    """Every input file, in order: a file as given, a directory's accepted files (sorted, recursive), a
    glob's accepted matches (sorted). `accept(name) -> bool` says which names are readable inputs."""
    import glob as _glob

    out: list[str] = []
    for p in map(str, paths):
        if is_url(p):
            fs, inner = filesystem(p)
            proto = p.split("://", 1)[0]

            def url(x: str) -> str:
                x = fs.unstrip_protocol(x)
                return x if x.startswith(proto + "://") else f"{proto}://{x.split('://', 1)[-1]}"

            if _MAGIC.search(inner):
                hits = sorted(x for x in fs.glob(inner) if fs.isfile(x))
                if not hits:
                    raise EmberError(f"{p}: the pattern matches no file. HINT: check the --input glob")
                out += [url(x) for x in hits if accept(x)]
            elif fs.isdir(inner):
                out += [url(x) for x in sorted(fs.find(inner)) if accept(x)]
            elif fs.isfile(inner):
                out.append(p)
            else:
                raise EmberError(f"{p}: no such file or directory. HINT: check the --input URL")
        elif _MAGIC.search(p) and not Path(p).exists():
            hits = sorted(x for x in _glob.glob(p, recursive=True) if Path(x).is_file())
            if not hits:
                raise EmberError(f"{p}: the pattern matches no file. HINT: check the --input glob")
            out += [x for x in hits if accept(x)]
        elif Path(p).is_dir():
            out += sorted(str(f) for f in Path(p).rglob("*") if f.is_file() and accept(f.name))
        elif Path(p).is_file():
            out.append(p)
        else:
            raise EmberError(f"{p}: no such file or directory. HINT: check the --input path")
    return out
