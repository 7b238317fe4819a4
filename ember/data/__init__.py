"""ember.data: preprocessing (readers, filters, dedup, PII scrubbing), token shards, the pretraining
loader and the bundled corpus.

    from ember.data import TokenLoader, prepare, PrepareConfig, prepare_default

Modules: readers.py, clean.py, filters.py, dedup.py, report.py, pipeline.py (`prepare`), shards.py
(binary format + manifest), loader.py (`TokenLoader`), bundled.py (`prepare_default`).
Names are imported lazily, so `import ember.data` stays cheap (no torch until the loader is used).
"""

_LAZY = {
    "TokenLoader": "ember.data.loader",
    "prepare": "ember.data.pipeline",
    "PrepareConfig": "ember.data.pipeline",
    "prepare_default": "ember.data.bundled",
    "bundled_inputs": "ember.data.bundled",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ember.data' has no attribute {name!r}")
