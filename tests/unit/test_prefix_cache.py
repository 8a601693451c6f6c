"""The model server's prefix cache (tasks/model/prefix_cache.py): tokenized system messages equal to
encode_chat token for token, and a cached prefix K/V that changes no logit or token, for a batch of
one and for rows of different lengths sharing the prefix; LRU by bytes, off at 0; and the Triton
model's `cached_tokens` output, run against a stand-in for the Python backend's utilities."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import time
import types

import numpy as np
import pytest
import torch

from tasks.model.chat_template import BOS, encode_chat, render_chat
from tasks.model.gpt import GPT, GPTConfig, generate_stream, prefill
from tasks.model.prefix_cache import PrefixKV, PromptEncoder, kv_bytes, prefix_key
from tasks.serve.export import CODE, config_pbtxt
from tests.helpers.project import REPO, make_settings
from tests.helpers.serving import small_tokenizer

SYSTEM = {"role": "system",
          "content": "You are the support assistant of an online shop. Be brief and polite."}


@pytest.fixture(scope="module")
def tok():
    return small_tokenizer(("system\nuser\nassistant\n", SYSTEM["content"],
                            "hello there, how can I help you today?\n\n", "  indented\tand\ttabbed  \n",
                            "naïve café — 東京 ✓ 🙂", "<|not a token|> <| |>"), vocab_size=400)


ODD = ["", " ", "\n", "\n\n  trailing spaces  \n", "\t tabs\t", "naïve café — 東京 ✓ 🙂",
       "<|im_end|>forged<|im_start|>", "<|", "|>", "<|endoftext|>", "ends with a newline\n",
       "\r\nwindows\r\n", "\u2063zero width\u200b", "<"]


def _conversations():
    yield [{"role": "user", "content": "hello"}]  # no system message: nothing to cache
    yield [SYSTEM]  # only a system message
    yield [SYSTEM, {"role": "user", "content": "hello there"}]
    for odd in ODD:
        yield [{"role": "system", "content": odd}, {"role": "user", "content": odd}]
        yield [SYSTEM, {"role": "system", "content": odd + "memories"},
               {"role": "user", "content": "x" + odd}, {"role": "assistant", "content": odd},
               {"role": "user", "content": odd + "?"}]
    yield [SYSTEM, {"role": "user", "content": "a"}, {"role": "system", "content": "late"},
           {"role": "user", "content": "b"}]


def test_tokenized_system_messages_equal_encode_chat_token_for_token(tok):
    enc = PromptEncoder(tok, render_chat)
    bos = tok.token_to_id(BOS)
    for _ in range(2):  # the second round comes from the cache
        for messages in _conversations():
            ids, cuts = enc.encode(messages)
            assert ids == encode_chat(tok, messages, add_generation_prompt=True), messages
            n_sys = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
            assert len(cuts) == n_sys and cuts == sorted(cuts)
            # each cut sits just before a turn's <|im_start|>
            assert all(ids[c] == bos for c in cuts), messages
    assert enc.hits > 0 and enc.hits >= enc.misses
    small = PromptEncoder(tok, render_chat, entries=2)
    for odd in ODD:
        small.encode([{"role": "system", "content": odd}, {"role": "user", "content": "q"}])
    assert len(small.ids) == 2


def _model(pos: str) -> GPT:
    torch.manual_seed(3)
    return GPT(GPTConfig(vocab_size=96, n_layer=2, n_head=2, d_model=32, block_size=64, pos=pos)).eval()


def _run(model, prompts, max_new=8, prefix=None):
    """Greedy tokens per row and the logits of every step (B, V), seen at the lm_head."""
    seen: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(lambda m, i, out: seen.append(out[:, -1].clone()))
    try:
        steps = list(generate_stream(model, prompts, [max_new] * len(prompts), [0.0] * len(prompts),
                                     prefix=prefix))
    finally:
        hook.remove()
    return [[s[b] for s in steps if s[b] is not None] for b in range(len(prompts))], seen


@pytest.mark.parametrize("pos", ["rotary", "learned"])
@pytest.mark.parametrize("suffixes", [[[40, 41, 42, 43]], [[40, 41, 42, 43, 44, 45, 46], [50, 51, 52], [60]],
                                      [[7, 8], [9, 10]]])
def test_cached_prefix_gives_the_same_logits_and_tokens(pos, suffixes):
    model = _model(pos)
    head = [int(x) for x in torch.randint(4, 96, (20,), generator=torch.Generator().manual_seed(5))]
    prompts = [head + s for s in suffixes]
    cuts = [[len(head)]] * len(prompts)
    want_tokens, want_logits = _run(model, prompts)

    cache = PrefixKV(max_bytes=1 << 20, min_tokens=8)
    calls: list[list[int]] = []

    def compute(ids):
        calls.append(ids)
        return prefill(model, ids)

    for hit in (False, True):  # a miss computes the prefix once and uses it; then a hit
        prefix, cached = cache.for_batch(prompts, cuts, compute)
        assert prefix is not None and prefix.length == len(head)
        assert cached == ([len(head)] if hit else [0]) * len(prompts)
        stored = [t.clone() for t in (*prefix.k, *prefix.v)]
        tokens, logits = _run(model, prompts, prefix=prefix)
        assert tokens == want_tokens
        assert len(logits) == len(want_logits)
        for got, want in zip(logits, want_logits, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert all(torch.equal(a, b)
                   for a, b in zip(stored, (*prefix.k, *prefix.v), strict=True))  # never written
    assert calls == [head] and (cache.hits, cache.misses) == (1, 1)


def test_mixed_short_disabled_and_different_prefixes():
    model = _model("rotary")
    a, b = list(range(4, 24)), list(range(30, 50))
    calls = []

    def compute(ids):
        calls.append(ids)
        return prefill(model, ids)

    cache = PrefixKV(max_bytes=1 << 20, min_tokens=8)
    assert cache.for_batch([a + [1], b + [2]], [[20], [20]], compute) == (None, [0, 0])  # mixed: full prefill
    assert cache.for_batch([a + [1], a + [2]], [[20], []], compute) == (None, [0, 0])  # one row without it
    assert cache.for_batch([a[:6] + [1]], [[6]], compute) == (None, [0])  # too short to be worth it
    assert cache.for_batch([a], [[20]], compute) == (None, [0])  # nothing after the prefix
    assert calls == [] and len(cache) == 0
    cache.for_batch([a + [1]], [[20]], compute)
    assert cache.for_batch([a + [5, 6]], [[20]], compute)[1] == [20]  # hit
    assert cache.for_batch([b + [5, 6]], [[20]], compute)[1] == [0]  # a different prefix: a miss
    assert calls == [a, b] and (cache.hits, cache.misses) == (1, 2)

    off = PrefixKV(max_bytes=0)
    assert off.for_batch([a + [1]], [[20]], compute) == (None, [0]) and len(calls) == 2 and len(off) == 0


def test_a_shorter_system_prefix_stays_cached_when_a_varying_message_follows_it():
    """[system prompt][recalled memories][turns]: the system prompt's K/V is kept on its own too."""
    model = _model("rotary")
    system, memo1, memo2 = list(range(4, 24)), list(range(30, 40)), list(range(50, 60))
    cache = PrefixKV(max_bytes=1 << 20, min_tokens=8)
    cache.for_batch([system + memo1 + [70, 71]], [[20, 30]], lambda ids: prefill(model, ids))
    assert len(cache) == 2
    prompt = system + memo2 + [70, 71]
    prefix, cached = cache.for_batch([prompt], [[20, 30]], lambda ids: pytest.fail("should be a hit"))
    assert cached == [20] and prefix.length == 20
    torch.testing.assert_close(prefix.k[0], prefill(model, system).k[0], atol=1e-6, rtol=1e-5)
    assert _run(model, [prompt], prefix=prefix)[0] == _run(model, [prompt])[0]


def test_lru_by_bytes_keeps_the_budget():
    model = _model("learned")
    one = prefill(model, list(range(4, 24)))
    size = kv_bytes(one)
    assert size == 2 * 2 * 20 * 32 * 4  # layers x (k, v) x tokens x d_model x float32: no hidden qkv storage
    cache = PrefixKV(max_bytes=2 * size + size // 2, min_tokens=8)
    keys = [list(range(s, s + 20)) for s in (4, 30, 60)]
    for i, ids in enumerate(keys):
        assert cache.put(ids, prefill(model, ids))
        if i == 1:
            cache.get(keys[0])  # used again: now the newest
        assert cache.bytes <= cache.max_bytes
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None and cache.get(keys[2]) is not None
    assert cache.evictions == 1 and len(cache) == 2
    assert not PrefixKV(max_bytes=size - 1).put(keys[0], one)  # larger than the whole budget: not kept
    assert prefix_key([1, 2]) != prefix_key([2, 1]) and prefix_key([1, 2]) == prefix_key((1, 2))
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixKV(max_bytes=-1)


def test_export_declares_cached_tokens_and_the_cache_settings(tmp_path):
    s = make_settings(tmp_path, "serve.triton.prefix_cache_mb=8", "serve.triton.prefix_cache_min_tokens=24")
    for decoupled in (False, True):
        text = config_pbtxt(s, "chat-gpt", decoupled=decoupled)
        assert '{ name: "cached_tokens" data_type: TYPE_INT32 dims: [ 1 ] }' in text
        assert 'key: "prefix_cache_mb" value: { string_value: "8.0" }' in text
        assert 'key: "prefix_cache_min_tokens" value: { string_value: "24" }' in text
    assert CODE["prefix_cache.py"] == "tasks/model/prefix_cache.py"


# ---------------------------------------------------------------- the Triton model, without Triton

class _In:
    def __init__(self, value):
        self.value = value

    def as_numpy(self):
        return np.array([[self.value]], dtype=np.object_ if isinstance(self.value, bytes) else None)


class _Sender:
    def __init__(self):
        self.sent = []

    def send(self, response, flags=0):
        self.sent.append((response, flags))


class _Request:
    def __init__(self, messages, max_tokens=4):
        self.inputs = {"messages": _In(json.dumps(messages).encode()),
                       "max_tokens": _In(np.int32(max_tokens))}
        self.sender = _Sender()

    def get_response_sender(self):
        return self.sender

    def is_cancelled(self):
        return False


def _pb_utils() -> types.ModuleType:
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    pb.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    pb.using_decoupled_model_transaction_policy = lambda cfg: bool(cfg.get("decoupled"))
    pb.Tensor = lambda name, array: (name, array)
    pb.TritonError = RuntimeError

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.outputs, self.error = {n: a for n, a in output_tensors}, error

    pb.InferenceResponse = InferenceResponse
    return pb


@pytest.fixture
def version_dir(tmp_path, tok):
    from safetensors.torch import save_file

    d = tmp_path / "chat-gpt" / "1"
    d.mkdir(parents=True)
    for dest, src in CODE.items():
        shutil.copy2(REPO / src, d / dest)
    cfg = GPTConfig(vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, d_model=32, block_size=128)
    torch.manual_seed(0)
    state = {k: v for k, v in GPT(cfg).state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model": cfg.to_dict()}))
    tok.save(str(d / "tokenizer.json"))
    return d


def _triton_model(version_dir, monkeypatch, decoupled: bool, cache_mb: str):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _pb_utils())
    # the version's own copies, as Triton imports them
    for name in ("model", "gpt", "chat_template", "prefix_cache", "engine"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(version_dir))
    mod = importlib.import_module("model")
    m = mod.TritonPythonModel()
    params = {"prefix_cache_mb": {"string_value": cache_mb}, "prefix_cache_min_tokens": {"string_value": "8"}}
    m.initialize({"model_config": json.dumps({"parameters": params, "decoupled": decoupled})})
    assert type(m.prefix_kv).__module__ == "prefix_cache"  # imported from the version directory
    for name in ("model", "gpt", "chat_template", "prefix_cache", "engine"):
        sys.modules.pop(name, None)  # the next instance imports its own, as a new backend process would
    return m


@pytest.mark.parametrize("decoupled", [False, True])
def test_triton_model_reports_cached_tokens_and_answers_the_same(version_dir, monkeypatch, tok, decoupled):
    messages = [SYSTEM, {"role": "user", "content": "hello there"}]

    def ask(m, batch):
        reqs = [_Request(x) for x in batch]
        out = m.execute(reqs)
        if decoupled:
            assert out is None  # the engine's thread answers
            deadline = time.monotonic() + 30
            while not all(r.sender.sent and r.sender.sent[-1][1] == 1 for r in reqs):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            finals = [r.sender.sent[-1] for r in reqs]
            assert all(flags == 1 for _, flags in finals)
            return [resp.outputs for resp, _ in finals], [[int(resp.outputs["token_ids"][0, 0]) for resp, _ in
                                                          r.sender.sent[:-1]] for r in reqs]
        assert all(r.error is None for r in out)
        return [r.outputs for r in out], [r.outputs["token_ids"].reshape(-1).tolist() for r in out]

    on = _triton_model(version_dir, monkeypatch, decoupled, "4")
    off = _triton_model(version_dir, monkeypatch, decoupled, "0")
    n_system = len(tok.encode(render_chat([SYSTEM], end_of_text=False), add_special_tokens=False).ids)
    first, tokens = ask(on, [messages])
    assert int(first[0]["cached_tokens"][0, 0]) == 0 and int(first[0]["prompt_tokens"][0, 0]) > n_system
    again, tokens_again = ask(on, [messages])
    assert int(again[0]["cached_tokens"][0, 0]) == n_system >= 8
    assert tokens_again == tokens == ask(off, [messages])[1]
    batch = [messages, [SYSTEM, {"role": "user", "content": "where is my parcel? it has been a week"}]]
    outs, batch_tokens = ask(on, batch)
    assert [int(o["cached_tokens"][0, 0]) for o in outs] == [n_system, n_system]
    assert batch_tokens == ask(off, batch)[1]
    assert all(int(o["cached_tokens"][0, 0]) == 0 for o in ask(off, batch)[0])
    assert len(off.prefix_kv) == 0
