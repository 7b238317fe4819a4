"""Generate text from a checkpoint (trained with `ember pretrain` or imported with `ember convert`).

    ember generate --checkpoint runs/small/final --prompt "Once upon a time" --max-new-tokens 100
    ember generate --checkpoint DIR --prompt "Q: 2+2=" --temperature 0 --stop "\\n"
    ember generate --checkpoint DIR --prompt-file prompts.jsonl --batch-size 8 --out completions.jsonl

A single prompt streams its continuation to stdout as it is produced (statistics go to stderr).
A prompt file (one prompt per line, or .jsonl with a "prompt" field) is generated in batches and
printed per prompt at the end, or written as JSONL to --out. Temperature 0 is greedy decoding.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from ember.errors import EmberError
from ember.fileio import atomic_write_text
from ember.infer import api
from ember.log import log
from ember.recipes.sampling import SamplingFlags


@dataclass
class Config(SamplingFlags):
    """Generate text from a checkpoint: one streamed prompt, or a prompt file in batches."""

    prompt: Optional[str] = None
    """The prompt text (an empty string samples unconditionally, starting from the EOS token)."""
    prompt_file: Optional[str] = None
    """A file of prompts: one per line, or .jsonl with a "prompt" field per line."""
    num_samples: int = 1
    """Samples per prompt."""
    batch_size: int = 8
    """Sequences generated together (prompt file / several samples)."""
    truncate: bool = False
    """Left-truncate prompts that do not fit the context window instead of stopping with an error."""
    speculative: Optional[Literal["ngram"]] = None
    """Speculative decoding for greedy runs: "ngram" proposes the tokens that followed the last few tokens
    earlier in the text (prompt lookup): the same output, faster when the output copies from the prompt."""
    out: Optional[str] = None
    """Write results as JSONL here ({"index", "prompt", "sample", "completion"} per line)."""


def unescape(s: str) -> str:
    """`\\n` and `\\t` typed on a command line -> newline and tab."""
    return s.replace("\\n", "\n").replace("\\t", "\t")


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per non-empty line) or a .jsonl file (a "prompt" field per line)."""
    p = Path(path)
    if not p.is_file():
        raise EmberError(f"--prompt-file {path}: no such file. HINT: one prompt per line, or .jsonl with a \"prompt\" field.")
    lines = p.read_text(encoding="utf-8").splitlines()
    if p.suffix != ".jsonl":
        return [unescape(line) for line in lines if line.strip()]
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EmberError(f"{path}:{n}: not valid JSON ({e.msg}), expected an object with a \"prompt\" field.") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise EmberError(f"{path}:{n}: expected an object with a string \"prompt\" field, got {line[:80]!r}.")
        prompts.append(row["prompt"])
    if not prompts:
        raise EmberError(f"{path}: no prompts found. HINT: one prompt per line, or .jsonl with a \"prompt\" field.")
    return prompts


def _prompts(cfg: Config) -> list[str]:
    if (cfg.prompt is None) == (cfg.prompt_file is None):
        raise EmberError("ember generate: give exactly one of --prompt TEXT or --prompt-file FILE.")
    return [cfg.prompt] if cfg.prompt is not None else read_prompts(cfg.prompt_file)


def _write_results(cfg: Config, prompts: list[str], texts: list[str]) -> None:
    rows = [{"index": i, "prompt": prompts[i // cfg.num_samples], "sample": i % cfg.num_samples, "completion": t}
            for i, t in enumerate(texts)]
    if cfg.out:
        atomic_write_text(cfg.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        log(f"wrote {len(rows)} completions to {cfg.out}", file=sys.stderr)
        return
    for r in rows:
        log(f"=== prompt {r['index'] // cfg.num_samples}, sample {r['sample']} ===")
        log(r["prompt"] + r["completion"])


def main(cfg: Config) -> int:
    cfg.require_checkpoint("generate")  # before reading prompts
    if cfg.out:
        from ember.fileio import check_writable

        check_writable(cfg.out)  # before the work, not after it
    prompts = _prompts(cfg)
    params = cfg.sampling_params()
    if cfg.num_samples < 1 or cfg.batch_size < 1 or cfg.max_new_tokens < 0:
        raise EmberError("ember generate: --num-samples and --batch-size must be >= 1, --max-new-tokens >= 0.")
    model, tok = cfg.load("generate")
    ids = api.encode_prompts(tok, prompts, model.cfg.block_size, cfg.max_new_tokens, cfg.truncate)
    ids = [p for p in ids for _ in range(cfg.num_samples)]
    single = len(ids) == 1 and not cfg.out
    counter = {"tokens": 0}

    def stream(index: int, text: str) -> None:
        if single:
            sys.stdout.write(text)
            sys.stdout.flush()

    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    t0 = time.perf_counter()
    texts = api.generate_texts(model, tok, ids, cfg.max_new_tokens, params, [unescape(s) for s in cfg.stop], (),
                               generator, stream, cfg.batch_size, counter, cfg.speculative)
    dt = time.perf_counter() - t0
    if single:
        sys.stdout.write("\n")
    else:
        _write_results(cfg, prompts, texts)
    log(f"[{counter['tokens']} tokens in {dt:.2f} s: {counter['tokens'] / max(dt, 1e-9):.1f} tok/s]", file=sys.stderr)
    return 0
