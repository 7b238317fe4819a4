"""Benchmark: MB/s of the whole `ember data prepare` pipeline (read, normalise, filter, dedup, scrub,
tokenize, write shards) on the bundled corpus: the local executor with 1 and 2 worker processes, and
the Ray executor (a local Ray instance of 2 CPUs, started before timing), in one run.

    .venv/bin/python bench/prepare.py [--vocab-size 4096] [--repeat 1] [--files 8] [--no-ray]

The corpus is cut into --files input files (the Ray executor's unit of work is one file).
On this 2-core machine Ray cannot be faster than the local executor: it schedules the same CPU work
through its object store and runs a cluster-wide shuffle for dedup, a fixed cost of seconds. The point
here is that the output is identical (checked below); the speed comes from a cluster, where stage 1
(normalise, filter, MinHash: most of the time) scales with the nodes, one task per file.

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


def split_corpus(tmp: Path, n_files: int) -> list[str]:
    """The bundled corpus's documents spread round-robin over `n_files` JSONL files."""
    import json

    from ember.data.readers import ReadConfig, ReadStats, read_documents

    d = tmp / "corpus"
    d.mkdir(exist_ok=True)
    outs = [open(d / f"part{i:03d}.jsonl", "w", encoding="utf-8") for i in range(n_files)]
    for k, text in enumerate(read_documents(bundled_inputs(), ReadConfig(), ReadStats())):
        outs[k % n_files].write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    for f in outs:
        f.close()
    return [str(d)]


def run(tmp: Path, inputs: list[str], tokenizer: str, num_proc: int, executor: str = "local") -> tuple[float, dict, float]:
    out = tmp / f"out{num_proc}{executor}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = PrepareConfig(input=inputs, out=str(out), tokenizer=tokenizer, num_proc=num_proc, progress=False,
                        executor=executor)
    t0, c0 = time.perf_counter(), cpu_seconds()
    m = prepare(cfg)
    return time.perf_counter() - t0, m, cpu_seconds() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=1, help="runs per setting; the best is reported")
    ap.add_argument("--files", type=int, default=8, help="input files the corpus is cut into")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray executor")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        first = prepare(PrepareConfig(input=bundled_inputs(), out=str(tmp / "tok"), vocab_size=args.vocab_size,
                                      num_proc=2, progress=False))
        print(f"setup: trained a {first['vocab_size']}-token BPE + prepared once in {time.perf_counter() - t0:.1f} s")
        tokenizer = str(tmp / "tok" / "tokenizer")
        inputs = split_corpus(tmp, args.files)
        results = {}
        for n in (1, 2):
            results[n] = min((run(tmp, inputs, tokenizer, n) for _ in range(args.repeat)), key=lambda r: r[0])
        mb = results[1][1]["report"]["input"]["bytes"] / 1e6
        print(f"corpus: {mb:.2f} MB, {results[1][1]['report']['input']['docs']} docs -> "
              f"{results[1][1]['tokens']['train'] + results[1][1]['tokens']['val']:,} tokens; "
              f"os.cpu_count()={os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
        for n, (sec, m, cpu) in results.items():
            print(f"num_proc={n}: {sec:6.2f} s  {mb / sec:6.3f} MB/s  CPU {cpu:6.2f} s (busy {cpu / sec:.2f} cores)  "
                  f"stages {m['report']['seconds']}")
        entries = results[1][1]["splits"]["train"] + results[1][1]["splits"]["val"]

        def same(a: str, b: str) -> bool:
            return all((tmp / a / e["file"]).read_bytes() == (tmp / b / e["file"]).read_bytes() for e in entries)

        print(f"ratio (2 procs / 1 proc throughput): {results[1][0] / results[2][0]:.2f}x; identical shards: "
              f"{same('out1local', 'out2local')}")
        if args.no_ray:
            return
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        print(f"ray: local instance of 2 CPUs started in {time.perf_counter() - t0:.1f} s (not timed below)")
        try:
            sec, m, cpu = min((run(tmp, inputs, tokenizer, 2, "ray") for _ in range(args.repeat)), key=lambda r: r[0])
        finally:
            ray.shutdown()
        print(f"ray executor (2 CPUs): {sec:6.2f} s  {mb / sec:6.3f} MB/s  driver CPU {cpu:6.2f} s  stages {m['report']['seconds']}")
        print(f"ratio (ray / local 2 procs throughput): {results[2][0] / sec:.2f}x; identical shards and "
              f"kept documents: {same('out2local', 'out2ray') and m['report']['kept'] == results[2][1]['report']['kept']}")


if __name__ == "__main__":
    main()
