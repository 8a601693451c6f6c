"""No secret-looking string is committed: keys, tokens, private keys, passwords in URLs or assignments."""

from __future__ import annotations

import re
import subprocess

from tests.helpers.project import REPO

PATTERNS = {
    "AWS access key": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN (RSA |EC |OPENSSH |DSA |PGP )?PRIVATE KEY"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    "Slack token": re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    "OpenAI-style key": re.compile(r"\bsk-[A-Za-z0-9_-]{24,}\b"),
    "password in a URL": re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:(?!\$?\$\{|\*\*\*|<)[^@\s/'\"]{3,}@"),
    "password assignment": re.compile(r"(?i)\w*(password|passwd|secret|api_key|token)\w*\s*[:=]\s*"
                                      r"['\"](?!\$\{)[^'\"\s]{8,}['\"]"),
}


def test_no_secret_looking_string_is_tracked():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.split(b"\0")
    hits = []
    for name in filter(None, files):
        path = REPO / name.decode()
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary
        for kind, pat in PATTERNS.items():
            for m in pat.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                hits.append(f"{name.decode()}:{line}: {kind}: {m.group(0)[:60]}")
    assert not hits, "secret-looking strings in tracked files:\n" + "\n".join(hits)


def test_the_scanner_finds_what_it_looks_for():
    # the examples are split so that this file itself stays clean
    assert PATTERNS["password in a URL"].search("postgresql://airflow:" + "hunter2hunter2@db:5432/airflow")
    assert not PATTERNS["password in a URL"].search(
        "postgresql://airflow:${POSTGRES_PASSWORD}@postgres:5432/airflow")
    assert not PATTERNS["password in a URL"].search(   # compose's escaped reference, expanded by the process
        "postgresql://memory:$${MEMORY_DB_PASSWORD}@postgres:5432/memory")
    assert PATTERNS["password assignment"].search('admin_password = "' + 'correct-horse-battery"')
    assert PATTERNS["AWS access key"].search("key AKIA" + "ABCDEFGHIJKLMNOP")
