"""Text cleaning shared by ingest and serving: unicode/whitespace normalisation and PII scrubbing."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b-\u200f\u2028\u2029\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0]+")
_TRAILING = re.compile(r" *\n *")
_BLANKS = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    """NFKC, no control characters, single spaces, at most one blank line, stripped."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    return _BLANKS.sub("\n\n", text).strip()


EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
# an address may end a sentence ("... is 10.0.0.1."), so only a following digit (or ".digit") disqualifies
IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?!\d|\.\d)")
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)|\d{3})[ .-]?\d{3}[ .-]?\d{4}(?!\w)")
_DIGIT = re.compile(r"\d")
PLACEHOLDERS = {"email": "[EMAIL]", "card": "[CARD]", "ip": "[IP]", "phone": "[PHONE]"}


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def scrub_pii(text: str, kinds: tuple[str, ...], counts: Counter) -> str:
    """Replace emails, card numbers (Luhn-checked), IPv4 addresses and phone numbers with placeholders."""
    if "email" in kinds and "@" in text:
        text, n = EMAIL.subn(PLACEHOLDERS["email"], text)
        counts["email"] += n
    if not _DIGIT.search(text):  # cards, IPs and phones all need digits: skip three regexes
        return text
    if "card" in kinds:
        def card(m: re.Match) -> str:
            digits = re.sub(r"\D", "", m.group())
            if _luhn_ok(digits):
                counts["card"] += 1
                return PLACEHOLDERS["card"]
            return m.group()
        text = CARD.sub(card, text)
    if "ip" in kinds:
        text, n = IPV4.subn(PLACEHOLDERS["ip"], text)
        counts["ip"] += n
    if "phone" in kinds:
        text, n = PHONE.subn(PLACEHOLDERS["phone"], text)
        counts["phone"] += n
    return text
