"""Monitoring benchmark: prints one JSON line of figures, all measured in this one run.

    python bench/monitor.py [--rows 10000,100000] [--reference 50000] [--window-s 5]

In a temporary project root, with a byte-level BPE tokenizer trained here on the reference prompts:
- drift_report_s_<rows>: `tasks.loop.drift.drift_report` end to end (prompt features, token KL, prompt
  embeddings, both Evidently reports, HTML and verdict files) on that many request-log rows against
  the reference prompts, with the default sampling (`monitor.sample_rows`, `embedding_sample_rows`);
  goal <= 60 s at 100k. The rows compared after sampling are reported beside it, and the time to read
  the rows back from the day partitions (`read_requests`, as `check()` does) separately. A warm-up
  report first pays the imports and the embedding model's load (`warmup_s`); a cold hourly run adds that.
- canary decision latency: two versions registered in a real MLflow sqlite store, champion and
  challenger aliases, then `tasks.loop.rollout.canary` (short window, no shadow phase) while a writer thread
  appends request-log lines as the gateway would (routing by traffic.json; the challenger is 300 ms
  slower). Latency = first breaching line written -> rollback decision returned (its record written):
  window_s + analysis (time inside `analyze`) + roll-back (aliases, MLflow, record), less the moment
  the first challenger request came after the step's window opened (reported too).
Request logs: the gateway's JSONL (ts, request_id, version, status, latency_ms, prompt, ...) under
data/requests/dt=YYYY-MM-DD/; prompts are the synthetic corpus's user turns, a tenth of them on
topics the corpus lacks, 3 % errors without a prompt.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TextIO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.config import Settings, load_settings  # noqa: E402
from tasks.data.synth import conversation  # noqa: E402
from tasks.loop import rollout  # noqa: E402
from tasks.loop.drift import drift_report  # noqa: E402
from tasks.serve.repository import write_aliases  # noqa: E402

NEW_TOPICS = ("How do I {v} a {t} in Python?", "Why does my Rust {t} fail to {v}?",
              "Best way to {v} a {t} in SQL?", "Как {v} {t}?", "Wie kann ich {t} {v}?")
SLOTS = {"v": ["sort", "parse", "merge", "cache", "stream", "index"],
         "t": ["list", "JSON file", "dataframe", "table", "string", "socket"]}


def user_turns(rng: random.Random, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        out += [m["content"] for m in conversation(rng, pii=rng.random() < 0.1)["messages"]
                if m["role"] == "user"]
    return out[:n]


def tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE as tasks/data/shard.py trains it (the served model's tokenizer kind)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tasks.model.chat_template import SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def request_records(rng: random.Random, n: int, end: dt.datetime, hours: float = 24.0) -> list[dict]:
    """n gateway log records spread over the `hours` before `end`, oldest first."""
    prompts = user_turns(rng, n)
    span = hours * 3600
    out = []
    for i, prompt in enumerate(prompts):
        ts = end - dt.timedelta(seconds=span * (1 - i / n))
        rec = {"ts": ts.isoformat(), "request_id": f"chatcmpl-{i:024x}",
               "version": 1 if rng.random() < 0.9 else 2}
        u = rng.random()
        if u < 0.02:
            rec |= {"status": 503, "error": "model_server_unavailable"}
        elif u < 0.03:
            rec |= {"status": 429, "error": "overloaded", "latency_ms": round(rng.uniform(0.2, 2.0), 3)}
        else:
            if rng.random() < 0.1:
                prompt = rng.choice(NEW_TOPICS).format(**{k: rng.choice(v) for k, v in SLOTS.items()})
            lat = rng.lognormvariate(4.7, 0.35)  # ~110 ms median
            rec |= {"status": 200, "latency_ms": round(lat, 3), "ttft_ms": round(lat / 4, 3),
                    "prompt_tokens": 20, "completion_tokens": 32, "finish_reason": "length", "prompt": prompt,
                    "response": "..."}
        out.append(rec)
    return out


def write_logs(s: Settings, records: list[dict], name: str) -> None:
    files: dict[str, TextIO] = {}
    try:
        for r in records:
            day = r["ts"][:10]
            if day not in files:
                d = s.paths.requests / f"dt={day}"
                d.mkdir(parents=True, exist_ok=True)
                files[day] = open(d / name, "a", encoding="utf-8")  # noqa: SIM115
            files[day].write(json.dumps(r, ensure_ascii=False) + "\n")
    finally:
        for f in files.values():
            f.close()


def bench_drift(root: Path, sizes: list[int], n_reference: int) -> dict:
    s = load_settings("tiny", [f"paths.root={root}"])
    rng = random.Random(0)
    reference = user_turns(rng, n_reference)
    tok = tokenizer(reference, s.shard.vocab_size)
    end = dt.datetime.now(dt.UTC)
    out: dict = {"reference_prompts": len(reference), "sample_rows": s.monitor.sample_rows,
                 "embedding_sample_rows": s.monitor.embedding_sample_rows,
                 "embedding_model": s.monitor.embedding_model}
    t = time.perf_counter()
    drift_report(s, reference[:200], request_records(rng, 200, end), tok, out_dir=root / "reports" / "warmup")
    out["warmup_s"] = round(time.perf_counter() - t, 2)
    for n in sizes:
        records = request_records(rng, n, end)
        write_logs(s, records, f"gateway-{n}.jsonl")
        t = time.perf_counter()
        back = rollout.read_requests(s, end - dt.timedelta(hours=24, seconds=1),
                                     end + dt.timedelta(seconds=1))
        read_s = time.perf_counter() - t
        assert len(back) == n, (len(back), n)
        shutil.rmtree(s.paths.requests)
        t = time.perf_counter()
        r = drift_report(s, reference, records, tok, out_dir=root / "reports" / f"drift-{n}")
        key = f"{n // 1000}k" if n % 1000 == 0 else str(n)
        out[f"drift_report_s_{key}"] = round(time.perf_counter() - t, 2)
        out[f"read_requests_s_{key}"] = round(read_s, 2)
        out[f"rows_{key}"] = {"records": n, "compared": r["rows"],
                              "embedded": (r.get("embedding_drift") or {}).get("rows")}
        out[f"verdict_{key}"] = {"fire": r["fire"], "token_kl": round(r["token_kl"], 4),
                                 "embedding_auc": (round(r["embedding_drift"]["score"], 4)
                                                   if r.get("embedding_drift") else None),
                                 "evidently_failed_tests": len(r["evidently_failed_tests"])}
    return out


class Traffic(threading.Thread):
    """Live traffic as the gateway logs it: `rate` requests/s, each routed to the challenger with the
    share traffic.json holds at that moment; the challenger answers `slower_ms` later."""

    def __init__(self, s: Settings, champion: int, challenger: int, rate: float, slower_ms: float):
        super().__init__(daemon=True)
        self.s, self.champion, self.challenger = s, champion, challenger
        self.rate, self.slower_ms = rate, slower_ms
        self.stop = threading.Event()
        self.first_breach: float | None = None  # perf_counter when the first challenger line was flushed
        self.written = 0

    def run(self) -> None:
        rng = random.Random(1)
        traffic = self.s.paths.triton_repository / self.s.serve.triton.model_name / "traffic.json"
        prompts = user_turns(rng, 500)
        f, day = None, None
        t_next = time.perf_counter()
        while not self.stop.is_set():
            try:
                share = float(json.loads(traffic.read_text()).get("challenger", 0.0))
            except (FileNotFoundError, json.JSONDecodeError):
                share = 0.0
            now = dt.datetime.now(dt.UTC)
            if now.date() != day:
                if f:
                    f.close()
                d = self.s.paths.requests / f"dt={now.date().isoformat()}"
                d.mkdir(parents=True, exist_ok=True)
                f, day = open(d / "gateway-bench.jsonl", "a", encoding="utf-8"), now.date()  # noqa: SIM115
            to_challenger = rng.random() * 100 < share
            lat = rng.gauss(100.0, 10.0) + (self.slower_ms if to_challenger else 0.0)
            f.write(json.dumps({"ts": now.isoformat(), "request_id": f"chatcmpl-{self.written:024x}",
                                "version": self.challenger if to_challenger else self.champion, "status": 200,
                                "latency_ms": round(lat, 3), "prompt": rng.choice(prompts)}) + "\n")
            f.flush()
            if to_challenger and self.first_breach is None:
                self.first_breach = time.perf_counter()
            self.written += 1
            t_next += 1.0 / self.rate
            time.sleep(max(0.0, t_next - time.perf_counter()))
        if f:
            f.close()


def bench_canary(root: Path, window_s: float, rate: float) -> dict:
    from tasks.tracking import mlflow_client

    s = load_settings("tiny", [f"paths.root={root}", f"rollout.window_s={window_s}", "rollout.min_samples=20",
                               "rollout.shadow_percent=0"])
    client = mlflow_client(s)
    name = s.tracking.registered_model
    client.create_registered_model(name)
    src = root / "models" / "registered"
    src.mkdir(parents=True)
    versions = [int(client.create_model_version(name, src.as_uri()).version) for _ in range(2)]
    champion, challenger = versions
    client.set_registered_model_alias(name, "champion", str(champion))
    client.set_registered_model_alias(name, "challenger", str(challenger))
    write_aliases(s.paths.triton_repository, s.serve.triton.model_name,
                  {"champion": champion, "challenger": challenger})

    timings: dict[str, list[float]] = {"analyze": [], "rollback": []}

    def timed(fn, key):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timings[key].append(time.perf_counter() - t)
        return wrapper

    analyze, rollback = rollout.analyze, rollout.rollback
    rollout.analyze, rollout.rollback = timed(analyze, "analyze"), timed(rollback, "rollback")
    traffic = Traffic(s, champion, challenger, rate, slower_ms=300.0)
    try:
        traffic.start()
        time.sleep(1.0)  # champion-only traffic before the canary starts
        t0 = time.perf_counter()
        decision = rollout.canary(s)
        t_decided = time.perf_counter()
    finally:
        traffic.stop.set()
        traffic.join()
        rollout.analyze, rollout.rollback = analyze, rollback
    assert decision["action"] == "rollback", decision
    assert Path(decision["record"]).is_file()
    assert int(client.get_model_version_by_alias(name, "rejected").version) == challenger
    step = decision["evidence"]["steps"][-1]
    return {"window_s": window_s, "traffic_rps": rate, "challenger_share": step["share"],
            "decision": decision["action"], "decision_latency_s": round(t_decided - traffic.first_breach, 3),
            "first_breach_after_canary_start_s": round(traffic.first_breach - t0, 3),
            "canary_s": round(t_decided - t0, 3), "analyze_s": round(sum(timings["analyze"]), 4),
            "analyze_calls": len(timings["analyze"]), "rollback_s": round(sum(timings["rollback"]), 4),
            "requests_judged": step["requests"], "reason": decision["reason"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="10000,100000",
                    help="request-log rows per drift report, comma-separated")
    ap.add_argument("--reference", type=int, default=50_000, help="reference (training corpus) prompts")
    ap.add_argument("--window-s", type=float, default=5.0)
    ap.add_argument("--rps", type=float, default=200.0, help="request-log lines per second during the canary")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="llmops-bench-monitor-"))
    try:
        out: dict = {"bench": "monitor", "machine": f"{platform.machine()} {os.cpu_count()} cpu",
                     "python": platform.python_version()}
        out.update(bench_drift(root / "drift", [int(x) for x in args.rows.split(",")], args.reference))
        out["canary"] = bench_canary(root / "canary", args.window_s, args.rps)
        print(json.dumps(out))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
