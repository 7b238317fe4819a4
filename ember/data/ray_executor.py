"""`ember data prepare --executor ray`: the same stages as a Ray Data pipeline, with identical output.

    input files ─▶ Ray Data, one task per file: read, normalise, filter, scrub PII, decontaminate,
                   content hash + MinHash ─▶ a fragment per file in the work directory (resumable)
    fragments   ─▶ Ray Data: every candidate document emits its group keys (b'x' + content hash;
                   b'b' + band + band values for each LSH band) ─▶ groupby(key) across the cluster
                   ─▶ each group yields exact copies and verified near pairs
    pairs       ─▶ driver: connected components, resolved in input order (`dedup.resolve`)
    fragments   ─▶ driver, in input order: kept documents ─▶ split, tokenizer, shards, manifest

Near-duplicate removal is global: two documents anywhere in the corpus meet in the group of a band
they share, exactly the candidates the local executor's LSH index finds, and `dedup.resolve` turns
the pairs into the decisions the local executor makes in input order. So the kept documents, shards
and manifest are the local executor's, byte for byte (the report's timings aside).

What runs where: stage 1 (the CPU-heavy part: normalisation, filters, MinHash) and the grouping run
on the cluster; the pairs (only documents that have a duplicate), the component resolution and the
final ordered write of kept documents and shards run on the driver, because the shards are one
ordered token stream. Every node must reach the inputs and the work directory: use object-store
URLs or a shared filesystem (a `memory://` URL is private to one process and is refused).
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Iterator

import numpy as np

from ember.data import remote
from ember.errors import EmberError

_KIND = {0: "copy", 1: "edge"}


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise EmberError("--executor ray needs Ray Data, which is not installed. HINT: pip install 'ray[data]' "
                         "(or use --executor local)") from None
    return ray


def check_locations(cfg) -> None:
    """Ray needs Ray Data, and every location must be reachable from every worker."""
    from ember.data.stage1 import default_work_dir

    _ray()
    for what, loc in [("--input", p) for p in cfg.input] + [("--out", cfg.out),
                                                             ("--work-dir", cfg.work_dir or default_work_dir(cfg.out))]:
        if remote.protocol(str(loc)) in remote.PROCESS_LOCAL:
            raise EmberError(f"{what} {loc}: a {remote.protocol(loc)}:// filesystem lives in one process, so Ray "
                             "workers cannot see it. HINT: use a path or URL every worker reaches, or "
                             "--executor local")


@contextlib.contextmanager
def session(cfg) -> Iterator[None]:
    """Ray initialised for the run: a local instance of `num_proc` CPUs, or the cluster at
    --ray-address; an instance the caller had already started is used as it is and left running."""
    ray = _ray()
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    started = False
    if not ray.is_initialized():
        kw = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        if cfg.ray_address:
            ray.init(address=cfg.ray_address, **kw)
        else:
            ray.init(num_cpus=cfg.num_proc, **kw)
        started = True
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = ctx.enable_progress_bars, ctx.shuffle_strategy
    ctx.enable_progress_bars = False  # ember shows its own progress
    if len(ray.nodes()) == 1:  # one machine: the sort shuffle's fixed cost is about half the hash shuffle's
        from ray.data.context import ShuffleStrategy

        ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.shuffle_strategy = before
        if started:
            ray.shutdown()


def _partitions() -> int:
    ray = _ray()
    return max(2, min(256, 2 * int(ray.cluster_resources().get("CPU", 1))))


# --------------------------------------------------------------------------- stage 1
def _stage1_files(batch: dict, cfg, files: list[str], frags: list[str], work_location: str, decontam) -> dict:
    """A Ray Data task: stage 1 of the given files, each to its fragment (as the local executor does)."""
    from ember.data.stage1 import FragmentWriter, WorkDir, chunked, drop_counts, process_doc
    from ember.data.readers import ReadStats, read_file

    work, rc = WorkDir(work_location), cfg.read_config()
    out = {"i": [], "docs": [], "dropped": [], "error": []}
    for i in map(int, batch["i"]):
        stats, dropped, n = ReadStats(), {}, 0
        writer = FragmentWriter(work.staging(frags[i]))
        try:
            for chunk in chunked(read_file(files[i], rc, stats), cfg.chunk_docs):
                results = [process_doc(t, cfg, decontam) for t in chunk]
                writer.add(results)
                n += len(results)
                for k, v in drop_counts(results).items():
                    dropped[k] = dropped.get(k, 0) + v
            work.commit(writer.close(stats), frags[i])
            error = ""
        except EmberError as e:  # bad input: reported by the driver as the same clear error
            error = str(e)
        finally:
            writer.path.unlink(missing_ok=True)
        out["i"].append(i)
        out["docs"].append(n)
        out["dropped"].append(json.dumps(dropped))
        out["error"].append(error)
    return {k: np.array(v, dtype=object if k in ("dropped", "error") else np.int64) for k, v in out.items()}


def run_stage1(cfg, files: list[str], todo: list[int], frags: list[str], work, decontam, progress) -> None:
    """Stage 1 of the files in `todo` as a Ray Data pipeline, one task per file; fragments are
    committed by the workers as they finish, so a killed run loses only the files in flight."""
    if not todo:
        return
    import ray.data

    ds = ray.data.from_items([{"i": i} for i in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(_stage1_files, batch_size=1, fn_kwargs=dict(cfg=cfg, files=files, frags=frags,
                                                                     work_location=work.location, decontam=decontam))
    errors = []
    for row in ds.iter_rows():
        if row["error"]:
            errors.append((int(row["i"]), row["error"]))
            continue
        progress.add(int(row["docs"]), json.loads(row["dropped"]))
        progress.file_done(int(row["i"]))
    if errors:
        raise EmberError(min(errors)[1])  # the first bad file in input order, as the local executor reports


# --------------------------------------------------------------------------- global dedup
def _group_rows(batch: dict, dedup, bands: tuple[int, int], frags: list[str], work_location: str) -> dict:
    """A Ray Data task: (key, global index, content hash, signature) rows of a fragment's candidates."""
    from ember.data.dedup import group_keys
    from ember.data.stage1 import WorkDir, iter_fragment
    from ember.data.readers import ReadStats

    work = WorkDir(work_location)
    keys, gs, digests, sigs = [], [], [], []
    for i in map(int, batch["i"]):
        for j, (reason, _, _, _, digest, values) in enumerate(iter_fragment(work, frags[i], ReadStats())):
            if reason is not None:
                continue
            sig = b"" if values is None else np.ascontiguousarray(values, np.uint64).tobytes()
            for k in group_keys(digest, values, dedup, bands):
                keys.append(k)
                gs.append((i << 32) | j)
                digests.append(digest)
                sigs.append(sig)
    return {"key": np.array(keys, dtype=object), "g": np.array(gs, np.int64),
            "digest": np.array(digests, dtype=object), "sig": np.array(sigs, dtype=object)}


def _group_pairs(group: dict, dedup) -> dict:
    """A Ray Data task: one group's exact copies and verified near pairs."""
    from ember.data.dedup import group_pairs

    members = [(int(g), bytes(d), np.frombuffer(bytes(s), np.uint64) if len(s) else None)
               for g, d, s in zip(group["g"], group["digest"], group["sig"])]
    pairs = group_pairs(bytes(group["key"][0]), members, dedup) if len(members) > 1 else []
    kind = {"copy": 0, "edge": 1}
    return {"kind": np.array([kind[k] for k, _, _ in pairs], np.int8),
            "a": np.array([a for _, a, _ in pairs], np.int64), "b": np.array([b for _, _, b in pairs], np.int64)}


def dedup_decisions(cfg, frags: list[str], work) -> dict[int, str]:
    """{global index: 'exact_dup' | 'near_dup'} for the whole corpus, grouped across the cluster."""
    if not (cfg.dedup.exact or cfg.dedup.near):
        return {}
    import ray.data

    from ember.data.dedup import band_params, resolve

    bands = band_params(cfg.dedup) if cfg.dedup.near else (0, 0)
    ds = ray.data.from_items([{"i": i} for i in range(len(frags))], override_num_blocks=len(frags))
    ds = ds.map_batches(_group_rows, batch_size=1, fn_kwargs=dict(dedup=cfg.dedup, bands=bands, frags=frags,
                                                                  work_location=work.location))
    ds = ds.groupby("key", num_partitions=_partitions()).map_groups(_group_pairs, fn_kwargs=dict(dedup=cfg.dedup))
    pairs = []
    for batch in ds.iter_batches(batch_format="numpy", batch_size=65536):
        pairs += [(_KIND[int(k)], int(a), int(b)) for k, a, b in zip(batch["kind"], batch["a"], batch["b"])]
    return resolve(pairs)
