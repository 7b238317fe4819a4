"""Quality filters (one crafted document per rule) and PII scrubbing (placeholders, false positives)."""

import pytest

from ember.data.clean import CleanConfig, clean, scrub_pii
from ember.data.filters import FilterConfig, dup_ngram_frac, quality_reason, top_ngram_frac

GOOD = (
    "The harbour town woke slowly that morning, and the fishermen walked down to their boats with nets "
    "over their shoulders.\nA baker opened his shutters while the smell of fresh bread drifted across "
    "the square.\nChildren ran past the church, laughing at a dog that chased gulls along the wall.\n\n"
    "By noon the market was full of traders selling apples, cheese, wool and copper pots to visitors "
    "who had come from the valley.\nNobody expected the storm that would arrive before evening, "
    "although the old pilot had warned them twice."
)
CFG = FilterConfig()
LINES = [line for line in GOOD.split("\n") if line]


def test_good_document_passes():
    assert quality_reason(GOOD, CFG) is None


def test_disabled_keeps_everything():
    assert quality_reason("x", FilterConfig(enabled=False)) is None


@pytest.mark.parametrize("doc,cfg,rule", [
    ("Too short to keep, with the dog.", CFG, "min_words"),
    (GOOD, FilterConfig(max_words=20), "max_words"),
    (" ".join(["a to of be"] * 30), CFG, "mean_word_len"),
    (" ".join(["incomprehensibilities the and"] * 20), FilterConfig(max_mean_word_len=8.0), "mean_word_len"),
    (GOOD + " #tag" * 12, CFG, "symbol_word_ratio"),
    (GOOD + " 123 456 789 1011" * 10, CFG, "alpha_words"),
    (" ".join(f"word{i}x alpha{i}y" for i in range(40)), FilterConfig(min_alpha_word_frac=0.0), "stop_words"),
    ("\n".join("* " + line for line in LINES), CFG, "bullet_lines"),
    ("\n".join(line.rstrip(".") + "..." for line in LINES), CFG, "ellipsis_lines"),
    ("\n".join(f"and the river {i} ran on under the bridge" for i in range(12)),
     FilterConfig(min_frac_lines_end_punct=0.5), "lines_end_punct"),
    (GOOD + "\nTo be.\nTo be.\nTo be.\nTo be.\nTo be.\nTo be.\nTo be.\nTo be.\nTo be.", CFG, "dup_lines"),
    (GOOD + ("\nThe storm came down on the harbour and broke the boats." * 5), CFG, "dup_line_chars"),
    (GOOD + "\n\nThe end.\n\nThe end.\n\nThe end.\n\nThe end.", FilterConfig(max_dup_line_frac=1.0), "dup_paragraphs"),
    (GOOD + "\n\n" + GOOD.split("\n\n")[1], FilterConfig(max_dup_line_char_frac=1.0, max_dup_para_frac=1.0), "dup_paragraph_chars"),
    (GOOD + " the sea" * 40, CFG, "top_2gram"),
    (GOOD + " " + " ".join(GOOD.split("\n\n")[0].split("\n")), CFG, "dup_5gram"),
])
def test_each_rule(doc, cfg, rule):
    assert quality_reason(doc, cfg) == rule


def test_ngram_fractions():
    words = "a b c a b c".split()
    assert top_ngram_frac(words, 2) == pytest.approx(4 / 6)  # 'a b' twice, 2 chars each
    assert dup_ngram_frac(words, 3) == pytest.approx(1.0)
    assert dup_ngram_frac("a b c d e f".split(), 2) == 0.0


def test_bundled_corpus_survives_the_default_filters():
    """Plays and verse must not be destroyed by the defaults (thresholds chosen for them)."""
    import json
    import lzma

    from ember.data.bundled import ASSETS

    for name, min_kept in (("tinyshakespeare.jsonl.xz", 0.99), ("kjv.jsonl.xz", 0.95)):
        with lzma.open(ASSETS / name, "rt") as f:
            docs = [json.loads(line)["text"] for line in f][::4]  # every 4th document: fast enough
        kept = sum(quality_reason(d, CFG) is None for d in docs) / len(docs)
        assert kept >= min_kept, (name, kept)


# ----------------------------------------------------------------------------------- PII
@pytest.mark.parametrize("text,kind", [
    ("write to john.doe+news@example.co.uk today", "email"),
    ("root@localhost.org", "email"),
    ("the server at 192.168.1.20 is down", "ip"),
    ("gateway 10.0.0.1.", "ip"),
    ("v6 host 2001:db8::8a2e:370:7334 answers", "ip"),
    ("loopback ::1 only", "ip"),
    ("full fe80:0000:0000:0000:0202:b3ff:fe1e:8329 addr", "ip"),
    ("call 555-123-4567 now", "phone"),
    ("call (555) 123-4567 now", "phone"),
    ("call 555.123.4567 now", "phone"),
    ("London +44 20 7946 0958 office", "phone"),
    ("US +1 415 555 2671 office", "phone"),
])
def test_pii_is_scrubbed(text, kind):
    cfg = CleanConfig()
    out, counts = scrub_pii(text, cfg)
    placeholder = {"email": cfg.email_token, "ip": cfg.ip_token, "phone": cfg.phone_token}[kind]
    assert placeholder in out and counts[kind] == 1, (out, counts)
    assert sum(counts.values()) == 1


@pytest.mark.parametrize("text", [
    "In 1999, 2000 and 2001 the town grew.", "From 1990-1995 and 2024-01-15.", "at 10:30:45 or 12:30",
    "Genesis 1:1 and John 3:16", "version 1.2.3 and pi 3.14159", "1,234,567 people", "call 911",
    "ISBN 978-0-596-52068-7", "a::b in C++ code", "1234 5678 9012 3456", "room 555-1234",
    "the number 4155552671", "an @ sign alone, user@localhost", "ratio 300.5.2", "scores 999.999.999.999",
])
def test_pii_false_positives_are_left_alone(text):
    out, counts = scrub_pii(text, CleanConfig())
    assert out == text and sum(counts.values()) == 0


def test_custom_placeholders_and_normalisation():
    cfg = CleanConfig(email_token="<|email|>", normalization="NFC")
    out, counts = clean("Cafe\u0301 mail: a@b.io", cfg)
    assert out == "Caf\u00e9 mail: <|email|>" and counts["email"] == 1
    assert clean("Cafe\u0301", CleanConfig(normalization="none", scrub_pii=False))[0] == "Cafe\u0301"
