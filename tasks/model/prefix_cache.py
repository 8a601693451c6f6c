"""Prefix caching in the model server: frequently used context (system prompts) is not redone per request.

Two bounded LRUs, one pair per model instance (tasks/serve/triton_model.py):

    prompts = PromptEncoder(tokenizer, render_chat)        # tasks.model.chat_template.render_chat
    ids, cuts = prompts.encode(messages)                   # ids == encode_chat(tokenizer, messages, True)
    kv = PrefixKV(max_bytes=64 << 20, min_tokens=16)        # max_bytes 0: off, computes nothing
    prefix, cached = kv.for_batch(batch_ids, batch_cuts, lambda ids: gpt.prefill(model, ids))
    # cached[b]: row b's tokens whose K/V was reused
    gpt.generate_stream(model, batch_ids, ..., prefix=prefix)

`PromptEncoder` tokenizes each leading system message once per content hash (sha256 of its
rendered text) and the rest of the conversation per request; `cuts` are the token counts after
each leading system message. The pieces concatenate to exactly `encode_chat` of the whole: each
piece ends just before a turn's <|im_start|>, and the tokenizer splits its input on special tokens
before anything else, so no token spans a cut.

`PrefixKV` keeps the K/V of those prefixes, keyed by sha256 of their token ids and bounded by
bytes. A batch whose rows all start with the same tokens up to a cut (at least `min_tokens` long)
starts its prefill from the longest such prefix in the cache. On a miss the longest shared prefix
is computed once (a batch of one), kept together with its shorter cuts (slices of the same K/V:
a static system prompt stays cached when a varying system message, e.g. recalled memories, follows
it), and used at once. Rows of different prefixes in one batch get the full prefill.

This file is copied into each exported version beside gpt.py and chat_template.py and imports
neither: the template and the model come in as arguments.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

TOKENIZED_MESSAGES = 256  # distinct system messages whose token ids are kept (ids only: small)


def leading_system(messages: Sequence[dict[str, Any]]) -> int:
    """How many messages at the start are system messages (the shared, cacheable part of a prompt)."""
    return next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))


class PromptEncoder:
    """`encode_chat(tokenizer, messages, add_generation_prompt=True)`, with each leading system
    message's token ids kept by content hash (a bounded LRU of `entries`; 0 keeps none)."""

    def __init__(self, tokenizer, render_chat: Callable[..., str], entries: int = TOKENIZED_MESSAGES):
        self.tokenizer, self.render_chat, self.entries = tokenizer, render_chat, entries
        self.ids: OrderedDict[str, list[int]] = OrderedDict()
        self.hits = self.misses = 0

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _system(self, message: dict[str, Any]) -> list[int]:
        text = self.render_chat([message], end_of_text=False)  # "<|im_start|>system\n...<|im_end|>\n"
        key = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        ids = self.ids.get(key)
        if ids is not None:
            self.hits += 1
            self.ids.move_to_end(key)
            return ids
        self.misses += 1
        ids = self._encode(text)
        if self.entries > 0:
            self.ids[key] = ids
            if len(self.ids) > self.entries:
                self.ids.popitem(last=False)
        return ids

    def encode(self, messages: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
        """The prompt's token ids, and the token count after each leading system message."""
        n = leading_system(messages)
        ids: list[int] = []
        cuts: list[int] = []
        for m in messages[:n]:
            ids += self._system(m)  # a new list: the kept ids are never written
            cuts.append(len(ids))
        return ids + self._encode(self.render_chat(messages[n:], add_generation_prompt=True)), cuts


def prefix_key(ids: Sequence[int]) -> str:
    """sha256 of the token ids (as int64 in this machine's byte order: keys never leave the process)."""
    return hashlib.sha256(array("q", ids).tobytes()).hexdigest()


def kv_bytes(kv) -> int:
    """Bytes of a KV cache's tensors (every layer's keys and values)."""
    return sum(t.numel() * t.element_size() for t in (*kv.k, *kv.v) if t is not None)


class PrefixKV:
    """K/V of shared prompt prefixes (gpt.KVCache, batch 1) by sha256 of their token ids, least
    recently used out first past `max_bytes`. `max_bytes` 0 turns it off: nothing is looked up,
    computed or kept."""

    def __init__(self, max_bytes: int, min_tokens: int = 16):
        if max_bytes < 0 or min_tokens < 1:
            raise ValueError(f"prefix cache: max_bytes={max_bytes} must be >= 0 and "
                             f"min_tokens={min_tokens} >= 1")
        self.max_bytes, self.min_tokens = max_bytes, min_tokens
        self.entries: OrderedDict[str, Any] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, ids: Sequence[int]):
        key = prefix_key(ids)
        kv = self.entries.get(key)
        if kv is not None:
            self.entries.move_to_end(key)
        return kv

    def put(self, ids: Sequence[int], kv) -> bool:
        """Keep `kv` (its tensors are only read from now on) unless it alone is over the budget."""
        size, key = kv_bytes(kv), prefix_key(ids)
        if size > self.max_bytes or key in self.entries:
            return False
        self.entries[key] = kv
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= kv_bytes(old)
            self.evictions += 1
        return True

    def shared_cuts(self, prompts: Sequence[Sequence[int]], cuts: Sequence[Sequence[int]]) -> list[int]:
        """The cuts, longest first, at which every row has the same tokens before and some after,
        and that are at least `min_tokens` long."""
        if not self.max_bytes or not prompts:
            return []
        first = prompts[0]
        common = set(cuts[0]).intersection(*map(set, cuts[1:]))
        return [c for c in sorted(common, reverse=True)
                if c >= self.min_tokens
                and all(len(p) > c and list(p[:c]) == list(first[:c]) for p in prompts)]

    def for_batch(self, prompts: Sequence[Sequence[int]], cuts: Sequence[Sequence[int]],
                  compute: Callable[[list[int]], Any]) -> tuple[Any, list[int]]:
        """(the K/V to start this batch's prefill from or None, per row the prompt tokens whose K/V
        came from the cache). `cuts[b]`: where row b's leading system messages end (PromptEncoder).
        `compute(ids)` makes a missing prefix's K/V (gpt.prefill): kept, and used at once."""
        shared = self.shared_cuts(prompts, cuts)
        if not shared:
            return None, [0] * len(prompts)
        first = list(prompts[0])
        found = [(c, kv) for c in shared if (kv := self.get(first[:c])) is not None]  # shortest touched last
        if found:
            self.hits += 1
            c, kv = found[0]
            return kv, [c] * len(prompts)
        self.misses += 1
        kv = compute(first[:shared[0]])
        for c in shared:  # the shortest (the most widely shared) goes in last: the most recently used
            self.put(first[:c], kv if c == shared[0] else kv.head(c))
        return kv, [0] * len(prompts)
