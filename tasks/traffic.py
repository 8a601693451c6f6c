"""Live chat traffic against the gateway: what a canary needs to have something to judge.

    with Load(base_url) as load:      # `clients` threads, each a fresh session per request
        ...                           # load.statuses, load.versions: what every request got

Prompts are drawn from a given list (`make run` passes the training corpus's user turns, so its
traffic is in distribution and the drift check has no reason to fire), else first user turns made
like the synthetic corpus (tasks/synth.py), or one fixed prompt.
`make run` uses it while chat_deploy runs its shadow and canary windows; the rollout tests use it
to check that users never see a failed request while traffic moves.
"""

from __future__ import annotations

import random
import threading

import httpx

from tasks.synth import conversation


class Load:
    """`clients` threads sending chat completions until stopped; every status and served version is kept."""

    def __init__(self, base: str, clients: int = 2, prompt: str | None = "Where is my parcel?", max_tokens: int = 8,
                 headers: dict[str, str] | None = None, pause_s: float = 0.0, seed: int = 0,
                 prompts: list[str] | None = None):
        self.base = base.removesuffix("/").removesuffix("/v1")
        self.prompt, self.max_tokens, self.headers, self.pause_s, self.seed = prompt, max_tokens, headers or {}, pause_s, seed
        self.prompts = prompts
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
                    prompt = self.prompt or next(m["content"] for m in conversation(rng)["messages"] if m["role"] == "user")
                try:
                    r = http.post(f"{self.base}/v1/chat/completions",
                                  headers={**self.headers, "X-Session-Id": f"s{rng.getrandbits(48)}"},
                                  json={"model": "chat-gpt", "max_tokens": self.max_tokens, "temperature": 0,
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
