"""A tiktoken twin for HF byte-level BPE tokenizers: same ids, faster encoding (bench/tokenizer.py).

A `tokenizer.json` whose pipeline is exactly "split regex -> ByteLevel -> BPE" (no normalizer, no
dropout/prefix/suffix/byte-fallback, merges in id order) is the same function as a tiktoken Encoding
with ranks = token ids and the same split pattern. tests/test_tokenizer_tiktoken.py checks that on
adversarial text for the GPT-2, cl100k and o200k patterns. `twin()` recognises such a file and builds
the Encoding; anything it does not recognise stays on the HF engine (returns None).
"""

from __future__ import annotations

import json

from ember.tokenizer import formats

_GPT2_BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}


def _pattern(pre: dict | None, hint: str | None) -> str | None:
    """The tiktoken spelling of the tokenizer.json split pattern, or None if it is not one we know."""
    if pre is None:
        return None
    if all(pre.get(k) == v for k, v in _GPT2_BYTELEVEL.items()):
        return formats.GPT2_PATTERN  # HF's built-in GPT-2 regex splits like tiktoken's r50k pattern
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    split, byte_level = steps
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    if byte_level.get("type") != "ByteLevel" or byte_level.get("add_prefix_space") or byte_level.get("use_regex"):
        return None
    regex = (split.get("pattern") or {}).get("Regex")
    for candidate in ([hint] if hint else []) + list(formats.PATTERNS.values()):
        if regex is not None and formats.hf_pattern(candidate) == regex:
            return candidate
    return None


def _plain_bpe(model: dict) -> bool:
    return (
        model.get("type") == "BPE"
        and model.get("dropout") is None
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
        and not model.get("byte_fallback")
        and not model.get("ignore_merges")
    )


def _ranks(model: dict) -> dict[bytes, int] | None:
    """Ranks = ids of the 256 bytes and of each merge result, if merges come in increasing id order."""
    vocab: dict[str, int] = model["vocab"]
    ranks: dict[bytes, int] = {}
    for b, c in formats.bytes_to_unicode().items():
        if c not in vocab:
            return None
        ranks[bytes([b])] = vocab[c]
    last = -1
    for merge in model.get("merges", []):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        i = vocab.get(left + right)
        data = formats.token_str_to_bytes(left + right)
        if i is None or data is None or i <= last:  # merge priority must equal id order
            return None
        ranks.setdefault(data, i)
        last = i
    return ranks


def twin(hf_json: str, pattern_hint: str | None = None) -> tuple[str, dict[bytes, int], dict[str, int]] | None:
    """(pattern, ranks, specials) of a tiktoken Encoding that encodes exactly like the tokenizer.json
    `hf_json`, or None (backends.HFBackend builds the TiktokenBackend from them)."""
    spec = json.loads(hf_json)
    if spec.get("normalizer") is not None or not _plain_bpe(spec.get("model") or {}):
        return None
    pattern = _pattern(spec.get("pre_tokenizer"), pattern_hint)
    if pattern is None:
        return None
    added = spec.get("added_tokens") or []
    if any(not t.get("special") or t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added):
        return None
    ranks = _ranks(spec["model"])
    if ranks is None:
        return None
    ids = set(ranks.values())
    specials = {t["content"]: t["id"] for t in added if t["id"] not in ids}
    return pattern, ranks, specials
