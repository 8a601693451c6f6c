"""Serving without and with servers: a small tokenizer to test with, the fast training overrides of the
serving tests, and the gateway started as its own process."""

from __future__ import annotations

import os
import subprocess
import sys

from tasks.procs import free_port
from tasks.serve.server import wait_gateway
from tests.helpers.project import REPO

FAST = ["model.block_size=64", "train.micro_batch=8", "train.world_size=1", "train.zero_stage=0",
        "train.warmup_steps=5", "train.eval_every=20", "eval.reply_samples=12", "eval.max_new_tokens=16",
        "eval.perplexity_windows=16", "eval.latency_requests=4"]


def small_tokenizer(corpus: tuple[str, ...] = ("hello there, how can I help you today?",),
                    vocab_size: int = 300):
    """A small byte-level BPE with the chat template's special tokens, trained on `corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tasks.model.chat_template import SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus) * 20, trainer=trainer)
    return tok


def start_gateway(s, *extra: str, headers: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """The gateway as its own process (FAST and `extra` set) in front of `s`'s tritonserver; waits until it
    answers (sending `headers`: the key, when keys are on). Returns the process and its base URL."""
    port = free_port()
    t = s.serve.triton
    args = [sys.executable, "-m", "tasks.serve.gateway", "--port", str(port),
            "--set", f"paths.root={s.paths.root}",
            *[a for x in (*FAST, f"serve.triton.grpc_port={t.grpc_port}",
                          f"serve.triton.http_port={t.http_port}", *extra)
              for a in ("--set", x)]]
    log = s.paths.root / f"gateway-{port}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "NO_PROXY": "127.0.0.1"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_gateway(f"{base}/v1", 60, log, headers)
    except Exception:
        proc.kill()
        raise
    return proc, base
