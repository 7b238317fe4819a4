"""`Tokenizer.load`: detect what a path holds (by its files and their contents) and build its backend.

Every loader returns (backend, meta); `Tokenizer.load` wraps them (so this module needs no Tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

from ember.errors import EmberError
from ember.log import warn
from ember.tokenizer import formats
from ember.tokenizer.backends import HFBackend, TiktokenBackend
from ember.tokenizer.formats import EMBER_META, META_VERSION

GPT2_NAMES = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))
_HINT = (
    "HINT: pass a directory saved by `ember tokenizer train`, a Hugging Face tokenizer directory "
    "(tokenizer.json), GPT-2 vocab.json + merges.txt, or a .tiktoken rank file"
)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EmberError(f"{path}: not readable JSON ({e}). HINT: re-save the tokenizer") from None
    if not isinstance(data, dict):
        raise EmberError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_meta(directory: Path) -> dict | None:
    path = directory / EMBER_META
    if not path.is_file():
        return None
    meta = _read_json(path)
    if meta.get("format") != "ember-tokenizer" or not isinstance(meta.get("version"), int):
        raise EmberError(f"{path}: not an ember tokenizer metadata file (no 'format': 'ember-tokenizer', 'version')")
    if meta["version"] > META_VERSION:
        raise EmberError(
            f"{path}: metadata version {meta['version']} is newer than this ember reads ({META_VERSION}). "
            "HINT: upgrade ember"
        )
    return meta


def _user_meta(meta: dict) -> dict:
    keys = ("eos_token", "pad_token", "bos_token", "chat_template", "model_max_length", "pattern")
    return {k: meta[k] for k in keys if k in meta}


def _token_name(value) -> str | None:
    # tokenizer_config.json writes tokens as strings or as {"content": ...} dicts
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick_template(value) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of {"name", "template"} (use "default")."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        template = named.get("default")
        return template if isinstance(template, str) else None
    return None


def _load_hf_dir(directory: Path, meta: dict | None, engine: str) -> tuple:
    from tokenizers import Tokenizer as HFTokenizer

    path = directory / "tokenizer.json"
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception on a bad file
        raise EmberError(f"{path}: not a valid tokenizers file ({e}). HINT: re-save or re-convert the tokenizer") from None
    fields: dict = {}
    config = directory / "tokenizer_config.json"
    if config.is_file():  # a Hugging Face model's tokenizer
        cfg = _read_json(config)
        for key in ("eos_token", "pad_token", "bos_token"):
            if key in cfg:
                fields[key] = _token_name(cfg[key])
        template = _pick_template(cfg.get("chat_template"))
        if template is not None:
            fields["chat_template"] = template
        if isinstance(cfg.get("model_max_length"), int) and cfg["model_max_length"] < 10**9:
            fields["model_max_length"] = cfg["model_max_length"]
        if cfg.get("add_bos_token") is False:
            fields["bos_token"] = None
    jinja = directory / "chat_template.jinja"  # transformers >= 4.x saves the template on its own
    if jinja.is_file():
        fields["chat_template"] = jinja.read_text(encoding="utf-8")
    if meta is not None:  # ember's own metadata wins (its chat template is "chatml", rendered natively)
        fields.update(_user_meta(meta))
    backend = HFBackend(tok, fast=engine != "hf", pattern=fields.get("pattern"))
    if engine == "tiktoken" and backend.fast is None:
        raise EmberError(
            f"{path}: engine='tiktoken' needs a plain byte-level BPE (split regex + ByteLevel + BPE, no normalizer). "
            "HINT: use engine='auto'"
        )
    return backend, fields


def _tiktoken_tokenizer(ranks_path: Path, meta: dict | None) -> tuple:
    ranks = formats.read_tiktoken_file(ranks_path)
    if meta is not None and "pattern" in meta:
        name, pattern, specials = ranks_path.stem, meta["pattern"], dict(meta.get("special_tokens") or {})
    elif len(ranks) in formats.KNOWN_RANK_FILES:
        name, pattern, specials = formats.KNOWN_RANK_FILES[len(ranks)]
        specials = dict(specials)
    else:
        warn(
            f"{ranks_path}: unknown rank file ({len(ranks)} ranks) and no {EMBER_META} with its split pattern; "
            "using the GPT-2 pattern and no special tokens"
        )
        name, pattern, specials = ranks_path.stem, formats.GPT2_PATTERN, {}
    return TiktokenBackend(name, pattern, ranks, specials), _user_meta(meta or {})


def _gpt2_tokenizer(vocab: Path, merges: Path, meta: dict | None, engine: str) -> tuple:
    ranks, specials, pairs = formats.read_gpt2_files(vocab, merges)
    pattern = (meta or {}).get("pattern", formats.GPT2_PATTERN)
    if engine == "hf":
        tok = _hf_from_ranks(ranks, specials, pairs, pattern)
        return HFBackend(tok, fast=False), _user_meta(meta or {}) | {"pattern": pattern}
    return TiktokenBackend(vocab.parent.name or "gpt2", pattern, ranks, specials), _user_meta(meta or {})


def _hf_from_ranks(ranks: dict[bytes, int], specials: dict[str, int], pairs: list[tuple[str, str]], pattern: str):
    """The same BPE as a HF `tokenizers.Tokenizer` (byte-level, given split pattern and merges)."""
    from tokenizers import AddedToken, models

    from ember.tokenizer.backends import build_hf_bpe

    tok = build_hf_bpe(pattern)
    vocab = {formats.bytes_to_token_str(b): i for b, i in ranks.items()}
    vocab.update(specials)
    tok.model = models.BPE(vocab=vocab, merges=pairs)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(specials, key=specials.get)])
    return tok


def _load_dir(directory: Path, engine: str) -> tuple:
    meta = _read_meta(directory)
    if meta is not None and meta.get("kind") == "tiktoken":
        return _tiktoken_tokenizer(directory / meta.get("ranks_file", "tokenizer.tiktoken"), meta)
    if (directory / "tokenizer.json").is_file():
        return _load_hf_dir(directory, meta, engine)
    for vocab_name, merges_name in GPT2_NAMES:
        if (directory / vocab_name).is_file():
            return _gpt2_tokenizer(directory / vocab_name, directory / merges_name, meta, engine)
    ranks = sorted(directory.glob("*.tiktoken"))
    if len(ranks) == 1:
        return _tiktoken_tokenizer(ranks[0], meta)
    found = ", ".join(sorted(p.name for p in directory.iterdir())[:8]) or "nothing"
    raise EmberError(f"{directory}: no tokenizer found (holds: {found}). {_HINT}")


def _load_file(path: Path, engine: str) -> tuple:
    if path.name in ("vocab.json", "encoder.json") or (path.suffix == ".json" and path.name != "tokenizer.json"):
        merges = path.with_name("merges.txt" if path.name != "encoder.json" else "vocab.bpe")
        return _gpt2_tokenizer(path, merges, _read_meta(path.parent), engine)
    if path.name in ("merges.txt", "vocab.bpe"):
        vocab = path.with_name("vocab.json" if path.name == "merges.txt" else "encoder.json")
        return _gpt2_tokenizer(vocab, path, _read_meta(path.parent), engine)
    if path.name == "tokenizer.json" or path.name == EMBER_META:
        return _load_dir(path.parent, engine)
    if formats.looks_like_tiktoken(path):
        return _tiktoken_tokenizer(path, _read_meta(path.parent))
    raise EmberError(f"{path}: unknown tokenizer file format. {_HINT}")


def load(path: Path, engine: str = "auto") -> tuple:
    """`engine`: "auto" (tiktoken where the files allow, else HF tokenizers), "tiktoken" or "hf"."""
    if engine not in ("auto", "tiktoken", "hf"):
        raise EmberError(f"engine={engine!r}: expected 'auto', 'tiktoken' or 'hf'")
    if path.is_dir():
        return _load_dir(path, engine)
    if path.is_file():
        return _load_file(path, engine)
    raise EmberError(f"{path}: no such file or directory. {_HINT}")
