"""Clean, filter, deduplicate, scrub and tokenize text into token shards (+ manifest.json, report.json).

With no --input, prepares the bundled public-domain corpus (tiny-shakespeare + the KJV Bible) into the
cache (`$EMBER_CACHE` or ~/.cache/ember, see ember.data.bundled), or into --out when given.
Examples:
  ember data prepare --input notes.txt docs.jsonl.gz --out data/prepared/mine --vocab-size 8192
  ember data prepare --input corpus/ --out data/prepared/c --tokenizer data/prepared/mine/tokenizer --num-proc 2
  ember data prepare --input web.jsonl --out data/prepared/web --decontaminate mmlu,humaneval
  ember data prepare --executor ray --ray-address auto --input 's3://bucket/crawl/*.jsonl.gz' --out s3://bucket/web

A killed run resumes: rerun the same command (finished input files are not redone). See docs/data.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ember.data.pipeline import PrepareConfig


@dataclass
class Config(PrepareConfig):
    """`ember data prepare`: every stage's settings (defaults < --config YAML < flags)."""

    out: str = ""
    """Output directory: shards, manifest.json, report.json, tokenizer/. Required with --input;
    without --input (bundled corpus) it defaults to the ember cache."""
    decontaminate: str = ""
    """Evaluation tasks (as in `ember evaluate --tasks`) whose items must not appear in the training
    data: a document sharing a --decontaminate-n word n-gram with any of their items is dropped
    (counted per task in report.json as decontaminate:TASK)."""
    decontaminate_n: int = 13
    """Word n-gram length of the overlap test."""
    eval_data_dir: str = "data/eval"
    """Where named evaluation tasks look for their files (as ember evaluate --data-dir)."""


def main(cfg: Config) -> int:
    from ember.config import to_dict
    from ember.data import bundled, shards
    from ember.data.pipeline import prepare
    from ember.data.report import format_table
    from ember.errors import EmberError
    from ember.log import log

    t0 = time.perf_counter()
    if not cfg.input:
        _refuse_ignored_flags(cfg)
        out = bundled.prepare_default(cfg.out or None, vocab_size=cfg.vocab_size, num_proc=cfg.num_proc)
        manifest = shards.read_manifest(out)
    else:
        if not cfg.out:
            raise EmberError("--out is missing, expected the output directory. HINT: add --out data/prepared/NAME")
        log("config:", to_dict(cfg))
        manifest = prepare(cfg, decontam=decontamination_index(cfg) if cfg.decontaminate else None)
        out = cfg.out
    log(format_table(manifest["report"]))
    log(f"{out}: {manifest['tokens']['train']:,} train tokens in {len(manifest['splits']['train'])} shard(s), "
        f"{manifest['tokens']['val']:,} val tokens; vocab {manifest['vocab_size']}, eos {manifest['eos_id']}, "
        f"{manifest['dtype']} ({time.perf_counter() - t0:.1f} s)")
    return 0


def decontamination_index(cfg: Config):
    from ember.data.decontam import NgramIndex
    from ember.eval.tasks import Settings, parse_tasks
    from ember.log import log

    tasks = parse_tasks(cfg.decontaminate, Settings(data_dir=cfg.eval_data_dir))
    names = [t.name for t in tasks]
    keys = names if len(set(names)) == len(names) else [t.label for t in tasks]  # short names when unique
    index = NgramIndex({k: t.texts(t.docs()) for k, t in zip(keys, tasks)}, n=cfg.decontaminate_n)
    log("decontaminating against " + ", ".join(f"{t}: {n} items ({index.short[t]} shorter than "
                                                f"{index.n} words)" for t, n in index.items.items()))
    return index


# without --input the bundled corpus is prepared with fixed settings; only these apply to it
_BUNDLED_KEYS = {"out", "vocab_size", "num_proc", "progress", "input"}


def _refuse_ignored_flags(cfg: Config) -> None:
    from ember.config import to_dict
    from ember.errors import EmberError
    from ember.train.run import config_changes

    ignored = [key for key, _, _ in config_changes(to_dict(Config()), to_dict(cfg)) if key.split(".")[0] not in _BUNDLED_KEYS]
    if ignored:
        flags = ", ".join("--" + k.replace("_", "-") for k in ignored)
        raise EmberError(f"{flags}: apply only with --input (the bundled corpus is prepared with fixed settings). "
                         "HINT: pass --input FILE... to prepare your own data with them")
