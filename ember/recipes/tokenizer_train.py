"""Train a byte-level BPE tokenizer on text files (.txt, .jsonl) and save it to a directory.

Example: ember tokenizer train --input data/tinyshakespeare.txt --vocab-size 4096 --out runs/tok

The directory holds tokenizer.json (HF tokenizers), tokenizer_config.json (for transformers) and
ember_tokenizer.json; it is written atomically. Special tokens: <|endoftext|> (end of document),
<|pad|>, <|im_start|>, <|im_end|> (ChatML).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ember.errors import EmberError
from ember.log import log


@dataclasses.dataclass
class Config:
    """Train a byte-level BPE tokenizer."""

    input: list[str] = dataclasses.field(default_factory=list)
    """input files: .txt (one text per line) or .jsonl (one JSON object per line), optionally .xz/.gz/.bz2"""
    out: str = "runs/tokenizer"
    """output directory (must be new or empty unless --overwrite)"""
    overwrite: bool = False
    """replace an existing, non-empty --out (atomically: the old one stays until the new one is complete)"""
    vocab_size: int = 8192
    """vocabulary size, including the 256 byte tokens and the special tokens"""
    text_field: str = "text"
    """the field holding the text in .jsonl inputs"""
    min_frequency: int = 2
    """a pair must occur at least this often to be merged"""
    pattern: str = "cl100k"
    """split regex before BPE: cl100k (GPT-4 style), gpt2, o200k, or a regex"""
    special_tokens: list[str] = dataclasses.field(
        default_factory=lambda: ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    )
    """special tokens (first ids); the first is end-of-text/document separator"""
    progress: bool = True
    """show a progress bar"""


def main(cfg: Config) -> int:
    from ember.tokenizer import train_bpe

    if not cfg.input:
        raise EmberError("--input: no input files given, expected one or more .txt/.jsonl files")
    from ember.fileio import check_out_dir

    paths = [Path(p) for p in cfg.input]
    for p in paths:
        if p.is_dir():
            raise EmberError(f"{p}: is a directory, expected a file. HINT: list its files, e.g. --input {p}/*.txt")
        if not p.is_file():
            raise EmberError(f"{p}: no such input file. HINT: check the --input paths")
        if p.stat().st_size == 0:
            raise EmberError(f"{p}: the input file is empty, expected text")
    check_out_dir(cfg.out, cfg.overwrite, sources=tuple(paths))
    total = sum(p.stat().st_size for p in paths)
    log(f"training BPE: vocab_size={cfg.vocab_size}, pattern={cfg.pattern}, {len(paths)} file(s), {total / 1e6:.1f} MB on disk")
    t0 = time.perf_counter()
    tok = train_bpe(
        paths, cfg.vocab_size, special_tokens=cfg.special_tokens, pattern=cfg.pattern,
        min_frequency=cfg.min_frequency, text_field=cfg.text_field, show_progress=cfg.progress,
    )
    tok.meta["eos_token"] = cfg.special_tokens[0] if cfg.special_tokens else None
    out = tok.save(cfg.out)
    dt = time.perf_counter() - t0
    eos = tok.meta["eos_token"]
    log(f"saved {out} (vocab_size={tok.vocab_size}, eos={eos!r} id {tok.token_to_id(eos) if eos else None}) in {dt:.1f} s")
    return 0
