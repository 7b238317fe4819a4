"""Benchmark: MB/s of the whole `ember data prepare` pipeline (read, normalise, filter, dedup, scrub,
tokenize, write shards) on the bundled corpus, 1 vs 2 worker processes, in one run.

    .venv/bin/python bench/prepare.py [--vocab-size 4096] [--repeat 1]

The tokenizer is trained once up front (not timed); both runs use it, so they time the same work.
Input MB are the UTF-8 bytes of the documents as read. Prints per-stage seconds, CPU seconds (this
process + workers; "busy cores" = CPU / wall shows how much parallelism the machine actually gave)
and the 2/1 ratio. On a machine whose cores are busy with other work, 2 processes cannot go faster.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from ember.data.bundled import bundled_inputs
from ember.data.pipeline import PrepareConfig, prepare


def cpu_seconds() -> float:
    """User + system CPU of this process and its (finished) children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run(tmp: Path, tokenizer: str, num_proc: int) -> tuple[float, dict, float]:
    out = tmp / f"out{num_proc}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = PrepareConfig(input=bundled_inputs(), out=str(out), tokenizer=tokenizer, num_proc=num_proc, progress=False)
    t0, c0 = time.perf_counter(), cpu_seconds()
    m = prepare(cfg)
    return time.perf_counter() - t0, m, cpu_seconds() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=1, help="runs per setting; the best is reported")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        first = prepare(PrepareConfig(input=bundled_inputs(), out=str(tmp / "tok"), vocab_size=args.vocab_size,
                                      num_proc=2, progress=False))
        print(f"setup: trained a {first['vocab_size']}-token BPE + prepared once in {time.perf_counter() - t0:.1f} s")
        tokenizer = str(tmp / "tok" / "tokenizer")
        results = {}
        for n in (1, 2):
            results[n] = min((run(tmp, tokenizer, n) for _ in range(args.repeat)), key=lambda r: r[0])
        mb = results[1][1]["report"]["input"]["bytes"] / 1e6
        print(f"corpus: {mb:.2f} MB, {results[1][1]['report']['input']['docs']} docs -> "
              f"{results[1][1]['tokens']['train'] + results[1][1]['tokens']['val']:,} tokens; "
              f"os.cpu_count()={os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
        for n, (sec, m, cpu) in results.items():
            print(f"num_proc={n}: {sec:6.2f} s  {mb / sec:6.3f} MB/s  CPU {cpu:6.2f} s (busy {cpu / sec:.2f} cores)  "
                  f"stages {m['report']['seconds']}")
        same = all((tmp / "out1" / e["file"]).read_bytes() == (tmp / "out2" / e["file"]).read_bytes()
                   for e in results[1][1]["splits"]["train"] + results[1][1]["splits"]["val"])
        print(f"ratio (2 procs / 1 proc throughput): {results[1][0] / results[2][0]:.2f}x; identical shards: {same}")


if __name__ == "__main__":
    main()
