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


def encode_chat(tokenizer, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation (HF `tokenizers.Tokenizer`), as training and serving see it."""
    text = render_chat(messages, add_generation_prompt=add_generation_prompt, end_of_text=not add_generation_prompt)
    return tokenizer.encode(text, add_special_tokens=False).ids
