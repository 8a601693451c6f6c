"""The serving engine: iteration-level scheduling of many sequences over one model (continuous batching).

    engine = Engine(model, gpt, stop_tokens=(eos, eot), max_seqs=8, max_batch_tokens=256)
    engine.submit(Seq(ids, max_tokens=64, on_token=..., on_finish=...))   # any thread
    engine.run(stop_event)                                               # its own thread

At every step finished sequences leave the running batch and waiting ones join it, as in vLLM and
TensorRT-LLM's in-flight batching: a request that arrives while others decode starts at the next step
instead of waiting for the whole batch to end. One step is

1. drop what was cancelled (a client gone: `Seq.cancelled()`) or waited past its deadline;
2. admit waiting sequences while slots are free, interactive before batch, earlier deadline first;
3. prefill the joining sequences, in chunks, within the step's token budget (`max_batch_tokens` less
   one token per decoding sequence); a sequence whose prompt is done samples its first token and
   takes a K/V slot;
4. one decode step for every sequence holding a slot (`gpt.decode_slots`): one forward, per-row
   penalties and sampling.

The K/V cache is preallocated (`gpt.SlotKV`: `max_seqs` slots of block_size positions); the decoding
sequences sit in slots 0..n-1 (a finished one's slot takes the last one's K/V), so a step reads the
cache as it lies. A sequence samples exactly as `GPT.generate()` does alone: the same prefill, one
token per step from its own generator, so greedy and seeded results are its solo results.

Each sequence records its phases: queue (submitted to admitted), prefill (admitted to first token),
decode (first token to end), and the steps it took part in.

This file is copied into each exported version beside gpt.py and imports nothing of the project:
the model and its module come in as arguments (as in prefix_cache.py).
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

INTERACTIVE, BATCH = 0, 1


@dataclass(eq=False)
class Seq:
    """One request in the engine: its prompt, limits and sampling, the callbacks that answer it, and
    (filled in by the engine) its state and timings."""

    ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    generator: torch.Generator | None = None
    penalties: Any = None  # gpt.Penalties or None
    cuts: Sequence[int] = ()  # token counts after each leading system message (prefix cache)
    priority: int = INTERACTIVE
    deadline: float = math.inf  # time.monotonic() by which it must have been admitted
    on_token: Callable[[Seq, int], None] = lambda seq, tok: None
    on_finish: Callable[[Seq], None] = lambda seq: None
    cancelled: Callable[[], bool] = lambda: False

    out: list[int] = field(default_factory=list)
    finish: str | None = None  # stop | length | cancelled | timeout | error
    error: str | None = None
    cached_tokens: int = 0
    joined: int = 0  # sequences decoding when this one was admitted
    steps: int = 0  # decode steps this sequence took part in
    peak: int = 1  # the most sequences it decoded together with (itself included)
    t_submit: float = 0.0
    t_admit: float = 0.0
    t_first: float = 0.0
    t_end: float = 0.0
    limit: int = 0
    slot: int = -1
    pos: int = 0  # positions whose K/V are computed
    last: int = -1  # the token to feed next
    cache: Any = None  # gpt.KVCache while the prompt is being prefilled
    seen: torch.Tensor | None = None  # counts of generated tokens (penalties)

    def phases(self) -> dict[str, float]:
        """Milliseconds queued, prefilling (to the first token) and decoding; they sum to the time in
        the engine."""
        admit = self.t_admit or self.t_end
        first = self.t_first or self.t_end
        return {"queue_ms": (admit - self.t_submit) * 1e3, "prefill_ms": (first - admit) * 1e3,
                "decode_ms": (self.t_end - first) * 1e3}


class Engine:
    """Continuous batching over one model instance. `submit` from any thread; `step` (or `run`) from
    one thread only, which owns the model and the K/V cache."""

    def __init__(self, model, gpt, stop_tokens: Sequence[int] = (), max_seqs: int = 8,
                 max_batch_tokens: int = 256, prefix_kv=None, step_delay_s: float = 0.0,
                 cancel_check_s: float = 0.0):
        if max_seqs < 1:
            raise ValueError("serve.engine.max_seqs must be at least 1")
        if max_batch_tokens < max_seqs:
            raise ValueError(f"serve.engine.max_batch_tokens ({max_batch_tokens}) must be at least "
                             f"max_seqs ({max_seqs}): every decoding sequence takes one token of a step")
        self.model, self.gpt = model, gpt
        self.stop_tokens = frozenset(stop_tokens)
        self.max_seqs, self.max_batch_tokens = max_seqs, max_batch_tokens
        self.block = model.cfg.block_size
        self.vocab = model.cfg.vocab_size
        p = next(model.parameters())
        self.device = p.device
        self.kv = gpt.SlotKV(model.cfg, max_seqs, p.device, p.dtype)
        self.prefix_kv = prefix_kv
        self.step_delay_s = step_delay_s
        # asking whether a request was cancelled may cost a round trip (Triton's backend asks its server):
        # at most this often, so a cancel is seen within max(one step, cancel_check_s)
        self.cancel_check_s = cancel_check_s
        self._last_check = -math.inf
        self.decoding: list[Seq] = []  # decoding[i] holds slot i
        self.prefilling: list[Seq] = []
        self._waiting: list[tuple[int, float, int, Seq]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self.stats = {"submitted": 0, "finished": 0, "cancelled": 0, "timeouts": 0, "errors": 0,
                      "joined_mid_decode": 0, "steps": 0, "decode_tokens": 0, "prefill_tokens": 0,
                      "busy_s": 0.0, "cancel_checks": 0}

    # -- any thread ---------------------------------------------------------------------------------

    def submit(self, seq: Seq) -> None:
        seq.t_submit = time.monotonic()
        with self._cond:
            heapq.heappush(self._waiting, (seq.priority, seq.deadline, next(self._order), seq))
            self.stats["submitted"] += 1
            self._cond.notify()

    def snapshot(self) -> dict[str, Any]:
        """What the engine holds now and has done so far (for metrics, the tuner and the autoscaler)."""
        with self._cond:
            waiting = len(self._waiting)
        running = len(self.decoding) + len(self.prefilling)
        used = sum(s.pos for s in self.decoding) + sum(s.pos for s in self.prefilling)
        return {**self.stats, "running": running, "decoding": len(self.decoding), "waiting": waiting,
                "max_seqs": self.max_seqs, "max_batch_tokens": self.max_batch_tokens,
                "kv_slots_used": running, "kv_tokens_used": used,
                "kv_use": used / (self.max_seqs * self.block), "kv_bytes": self.kv.nbytes}

    @property
    def idle(self) -> bool:
        return not (self.decoding or self.prefilling or self._waiting)

    def run(self, stop: threading.Event, report: Callable[[dict[str, Any]], None] = lambda snap: None,
            report_s: float = 0.5) -> None:
        """Step until `stop` is set; sleeps (on the condition) while there is nothing to do. `report`
        gets a `snapshot()` at most every `report_s` seconds while busy, and when it goes idle."""
        last, busy = 0.0, False
        while not stop.is_set():
            now = time.monotonic()
            if busy and (self.idle or now - last >= report_s):
                last = now
                try:
                    report(self.snapshot())
                except Exception:  # noqa: BLE001 - metrics never stop the engine
                    pass
            with self._cond:
                if self.idle:
                    busy = False
                    self._cond.wait(0.2)
                    continue
            busy = True
            self.step()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # -- the engine's thread -----------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        t0 = time.perf_counter()
        try:
            self._step()
        finally:
            self.stats["busy_s"] += time.perf_counter() - t0

    def _step(self) -> None:
        self.stats["steps"] += 1
        now = time.monotonic()
        if now - self._last_check >= self.cancel_check_s:
            self._last_check = now
            self._drop()
        self._admit()
        budget = self.max_batch_tokens - len(self.decoding)
        budget -= self._prefill_together(budget)
        for seq in list(self.prefilling):
            if budget <= 0:
                break
            budget -= self._prefill(seq, budget)
        if self.decoding:
            self._decode()
        if self.step_delay_s:
            time.sleep(self.step_delay_s)

    def _finish(self, seq: Seq, reason: str, error: str | None = None) -> None:
        seq.finish, seq.error, seq.t_end = reason, error, time.monotonic()
        seq.cache, seq.seen = None, None
        key = {"cancelled": "cancelled", "timeout": "timeouts", "error": "errors"}.get(reason, "finished")
        self.stats[key] += 1
        try:
            seq.on_finish(seq)
        except Exception:  # noqa: BLE001 - a broken callback (a closed stream) must not stop the engine
            pass

    def _release(self, finished: set[int]) -> None:
        """Take finished sequences out of their slots, the last slots moving into the gaps."""
        for slot in sorted(finished, reverse=True):
            last = len(self.decoding) - 1
            if slot != last:
                moved = self.decoding[last]
                self.kv.move(last, slot, moved.pos)
                moved.slot = slot
                self.decoding[slot] = moved
            self.decoding.pop()

    def _cancelled(self, seq: Seq) -> bool:
        self.stats["cancel_checks"] += 1
        try:
            return bool(seq.cancelled())
        except Exception:  # noqa: BLE001 - a request whose state cannot be read is treated as gone
            return True

    def _drop(self) -> None:
        gone = {s.slot for s in self.decoding if self._cancelled(s)}
        for slot in gone:
            self._finish(self.decoding[slot], "cancelled")
        self._release(gone)
        for seq in [s for s in self.prefilling if self._cancelled(s)]:
            self.prefilling.remove(seq)
            self._finish(seq, "cancelled")
        now = time.monotonic()
        with self._cond:
            keep, dropped = [], []
            for item in self._waiting:
                seq = item[3]
                if seq.deadline < now:
                    dropped.append((seq, "timeout"))
                elif self._cancelled(seq):
                    dropped.append((seq, "cancelled"))
                else:
                    keep.append(item)
            if dropped:
                heapq.heapify(keep)
                self._waiting = keep
        for seq, reason in dropped:
            self._finish(seq, reason, "waited past its deadline" if reason == "timeout" else None)

    def _admit(self) -> None:
        while len(self.decoding) + len(self.prefilling) < self.max_seqs:
            with self._cond:
                if not self._waiting:
                    return
                seq = heapq.heappop(self._waiting)[3]
            seq.t_admit = time.monotonic()
            seq.joined = len(self.decoding)
            if seq.joined:
                self.stats["joined_mid_decode"] += 1
            try:
                self._start(seq)
            except Exception as e:  # noqa: BLE001 - a request the model cannot take fails alone
                self._finish(seq, "error", str(e))
                continue
            self.prefilling.append(seq)

    def _start(self, seq: Seq) -> None:
        if not seq.ids:
            raise ValueError("empty prompt")
        if len(seq.ids) >= self.block:
            raise ValueError(f"prompt of {len(seq.ids)} tokens leaves no room in the "
                             f"{self.block}-token window")
        seq.limit = max(0, min(int(seq.max_tokens), self.block - len(seq.ids)))
        seq.cache = self.gpt.KVCache(self.model.cfg.n_layer)
        if self.prefix_kv is not None and seq.cuts:
            prefix, cached = self.prefix_kv.for_batch([seq.ids], [seq.cuts],
                                                      lambda ids: self.gpt.prefill(self.model, ids))
            if prefix is not None and prefix.length < len(seq.ids):  # a miss computed it just now
                seq.cache.k, seq.cache.v = list(prefix.k), list(prefix.v)  # read, never written (cat copies)
                seq.pos, seq.cached_tokens = prefix.length, cached[0]
        if seq.penalties is not None and seq.penalties.active:
            seq.seen = torch.zeros(self.vocab, device=self.device)

    def _prefill_together(self, budget: int) -> int:
        """Prefill, in one left-padded forward, the joining sequences that start from scratch (no cached
        prefix, nothing computed yet) and fit the budget whole; returns the tokens computed. The rest
        (long prompts: chunked; cached prefixes) go one by one."""
        group, used = [], 0
        for seq in self.prefilling:
            if seq.pos == 0 and used + len(seq.ids) <= budget:
                group.append(seq)
                used += len(seq.ids)
        if len(group) < 2:
            return 0
        longest = max(len(s.ids) for s in group)
        pad = torch.tensor([longest - len(s.ids) for s in group], dtype=torch.long, device=self.device)
        ids = torch.tensor([[0] * (longest - len(s.ids)) + s.ids for s in group], dtype=torch.long,
                           device=self.device)
        cache = self.gpt.KVCache(self.model.cfg.n_layer)
        logits, _ = self.model(ids, cache=cache, pad=pad if bool(pad.any()) else None)
        self.stats["prefill_tokens"] += used
        for b, seq in enumerate(group):
            seq.pos = len(seq.ids)
            self._joined(seq, cache, b, longest - len(seq.ids), logits[b:b + 1, -1, :])
        return used

    def _joined(self, seq: Seq, cache, row: int, start: int, last: torch.Tensor) -> None:
        """A sequence whose prompt is computed: its K/V into a slot, its first token out."""
        self.prefilling.remove(seq)
        seq.slot = len(self.decoding)
        self.kv.put(seq.slot, cache, seq.pos, row, start)
        seq.cache = None
        self.decoding.append(seq)
        if seq.limit == 0:
            seq.t_first = time.monotonic()
            self._finish(seq, "length")
            self._release({seq.slot})
            return
        tok = self._pick(last, [seq])[0]
        seq.t_first = time.monotonic()
        if self._emit(seq, tok):
            self._release({seq.slot})

    def _prefill(self, seq: Seq, budget: int) -> int:
        """Run the next chunk of a joining sequence's prompt; returns the tokens computed."""
        chunk = seq.ids[seq.pos:seq.pos + budget]
        logits, _ = self.model(torch.tensor([chunk], dtype=torch.long, device=self.device), cache=seq.cache)
        seq.pos += len(chunk)
        self.stats["prefill_tokens"] += len(chunk)
        if seq.pos == len(seq.ids):
            self._joined(seq, seq.cache, 0, 0, logits[:, -1, :])
        return len(chunk)

    def _pick(self, logits: torch.Tensor, seqs: Sequence[Seq]) -> list[int]:
        """The next token of each row of (n, V) logits, as generate() picks it."""
        if any(s.seen is not None for s in seqs):
            logits = logits.float().clone()
            for b, s in enumerate(seqs):
                if s.seen is not None:
                    logits[b] = s.penalties.apply(logits[b], s.seen)
        picked = logits.argmax(dim=-1)
        for b, s in enumerate(seqs):
            if s.temperature > 0:
                picked[b] = self.gpt.sample(logits[b:b + 1], s.temperature, s.top_k, s.top_p, s.generator)[0]
        return picked.tolist()

    def _emit(self, seq: Seq, tok: int) -> bool:
        """Hand a new token to its sequence; True when the sequence has ended."""
        if tok in self.stop_tokens:
            self._finish(seq, "stop")
            return True
        seq.out.append(tok)
        seq.last = tok
        if seq.seen is not None:
            seq.seen[tok] += 1
        self.stats["decode_tokens"] += 1
        try:
            seq.on_token(seq, tok)
        except Exception:  # noqa: BLE001 - the stream is gone: end the sequence
            self._finish(seq, "cancelled")
            return True
        if len(seq.out) >= seq.limit:
            self._finish(seq, "length")
            return True
        return False

    def _decode(self) -> None:
        seqs = self.decoding
        tokens = torch.tensor([s.last for s in seqs], dtype=torch.long, device=self.device)
        positions = torch.tensor([s.pos for s in seqs], dtype=torch.long, device=self.device)
        logits = self.gpt.decode_slots(self.model, self.kv, tokens, positions)
        picked = self._pick(logits, seqs)
        ended = set()
        n = len(seqs)
        for seq, tok in zip(list(seqs), picked, strict=True):
            seq.pos += 1
            seq.steps += 1
            seq.peak = max(seq.peak, n)
            if self._emit(seq, tok):
                ended.add(seq.slot)
        self._release(ended)
