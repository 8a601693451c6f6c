"""Synthetic raw chat logs for demos, tests and benchmarks, with every fault kind on demand.

    llmops synth --days 3 --start 2026-11-01 --faults --chatterbot

Writes data/raw/synth/dt=<day>/chats.jsonl (OpenAI chat JSONL with metadata keys and PII to
scrub) and, with --chatterbot, copies the packaged chatterbot-corpus English YAML dialogs to
data/raw/chatterbot/dt=<first day>/. Output depends only on (seed, day, records, faults).

Synthetic gateway request logs (`llmops synth --traffic N`) are written by tasks/loop/traffic.py.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import shutil
from pathlib import Path
from typing import Any

from tasks.atomic import atomic_file
from tasks.config import Settings
from tasks.data.ingest import NearDupIndex
from tasks.data.partition import check_day
from tasks.errors import InputError

TOPICS = {
    "billing": ("my invoice for {month}", "a refund of {amount} dollars", "the charge on order {order}",
                "upgrading to the {plan} plan", "my card being declined twice"),
    "shipping": ("a parcel to {city}", "tracking number {order}", "express delivery before {weekday}",
                 "a damaged box from the {city} depot", "changing the address on order {order}"),
    "tech": ("the app crashing on {device}", "resetting my password", "syncing {n} files to the cloud",
             "the {device} firmware update", "error code E{code} on startup"),
    "travel": ("a train from {city} to {city2}", "a hotel near the {city} old town", "a visa for {country}",
               "a {n}-day trip to {country}", "the cheapest flight on {weekday}"),
    "cooking": ("a {dish} for {n} people", "replacing eggs in a {dish}", "how long to bake a {dish}",
                "a vegetarian {dish}", "keeping a {dish} fresh for {n} days"),
}
SLOTS = {
    "month": ["January", "February", "March", "April", "May", "June", "July", "August", "September",
              "October"],
    "amount": [str(x) for x in (12, 19, 25, 40, 49, 75, 99, 120, 250, 310)],
    "plan": ["basic", "plus", "team", "pro", "enterprise", "family"],
    "city": ["Lisbon", "Oslo", "Denver", "Osaka", "Nairobi", "Lima", "Krakow", "Austin", "Hanoi", "Perth",
             "Porto"],
    "city2": ["Madrid", "Bergen", "Boulder", "Kyoto", "Mombasa", "Cusco", "Gdansk", "Dallas", "Hue",
              "Sydney"],
    "weekday": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"],
    "device": ["Android tablet", "iPhone", "Windows laptop", "smart TV", "Chromebook", "router",
               "smartwatch"],
    "country": ["Japan", "Peru", "Kenya", "Norway", "Vietnam", "Chile", "Morocco", "Canada", "Iceland"],
    "dish": ["lasagna", "banana bread", "curry", "risotto", "pancake stack", "lentil soup", "pie", "tagine"],
}
OPENERS = ("Hi, I need help with {x}.", "Hello! Can you tell me about {x}?", "I have a question about {x}.",
           "Quick one: what should I know about {x}?", "Could you explain {x} to me?")
ANSWERS = ("Sure. For {x}, start by checking the details you already have, "
           "then compare the options step by step.",
           "Happy to help with {x}. The short answer is that it depends on timing, cost "
           "and what you need most.",
           "Good question about {x}. Most people find it easiest to begin with the basics "
           "and adjust from there.",
           "For {x}, I would write down the key facts first; that makes every later decision simpler.",
           "Let's sort out {x}. I will walk you through it, and you can stop me whenever "
           "something is unclear.")
FOLLOWUPS = ("Thanks. And what about {x}?", "Got it. Does that also apply to {x}?", "One more thing: {x}.",
             "OK, and how does that change with {x}?")
SYSTEM = "You are a helpful, concise assistant for a {topic} help desk."
FAULT_KINDS = ("invalid_json", "not_object", "missing_messages", "unknown_role", "empty_content",
               "no_assistant", "invalid_utf8", "over_long", "duplicate", "near_duplicate")


def _fill(rng: random.Random, template: str) -> str:
    vals = {k: rng.choice(v) for k, v in SLOTS.items()}
    vals.update(order=f"{rng.randint(10000, 99999)}", n=str(rng.randint(2, 12)),
                code=str(rng.randint(100, 999)))
    return template.format(**vals)


def conversation(rng: random.Random, pii: bool = False) -> dict[str, Any]:
    topic = rng.choice(sorted(TOPICS))
    subjects = TOPICS[topic]
    msgs = [{"role": "system", "content": SYSTEM.format(topic=topic)}] if rng.random() < 0.5 else []
    for turn in range(rng.randint(1, 3)):
        x = _fill(rng, rng.choice(subjects))
        q = rng.choice(OPENERS if turn == 0 else FOLLOWUPS).format(x=x)
        if pii and turn == 0:
            q += rng.choice([
                f" You can reach me at {rng.choice(['ana', 'li.wei', 'sam_k'])}"
                f"{rng.randint(1, 99)}@example.com.",
                f" My number is +1 415-555-{rng.randint(1000, 9999)}.",
                " The card was 4111 1111 1111 1111.",
                f" My IP is 192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}.",
            ])
        a = rng.choice(ANSWERS).format(x=x) + f" Reference {rng.randint(100000, 999999)}."
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs, "conversation_id": f"c{rng.getrandbits(48):012x}",
            "channel": rng.choice(["web", "app"])}


def _fault_lines(rng: random.Random, kept: list[dict[str, Any]], max_bytes: int) -> list[bytes]:
    good = conversation(rng)
    # one punctuation mark changed at the very end of the longest conversation: a near duplicate
    near = json.loads(json.dumps(max(kept, key=lambda c: len(json.dumps(c)))))
    near["messages"][-1]["content"] = near["messages"][-1]["content"].rstrip(".") + "!"
    return [
        b'{"messages": [{"role": "user", "content": "unterminated',                     # invalid_json
        b'["messages", "in", "a", "list"]',                                             # not_object
        b'{"prompt": "no messages key", "completion": "x"}',                            # missing_messages
        json.dumps({"messages": [{"role": "wizard", "content": "hi"}, *good["messages"][-1:]]}).encode(),
        json.dumps({"messages": [{"role": "user", "content": "   \t "},
                                 {"role": "assistant", "content": "hello"}]}).encode(),  # empty_content
        json.dumps({"messages": [{"role": "user", "content": "is anyone there?"}]}).encode(),  # no_assistant
        b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}',
        json.dumps({"messages": [{"role": "user", "content": "x" * max_bytes},
                                 {"role": "assistant", "content": "ok"}]}).encode(),    # over_long
        json.dumps(kept[1]).encode(),                                                   # duplicate
        json.dumps(near).encode(),                                                      # near_duplicate
    ]


def synth_day(settings: Settings, day: str, records: int, faults: bool,
              source: str = "synth", content_of: str | None = None) -> dict[str, Any]:
    """Write `records` conversations (plus one line of every fault kind) as dt=<day>. What they say is a
    function of the seed and `content_of` (default: the day itself), so a demo can write a day whose date
    moves with the calendar and still train on the same corpus every time."""
    day = check_day(day)
    rng = random.Random(f"{settings.seed}:{check_day(content_of or day)}")
    index = NearDupIndex(settings.ingest.near_dup, settings.seed)
    kept: list[dict[str, Any]] = []
    lines: list[bytes] = []
    attempts = 0
    while len(kept) < records and attempts < records * 20:
        attempts += 1
        conv = conversation(rng, pii=rng.random() < 0.1)
        words = "\n".join(f"{m['role']}: {m['content']}" for m in conv["messages"]).casefold().split()
        if index.check_and_add(str(len(kept)), words) is None:  # keep the clean part free of near duplicates
            kept.append(conv)
            lines.append(json.dumps(conv, ensure_ascii=False).encode())
    if faults:
        if len(kept) < 2:
            raise InputError("--faults needs at least 2 records")
        bad = _fault_lines(rng, kept, settings.ingest.max_record_bytes)
        for i, line in enumerate(bad):  # spread the faults through the file
            lines.insert(rng.randint(0, len(lines)) if i < len(bad) - 2 else len(lines), line)
    path = settings.paths.raw / source / f"dt={day}" / "chats.jsonl"
    with atomic_file(path) as tmp:
        tmp.write_bytes(b"\n".join(lines) + b"\n")
    return {"path": str(path), "records": len(kept), "faults": len(FAULT_KINDS) if faults else 0}


def copy_chatterbot(settings: Settings, day: str, language: str = "english") -> dict[str, Any]:
    import chatterbot_corpus

    src = Path(chatterbot_corpus.__file__).parent / "data" / language
    if not src.is_dir():
        raise InputError(f"chatterbot-corpus has no language {language!r}")
    dest = settings.paths.raw / "chatterbot" / f"dt={check_day(day)}"
    dest.mkdir(parents=True, exist_ok=True)
    files = sorted(src.glob("*.yml"))
    for f in files:
        with atomic_file(dest / f.name) as tmp:
            shutil.copyfile(f, tmp)
    return {"path": str(dest), "files": len(files)}


def synth(settings: Settings, days: int, start: str, records: int, faults: bool,
          chatterbot: bool) -> dict[str, Any]:
    first = dt.date.fromisoformat(check_day(start))
    out = [synth_day(settings, (first + dt.timedelta(days=i)).isoformat(), records, faults)
           for i in range(days)]
    result: dict[str, Any] = {"days": out}
    if chatterbot:
        result["chatterbot"] = copy_chatterbot(settings, first.isoformat())
    return result
