"""Long-term session memory: older exchanges, condensed and embedded, recalled when relevant.

    memory = SessionMemory(settings.serve.memory, pii_kinds)
    await memory.start()                          # loads the embedder, starts the worker (in-process mode)
    memory.remember("s1", None, "My dog is called Biscuit.", "Nice name!")   # queued: returns at once
    await memory.recall("s1", None, "What is my dog called?", history)       # [(Memory, cosine), ...]
    await memory.forget_session("s1")             # every memory, queued job and vector of the session

The request path only queues a finished exchange (`remember`) and, for a new request, embeds the
question and searches the index (`recall`); condensing, scrubbing and embedding the exchange happen
in a worker (the gateway's own task, or `llmops memory-worker` processes reading a Redis stream).

Where things live, by `serve.memory`:
- index "" : a numpy index in this process. Exact cosine search: a session holds at most
  max_bytes_per_session (~150 memories at the default), where a scan beats any ANN structure.
- index postgresql://... : table llmops_memory; the pgvector column type and its `<=>` cosine
  operator when the extension is installed, else the vectors as float32 bytea scored here.
- queue "" : an in-process queue; queue redis://... : the stream llmops:memory:jobs with the
  consumer group "embedders" (entries acknowledged and deleted once stored).

Eviction (each limit on its own): a memory unused (neither written nor recalled) for ttl_s is
gone; past max_bytes_per_session the session's least recently used memories go first; past
max_sessions the least recently used sessions go whole. A memory's size is its summary text, its
vector and a fixed 64 bytes of record.

Deleting a session (or a user) drops its queued exchanges, marks it forgotten for any exchange a
worker holds at that moment (checked again after the write, so none comes back), and deletes its
memories and vectors from the index.
"""

from tasks.serve.memory.embedder import Embedder
from tasks.serve.memory.index import Index, LocalIndex, PostgresIndex
from tasks.serve.memory.queue import LocalQueue, RedisQueue
from tasks.serve.memory.records import (
    FORGET_KEEP_S,
    RECORD_BYTES,
    Job,
    Memory,
    condense,
    exchange_hash,
    history_hashes,
)
from tasks.serve.memory.session import SessionMemory

__all__ = ["FORGET_KEEP_S", "RECORD_BYTES", "Embedder", "Index", "Job", "LocalIndex", "LocalQueue", "Memory",
           "PostgresIndex", "RedisQueue", "SessionMemory", "condense", "exchange_hash", "history_hashes"]
