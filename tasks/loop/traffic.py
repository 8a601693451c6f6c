"""Live chat traffic against the gateway: what a canary needs to have something to judge.

    with Load(base_url) as load:      # `clients` threads, each a fresh session per request
        ...                           # load.statuses, load.versions: what every request got

Prompts are drawn from a given list (`make run` passes the training corpus's user turns, so its
traffic is in distribution and the drift check has no reason to fire), else first user turns made
like the synthetic corpus (tasks/data/synth.py), or one fixed prompt.
`make run` uses it while chat_deploy runs its shadow and canary windows; the rollout tests use it
to check that users never see a failed request while traffic moves.

`traffic()` (`llmops synth --traffic 600 --drifted`) writes N request-log lines in the gateway's
format instead (data/requests/dt=<day>/synth-<time>.jsonl, marked "synthetic": true), spread over
the last --hours: prompts like the training corpus, or with --drifted a shifted mix (other topics,
other scripts, longer prompts) that the monitor must notice, to rehearse the closed loop.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import threading
from typing import Any

import httpx

from tasks.atomic import atomic_file
from tasks.config import Settings
from tasks.data.synth import ANSWERS, conversation
from tasks.errors import InputError
from tasks.serve.repository import read_aliases


class Load:
    """`clients` threads sending chat completions until stopped; every status and served version is kept."""

    def __init__(self, base: str, clients: int = 2, prompt: str | None = "Where is my parcel?",
                 max_tokens: int = 8, headers: dict[str, str] | None = None, pause_s: float = 0.0,
                 seed: int = 0, prompts: list[str] | None = None, temperature: float | None = 0.0):
        self.base = base.removesuffix("/").removesuffix("/v1")
        self.prompt, self.max_tokens, self.headers, self.pause_s, self.seed = (
            prompt, max_tokens, headers or {}, pause_s, seed)
        self.prompts = prompts
        # None: the field is left out and the server's default applies (OpenAI's 1.0: sampled replies)
        self.sampling = {} if temperature is None else {"temperature": temperature}
        self.statuses: list[int] = []
        self.versions: list[str | None] = []
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        rng = random.Random(f"{self.seed}:{i}")
        with httpx.Client(timeout=60) as http:
            while not self._stop.is_set():
                if self.prompts:
                    prompt = rng.choice(self.prompts)
                else:
                    prompt = self.prompt or next(m["content"] for m in conversation(rng)["messages"]
                                                 if m["role"] == "user")
                try:
                    r = http.post(f"{self.base}/v1/chat/completions",
                                  headers={**self.headers, "X-Session-Id": f"s{rng.getrandbits(48)}"},
                                  json={"model": "chat-gpt", "max_tokens": self.max_tokens, **self.sampling,
                                        "messages": [{"role": "user", "content": prompt}]})
                    self.statuses.append(r.status_code)
                    self.versions.append(r.headers.get("x-model-version"))
                except httpx.HTTPError:
                    self.statuses.append(0)  # no answer at all: counted, never hidden
                    self.versions.append(None)
                if self.pause_s:
                    self._stop.wait(self.pause_s)

    def start(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join()

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


DRIFTED = (  # what users start asking after a product change: none of it is in the training topics
    "How do I fix a segmentation fault in my C++ {thing} when the vector is resized inside the loop?",
    "Write a Python function that parses {thing} logs with a regular expression "
    "and returns a dict of counts.",
    "Why does my Kubernetes pod for the {thing} service keep restarting with exit code 137 after deploy?",
    "Сколько стоит доставка {thing} в Новосибирск и можно ли оплатить картой при получении?",
    "{thing}の設定をリセットする方法を教えてください。アプリが起動しません。",
    "¿Cuál es la mejor manera de configurar {thing} para que funcione sin conexión a internet?",
    "Explain the difference between eventual and strong consistency for a distributed {thing} store, "
    "with examples.",
)
THINGS = ("parser", "scheduler", "cache", "billing", "telemetry", "router", "index", "queue", "matrix",
          "renderer")


def traffic(settings: Settings, rows: int, drifted: bool = False, hours: float = 1.0,
            latency_ms: float = 80.0, seed: int | None = None) -> dict[str, Any]:
    """Write `rows` gateway request-log lines spread over the last `hours` (see the module doc)."""
    if rows < 1:
        raise InputError(f"--traffic must be at least 1, got {rows}")
    rng = random.Random(f"{settings.seed if seed is None else seed}:traffic:{drifted}")
    aliases = read_aliases(settings.paths.triton_repository, settings.serve.triton.model_name)
    version = aliases.get("champion", aliases.get("challenger", 1))
    now = dt.datetime.now(dt.UTC)
    lines: dict[str, list[str]] = {}
    for i in range(rows):
        ts = now - dt.timedelta(seconds=hours * 3600 * (rows - i) / rows)
        if drifted:
            prompt = rng.choice(DRIFTED).format(thing=rng.choice(THINGS))
        else:
            conv = conversation(rng)
            prompt = next(m["content"] for m in conv["messages"] if m["role"] == "user")
        reply = rng.choice(ANSWERS).format(x="that")
        rec = {"ts": ts.isoformat(), "request_id": f"synth-{rng.getrandbits(64):016x}", "synthetic": True,
               "model": settings.serve.triton.model_name, "version": version, "alias": "champion",
               "session": f"synth-{rng.randrange(rows // 4 + 1)}", "stream": False, "priority": "interactive",
               "status": 200, "latency_ms": round(rng.lognormvariate(0, 0.25) * latency_ms, 3),
               "prompt_tokens": len(prompt.split()) * 2, "completion_tokens": len(reply.split()),
               "finish_reason": "stop", "safety_input": {"blocked": False},
               "safety_output": {"blocked": False},
               "prompt": prompt, "response": reply}
        lines.setdefault(ts.date().isoformat(), []).append(json.dumps(rec, ensure_ascii=False))
    stamp = now.strftime("%Y%m%dT%H%M%S%f")
    paths = []
    for day, day_lines in sorted(lines.items()):
        path = settings.paths.requests / f"dt={day}" / f"synth-{stamp}.jsonl"
        with atomic_file(path) as tmp:
            tmp.write_text("\n".join(day_lines) + "\n", encoding="utf-8")
        paths.append(str(path))
    return {"rows": rows, "drifted": drifted, "version": version, "paths": paths,
            "window": [(now - dt.timedelta(hours=hours)).isoformat(), now.isoformat()]}
