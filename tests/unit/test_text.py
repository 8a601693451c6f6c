from collections import Counter

from tasks.data.text import normalize, scrub_pii

KINDS = ("email", "phone", "card", "ip")


def test_normalize():
    assert normalize("  Ｈｅｌｌｏ\u200b \t world\r\n\r\n\r\n\nbye  ") == "Hello world\n\nbye"


def test_scrub_each_kind_and_count():
    c = Counter()
    text = ("mail ana.b+x@example.co.uk, call +1 415-555-0199 or (212) 555-0100, card 4111 1111 1111 1111, "
            "from 10.0.0.254.")
    out = scrub_pii(text, KINDS, c)
    assert out == "mail [EMAIL], call [PHONE] or [PHONE], card [CARD], from [IP]."
    assert c == Counter(email=1, phone=2, card=1, ip=1)


def test_scrub_leaves_non_pii():
    c = Counter()
    text = "Version 1.2.3 shipped 2026-11-01; order 12345; card-like 1234 5678 9012 3456 fails Luhn."
    assert scrub_pii(text, KINDS, c) == text
    assert sum(c.values()) == 0


def test_scrub_respects_kinds():
    c = Counter()
    assert scrub_pii("a@b.io 10.1.1.1", ("ip",), c) == "a@b.io [IP]"
