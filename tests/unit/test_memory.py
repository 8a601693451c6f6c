"""Long-term session memory (tasks/serve/memory.py) in-process: condensing, the index's eviction
limits, fitting memories into the prompt budget, and the service with the real packaged MiniLM:
an exchange is embedded by the worker, after `remember` has returned; relevant memories are
recalled and irrelevant ones are not; a deletion drops queued and in-flight exchanges."""

from __future__ import annotations

import asyncio

import pytest

from tasks.config import MemoryConfig
from tasks.model.chat_template import MEMORY_HEADER, encode_chat, with_memories
from tasks.serve.memory import LocalIndex, SessionMemory, condense, exchange_hash, history_hashes
from tests.helpers.memory import Clock, make_memory, unit_vector
from tests.helpers.serving import small_tokenizer


def run(coro):
    return asyncio.run(coro)


def test_condense_keeps_whole_sentences_and_the_users_words_first():
    user = "My dog is called Biscuit. He is three years old. " + "He likes the beach very much. " * 20
    out = condense(user, "What a lovely dog! Tell me more. " * 10, 240)
    assert len(out) <= 240 + 5 and out.startswith("user: My dog is called Biscuit. He is three years old.")
    assert "| assistant: What a lovely dog!" in out
    assert condense("hi", "hello", 240) == "user: hi | assistant: hello"
    # one enormous word is cut, not dropped
    assert len(condense("a" * 1000, "b", 240)) < 300
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
               {"role": "user", "content": "r"}]
    assert history_hashes(history) == {exchange_hash("q", "a")}


def test_local_index_ttl_evicts_unused_memories_and_recall_renews_them():
    clock = Clock()
    idx = LocalIndex(MemoryConfig(ttl_s=100), clock)
    run(idx.add(make_memory("s", 1)))
    run(idx.add(make_memory("s", 2)))
    clock.t += 60
    assert [m.id for m, _ in run(idx.search("s", None, unit_vector(1), 1, 0.5, set()))] == ["m1"]  # used now
    clock.t += 60  # m2 unused for 120 s > ttl; m1 used 60 s ago
    assert run(idx.search("s", None, unit_vector(2), 5, 0.5, set())) == []
    assert run(idx.stats())["memories"] == 1
    clock.t += 101
    assert run(idx.search("s", None, unit_vector(1), 5, -1.0, set())) == [] and \
        run(idx.stats())["sessions"] == 0


def test_local_index_max_bytes_drops_the_least_recently_used_first():
    clock = Clock()
    one = make_memory("s", 0).bytes  # 300 text + 64 vector + 64 record bytes: three fit in 1,300, four do not
    cfg = MemoryConfig(max_bytes_per_session=1300)
    idx = LocalIndex(cfg, clock)
    assert 3 * one <= 1300 < 4 * one
    for i in range(3):
        clock.t += 1
        run(idx.add(make_memory("s", i)))
    clock.t += 1
    run(idx.search("s", None, unit_vector(0), 1, 0.5, set()))  # m0, the oldest, is used: m1 is now the LRU
    clock.t += 1
    run(idx.add(make_memory("s", 3)))
    left = {m.id for m in idx._sessions["s"].values()}
    assert left == {"m0", "m2", "m3"}
    assert run(idx.session_bytes("s")) == 3 * one <= cfg.max_bytes_per_session
    # the same exchange again is one memory, renewed, not a second copy
    run(idx.add(make_memory("s", 3)))
    assert len(idx._sessions["s"]) == 3


def test_local_index_max_sessions_drops_the_least_recently_used_session():
    clock = Clock()
    idx = LocalIndex(MemoryConfig(max_sessions=2), clock)
    for s in ("a", "b"):
        clock.t += 1
        run(idx.add(make_memory(s, 1)))
    clock.t += 1
    run(idx.search("a", None, unit_vector(1), 1, 0.5, set()))  # a used: b is the LRU session
    run(idx.add(make_memory("c", 1)))
    assert set(idx._sessions) == {"a", "c"}


def test_local_index_search_is_scoped_and_excludes_what_the_prompt_already_has():
    idx = LocalIndex(MemoryConfig())
    run(idx.add(make_memory("s1", 1, user="u")))
    run(idx.add(make_memory("s2", 2, user="u")))
    run(idx.add(make_memory("s3", 3, user="v")))
    # session scope
    assert [m.id for m, _ in run(idx.search("s1", None, unit_vector(2), 5, -1, set()))] == ["m1"]
    # user scope
    assert {m.id for m, _ in run(idx.search("s1", "u", unit_vector(2), 5, -1, set()))} == {"m1", "m2"}
    assert run(idx.search("s1", None, unit_vector(1), 5, -1, {"m1"})) == []
    assert run(idx.delete(user="u")) == 2 and run(idx.stats())["memories"] == 1


def test_memories_fit_whole_within_their_share_of_the_budget():
    tok = small_tokenizer()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    memories = [f"user: question {i} about help | assistant: answer {i}" for i in range(6)]
    base = len(encode_chat(tok, messages, add_generation_prompt=True))
    out, n = with_memories(tok, memories, messages, 10_000, 1.0)
    assert n == 6 and out[0] == messages[0] and out[1]["content"].startswith(MEMORY_HEADER) and \
        out[2:] == messages[1:]
    cost = len(encode_chat(tok, out, add_generation_prompt=True)) - base  # all six
    budget = int(cost * 2)  # a quarter of it holds about half of them
    out, n = with_memories(tok, memories, messages, budget, 0.25)
    assert 0 < n < 6 and len(encode_chat(tok, out, add_generation_prompt=True)) - base <= int(budget * 0.25)
    assert all(m in out[1]["content"] for m in memories[:n]) and memories[n] not in out[1]["content"]
    assert with_memories(tok, memories, messages, base + 2, 1.0) == (messages, 0)  # no room: unchanged
    assert with_memories(tok, [], messages, 10_000, 1.0) == (messages, 0)


@pytest.fixture(scope="module")
def memory():
    """The service with the real MiniLM, its worker not started: each test runs the worker's step."""
    async def make():
        m = SessionMemory(MemoryConfig(), ("email", "phone", "card", "ip"), run_worker=False)
        await m.wait_ready()
        return m
    return run(make())


def test_embedding_happens_in_the_worker_after_remember_has_returned(memory):
    async def scenario():
        assert await memory.remember("e1", None, "My dog is called Biscuit, mail me at a@b.example",
                                     "Lovely name!")
        # the request path is done: nothing was embedded, the exchange waits in the queue
        assert await memory.queue.pending() == 1 and await memory.index.session_bytes("e1") == 0
        jobs = await memory.queue.get(16, timeout=1)
        # scrubbed before it was queued
        assert "a@b.example" not in jobs[0].text and "Biscuit" in jobs[0].text
        assert await memory.process(jobs) == 1
        assert await memory.index.session_bytes("e1") > 384 * 4
        hits = await memory.recall("e1", None, "What is my dog's name?", [])
        assert [h[0].id for h in hits] == [jobs[0].id] and hits[0][1] >= memory.cfg.min_similarity
        assert await memory.recall("e1", None, "Tell me about the history of Roman aqueducts.", []) == []
        # an exchange still in the short-term turns is not recalled a second time
        history = [{"role": "user", "content": "My dog is called Biscuit, mail me at a@b.example"},
                   {"role": "assistant", "content": "Lovely name!"}]
        assert await memory.recall("e1", None, "What is my dog's name?", history) == []
    run(scenario())


def test_a_deleted_session_loses_queued_and_in_flight_exchanges(memory):
    async def scenario():
        await memory.remember("d1", None, "I live in Lisbon near the river.", "Lisbon is lovely.")
        await memory.remember("d1", None, "My favourite colour is green.", "Green it is.")
        held = await memory.queue.get(1, timeout=1)  # a worker holds the first one
        gone = await memory.forget(session="d1")
        assert gone["queued"] == 1 and await memory.queue.pending() == 0
        assert await memory.process(held) == 0  # queued before the deletion: dropped, not stored
        assert await memory.index.session_bytes("d1") == 0
        # the session may come back afterwards: new exchanges are kept
        await memory.remember("d1", None, "I moved to Porto.", "Porto is lovely too.")
        assert await memory.process(await memory.queue.get(16, timeout=1)) == 1
    run(scenario())


def test_metrics_scrapes_reuse_the_index_totals_for_a_few_seconds(memory):
    calls = []
    real = memory.index.stats

    async def counted():
        calls.append(1)
        return await real()

    async def scenario():
        memory.index.stats = counted
        try:
            first = await memory.update_gauges(now=1000.0)
            for t in (1000.5, 1002.0, 1004.9):  # scrapes every second or so: one scan
                assert await memory.update_gauges(now=t) == first
            assert len(calls) == 1
            await memory.update_gauges(now=1000.0 + memory.STATS_TTL_S + 0.1)
            assert len(calls) == 2
        finally:
            del memory.index.stats

    run(scenario())
