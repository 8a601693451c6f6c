"""The one chat template, used to build training shards and to prompt the served model.

ChatML-style turns:

    <|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n

A conversation ends with <|endoftext|>. Training and serving both call `render_chat` and
`encode_chat`, so a prompt at serving time tokenizes exactly as the same turns did in training
(tokenization parity, tested). Special-token strings inside user text are defanged so that a
user cannot forge a turn boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

BOS = "<|im_start|>"
EOS = "<|im_end|>"
EOT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOT, BOS, EOS, PAD)  # ids 0..3 in every tokenizer we train


def _defang(text: str) -> str:
    return text.replace("<|", "<\u2063|") if "<|" in text else text


def render_chat(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                end_of_text: bool = True) -> str:
    parts = [f"{BOS}{m['role']}\n{_defang(m['content'])}{EOS}\n" for m in messages]
    if add_generation_prompt:
        parts.append(f"{BOS}assistant\n")
    elif end_of_text:
        parts.append(EOT)
    return "".join(parts)


def encode_chat(tokenizer, messages: Sequence[dict[str, Any]],
                add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation (HF `tokenizers.Tokenizer`), as training and serving see it."""
    text = render_chat(messages, add_generation_prompt=add_generation_prompt,
                       end_of_text=not add_generation_prompt)
    return tokenizer.encode(text, add_special_tokens=False).ids


class PromptTooLong(ValueError):
    def __init__(self, tokens: int, budget: int):
        super().__init__(f"the messages take {tokens} tokens; this model's window leaves {budget} "
                         "for the prompt after max_tokens")
        self.tokens, self.budget = tokens, budget


def fit_turns(tokenizer, history: Sequence[dict[str, Any]], messages: Sequence[dict[str, Any]],
              budget: int) -> list[dict[str, Any]]:
    """The prompt for `messages` with as much of `history` (older turns of the session) as fits.

    The request's own messages must fit in `budget` tokens (else PromptTooLong); history turns are
    added newest first, whole turns only, after any leading system messages of the request. The
    result is rendered by `encode_chat`, as in training, so the served model sees the same tokens
    the same turns produced in its training shards."""
    n_sys = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    head, tail = list(messages[:n_sys]), list(messages[n_sys:])
    need = len(encode_chat(tokenizer, messages, add_generation_prompt=True))
    if need > budget:
        raise PromptTooLong(need, budget)
    chosen: list[dict[str, Any]] = []
    for turn in reversed(history):
        trial = head + [turn] + chosen + tail
        if len(encode_chat(tokenizer, trial, add_generation_prompt=True)) > budget:
            break
        chosen.insert(0, turn)
    return head + chosen + tail


MEMORY_HEADER = "Earlier:"  # short: on a small model's window every token of the prompt counts


def memory_message(memories: Sequence[str]) -> dict[str, str]:
    """The system message recalled memories go into (tasks/serve/memory/)."""
    return {"role": "system", "content": MEMORY_HEADER + "\n" + "\n".join(f"- {m}" for m in memories)}


def with_memories(tokenizer, memories: Sequence[str], messages: Sequence[dict[str, Any]], budget: int,
                  share: float) -> tuple[list[dict[str, Any]], int]:
    """`messages` with one system message of recalled memories after the request's own leading
    system messages: as many whole memories, best first, as fit in `share` of `budget` (and in the
    budget at all). Returns the messages and how many memories went in (0: `messages` unchanged)."""
    messages = list(messages)
    if not memories:
        return messages, 0
    n_sys = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    base = len(encode_chat(tokenizer, messages, add_generation_prompt=True))
    room = min(int(budget * share), budget - base)
    for n in range(len(memories), 0, -1):
        trial = messages[:n_sys] + [memory_message(memories[:n])] + messages[n_sys:]
        if len(encode_chat(tokenizer, trial, add_generation_prompt=True)) - base <= room:
            return trial, n
    return messages, 0
