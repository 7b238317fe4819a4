"""Text cleaning: Unicode normalisation and PII scrubbing (e-mail, IP addresses, phone numbers).

Scrubbing replaces each match with a placeholder string (`CleanConfig.email_token`, ...), so the
model sees that something was there without learning the value. The patterns favour precision:
plain numbers, years, year ranges, dates, times, verse references and version strings are left alone
(tests/test_data_filters.py lists the false positives that are checked).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal


@dataclass
class CleanConfig:
    """Normalisation and PII scrubbing."""

    normalization: Literal["NFC", "NFKC", "NFD", "NFKD", "none"] = "NFC"
    """Unicode normal form applied to every document ('none' = leave as read)."""
    scrub_pii: bool = True
    """Replace e-mail addresses, IPv4/IPv6 addresses and phone numbers with placeholders."""
    email_token: str = "[EMAIL]"
    """Placeholder for an e-mail address."""
    ip_token: str = "[IP]"
    """Placeholder for an IPv4 or IPv6 address."""
    phone_token: str = "[PHONE]"
    """Placeholder for a phone number."""


EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
_IPV6_CANDIDATE = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|"
                             rf"{_OCTET}(?:\.{_OCTET}){{3}})?(?![\w:]|\.\d)")
# International numbers need a leading '+'; otherwise only the North-American 3-3-4 shape with
# '-', '.' or ' ' separators (or '(555) 123-4567'). Years, dates and ranges never have that shape.
PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"
    r"|(?:\(\d{3}\) ?|\d{3}[-. ])\d{3}[-.]\d{4})(?![\w]|[-.]\d)"
)

_PHONE_HINT = re.compile(r"\d{3}[-. )]")  # cheap pre-checks: most documents have neither
_IPV4_HINT = re.compile(r"\d\.\d")


def normalize(text: str, form: str) -> str:
    return text if form == "none" else unicodedata.normalize(form, text)


def _ipv6(match: re.Match, token: str, counts: dict[str, int]) -> str:
    s = match.group(0)
    groups = [g for g in s.split(":") if g]
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return s
    if len(groups) < 3 and not any(c.isdigit() for c in s):  # e.g. 'a::b' in code or prose
        return s
    counts["ip"] += 1
    return token


def _phone(match: re.Match, token: str, counts: dict[str, int]) -> str:
    digits = sum(c.isdigit() for c in match.group(0))
    if not 10 <= digits <= 15:
        return match.group(0)
    counts["phone"] += 1
    return token


def scrub_pii(text: str, cfg: CleanConfig) -> tuple[str, dict[str, int]]:
    """Replace PII with placeholders; return (text, {"email": n, "ip": n, "phone": n})."""
    counts = {"email": 0, "ip": 0, "phone": 0}
    if "@" in text:
        text, counts["email"] = EMAIL.subn(cfg.email_token, text)
    if _IPV4_HINT.search(text):
        text, counts["ip"] = IPV4.subn(cfg.ip_token, text)
    if "::" in text or text.count(":") >= 7:
        text = _IPV6_CANDIDATE.sub(lambda m: _ipv6(m, cfg.ip_token, counts), text)
    if _PHONE_HINT.search(text):  # cheap pre-check: most documents have no digit run like '555-'
        text = PHONE.sub(lambda m: _phone(m, cfg.phone_token, counts), text)
    return text, counts


def clean(text: str, cfg: CleanConfig) -> tuple[str, dict[str, int]]:
    """Normalise, then scrub (when enabled); returns the text and PII counts."""
    text = normalize(text, cfg.normalization)
    if not cfg.scrub_pii:
        return text, {"email": 0, "ip": 0, "phone": 0}
    return scrub_pii(text, cfg)
