"""Serving parts without servers: padded batch decoding, context fitting, admission, routing, safety, export
config."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from tasks.config import SafetyConfig
from tasks.model.chat_template import PromptTooLong, encode_chat, fit_turns
from tasks.model.gpt import GPT, GPTConfig, KVCache, generate_stream
from tasks.names import BadName, check_name, check_version
from tasks.safety import SafetyFilter
from tasks.serve.admission import BATCH, INTERACTIVE, Admission, Overloaded
from tasks.serve.export import config_pbtxt
from tasks.serve.gateway import ApiError, Router
from tasks.serve.repository import served_versions
from tests.helpers.project import make_settings
from tests.helpers.serving import small_tokenizer


@pytest.fixture(scope="module")
def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=96, n_layer=2, n_head=2, d_model=32, block_size=48)).eval()


@pytest.mark.parametrize("pos", ["rotary", "learned"])
def test_left_padded_batch_gives_each_row_its_own_logits(pos):
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=96, n_layer=2, n_head=2, d_model=32, block_size=48, pos=pos)).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15]]
    longest = max(map(len, prompts))
    pad = torch.tensor([longest - len(p) for p in prompts])
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    cache = KVCache(model.cfg.n_layer)
    with torch.no_grad():
        batched, _ = model(ids, cache=cache, pad=pad)
        nxt = torch.tensor([[20], [21], [22]])
        batched2, _ = model(nxt, cache=cache, pad=pad)
        for b, p in enumerate(prompts):
            alone_cache = KVCache(model.cfg.n_layer)
            alone, _ = model(torch.tensor([p]), cache=alone_cache)
            alone2, _ = model(nxt[b:b + 1], cache=alone_cache)
            torch.testing.assert_close(batched[b, -1], alone[0, -1], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(batched2[b, -1], alone2[0, -1], atol=1e-5, rtol=1e-4)


def test_generate_stream_of_one_is_generate_and_rows_end_on_their_own(gpt):
    prompt = [3, 4, 5, 6]
    expected = gpt.generate(prompt, 10, temperature=0.0)
    steps = list(generate_stream(gpt, [prompt], [10], [0.0]))
    assert [s[0] for s in steps] == expected
    # different limits in one batch: each row stops at its own
    steps = list(generate_stream(gpt, [prompt, [7, 8]], [3, 6], [0.0, 0.0]))
    assert sum(s[0] is not None for s in steps) == 3 and sum(s[1] is not None for s in steps) == 6
    # a stop token ends its row without being emitted
    first = expected[0]
    steps = list(generate_stream(gpt, [prompt], [10], [0.0], stop_tokens=(first,)))
    assert steps == [[None]]
    with pytest.raises(ValueError):
        next(generate_stream(gpt, [[]], [4], [0.0]))


def test_penalties_and_logit_bias_adjust_only_their_own_row(gpt):
    from tasks.model.gpt import Penalties

    prompt = [3, 4, 5, 6]
    plain = [s[0] for s in generate_stream(gpt, [prompt], [12], [0.0])]
    # neutral adjustments are no adjustments
    assert [s[0] for s in generate_stream(gpt, [prompt], [12], [0.0], penalties=[Penalties()])] == plain
    # a +100 bias on one token makes greedy decoding pick it every step; -100 on the greedy tokens bans them
    forced = list(generate_stream(gpt, [prompt, prompt], [5, 5], [0.0, 0.0],
                                  penalties=[Penalties(bias=((42, 100.0),)), None]))
    assert [s[0] for s in forced] == [42] * 5
    assert [s[1] for s in forced] == plain[:5]  # the other row is as it was
    banned = tuple((t, -100.0) for t in set(plain))
    assert not set(s[0] for s in generate_stream(gpt, [prompt], [12], [0.0],
                                                 penalties=[Penalties(bias=banned)])) & set(plain)
    # a strong frequency or presence penalty keeps greedy decoding from repeating any token
    for pen in (Penalties(frequency=2.0 * 100), Penalties(presence=2.0 * 100)):
        out = [s[0] for s in generate_stream(gpt, [prompt], [12], [0.0], penalties=[pen])]
        assert len(out) == 12 and len(set(out)) == 12, out
    assert len(set(plain)) < 12  # the plain greedy reply does repeat: the penalties changed it


def test_fit_turns_keeps_newest_whole_turns_after_the_system_prompt():
    tok = small_tokenizer()
    history = [{"role": "user", "content": f"question number {i}"} if i % 2 == 0 else
               {"role": "assistant", "content": f"answer number {i}"} for i in range(10)]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    full = fit_turns(tok, history, messages, 10_000)
    assert full == messages[:1] + history + messages[1:]
    budget = len(encode_chat(tok, messages, add_generation_prompt=True)) + 45
    fitted = fit_turns(tok, history, messages, budget)
    kept = fitted[1:-1]
    assert kept and kept == history[-len(kept):] and len(kept) < len(history)
    assert len(encode_chat(tok, fitted, add_generation_prompt=True)) <= budget
    with pytest.raises(PromptTooLong, match="window leaves 3"):
        fit_turns(tok, [], messages, 3)


def test_admission_serves_interactive_first_and_refuses_when_full():
    async def scenario():
        adm = Admission(max_inflight=1, max_queue=3, batch_share=0.34)
        order = []
        await adm.acquire(INTERACTIVE)  # the one slot

        async def waiter(name, prio):
            await adm.acquire(prio)
            order.append(name)
            adm.release()

        batch = asyncio.create_task(waiter("batch", BATCH))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):  # batch may fill only a third of the queue
            await adm.acquire(BATCH)
        inter = [asyncio.create_task(waiter(f"i{i}", INTERACTIVE)) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):  # queue of 3 is full
            await adm.acquire(INTERACTIVE)
        adm.release()
        await asyncio.gather(batch, *inter)
        assert order == ["i0", "i1", "batch"]
        assert adm.inflight == 0 and adm.queued == 0

    asyncio.run(scenario())


def test_admission_cancelled_waiter_does_not_leak_a_slot():
    async def scenario():
        adm = Admission(max_inflight=1, max_queue=4)
        await adm.acquire()
        t = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0)
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)
        adm.release()
        assert adm.inflight == 0
        await asyncio.wait_for(adm.acquire(), 1)

    asyncio.run(scenario())


def test_admission_wait_has_a_deadline_and_a_late_slot_is_not_lost():
    async def scenario():
        adm = Admission(max_inflight=1, max_queue=4, timeout_s=0.05)
        await adm.acquire()
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(Overloaded, match="no slot within 0.05s"):
            await adm.acquire()
        assert asyncio.get_running_loop().time() - t0 < 1 and adm.queued == 0
        waiting = asyncio.create_task(adm.acquire())  # gets the slot released before its deadline
        await asyncio.sleep(0.01)
        adm.release()
        await waiting
        assert adm.inflight == 1
        adm.release()
        assert adm.inflight == 0

    asyncio.run(scenario())


def test_router_aliases_sticky_split_and_unknown_models(tmp_path):
    d = tmp_path / "chat-gpt"
    d.mkdir()
    (d / "aliases.json").write_text(json.dumps({"champion": 1, "challenger": 2}))
    r = Router(tmp_path, "chat-gpt")
    r.ready = {1, 2}
    assert r.route("chat-gpt", "s").version == 1
    assert r.route("chat-gpt:challenger", "s").version == 2 and r.route("chat-gpt:2", "s").alias is None
    (d / "traffic.json").write_text(json.dumps({"challenger": 25}))
    sides = {k: r.route("chat-gpt", f"session-{k}").version for k in range(2000)}
    share = sum(v == 2 for v in sides.values()) / len(sides)
    assert 0.2 < share < 0.3
    assert all(r.route("chat-gpt", f"session-{k}").version == v
               for k, v in list(sides.items())[:200])  # sticky
    for bad in ("gpt-4", "chat-gpt:nope", "chat-gpt:7"):
        with pytest.raises(ApiError) as e:
            r.route(bad, "s")
        assert e.value.status == 404 and e.value.code == "model_not_found"
    r.ready = set()
    with pytest.raises(ApiError) as e:
        r.route("chat-gpt", "s")
    assert e.value.status == 503


def test_safety_filter_rules_classifier_and_version():
    f = SafetyFilter(SafetyConfig(blocked_patterns=(r"\bbuild a bomb\b",), classifier_threshold=0.8))
    assert f.check("How do I reset my password?").blocked is False
    v = f.check("please tell me how to BUILD A BOMB")
    assert v.blocked and v.rule == "pattern:0"
    v = f.check("you are a fucking idiot, shit")
    assert v.blocked and v.rule == "classifier" and v.score >= 0.8
    other = SafetyFilter(SafetyConfig(blocked_patterns=(r"\bbomb\b",)))
    assert f.version.startswith("2026.11.1+") and f.version != other.version


def test_export_names_versions_and_config(tmp_path):
    for bad in ("../etc", "a/b", ".hidden", "", "x" * 65, "chat gpt"):
        with pytest.raises(BadName):
            check_name(bad)
    for bad in ("0", "-1", "1/../2", "abc", "01"):
        with pytest.raises(BadName):
            check_version(bad)
    assert check_version("12") == 12
    s = make_settings(tmp_path, "serve.triton.max_batch_size=8", "serve.triton.preferred_batch_sizes=[2,8]",
                      "serve.triton.max_queue_delay_us=500")
    text = config_pbtxt(s, "chat-gpt", decoupled=False)
    assert 'name: "chat-gpt"' in text and "max_batch_size: 8" in text
    assert "preferred_batch_size: [ 2, 8 ] max_queue_delay_microseconds: 500" in text
    assert "decoupled" not in text and "decoupled: true" in config_pbtxt(s, "chat-gpt-stream", decoupled=True)
    assert served_versions(tmp_path, "chat-gpt") == []


def test_preferred_batch_sizes_must_fit_max_batch_size(tmp_path):
    from tasks.config import ConfigError

    with pytest.raises(ConfigError, match="preferred_batch_sizes"):
        make_settings(tmp_path, "serve.triton.max_batch_size=4", "serve.triton.preferred_batch_sizes=[8]")


def test_gateway_api_keys_from_the_environment_401_without_them(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from tasks.procs import free_port
    from tasks.serve.gateway import create_app

    key = "sk-test-" + "x" * 24
    monkeypatch.setenv("LLMOPS_GATEWAY_API_KEYS", f"{key}, sk-other-{'y' * 16}")
    s = make_settings(tmp_path, "serve.gateway.api_keys_env=LLMOPS_GATEWAY_API_KEYS",
                      f"serve.triton.grpc_port={free_port()}")
    with TestClient(create_app(s), base_url="http://127.0.0.1") as http:
        for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": key}):
            r = http.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
            assert r.headers["www-authenticate"] == "Bearer"
        r = http.post("/v1/chat/completions",
                      json={"model": "chat-gpt", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 401
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert http.get("/v1/models",
                        headers={"Authorization": f"bearer sk-other-{'y' * 16}"}).status_code == 200
        # probes and scrapers need no key: no model server here
        assert http.get("/healthz").status_code == 503
        assert "gateway_rejected_total" in http.get("/metrics").text
    monkeypatch.setenv("LLMOPS_GATEWAY_API_KEYS", "short")
    with pytest.raises(ValueError, match="LLMOPS_GATEWAY_API_KEYS"):
        create_app(s)


def _routing(**kw):
    from tasks.config import RoutingConfig

    return RoutingConfig(**kw)


def test_tier_policy_light_heavy_and_the_thresholds_inclusive():
    from tasks.serve.tiers import decide

    cfg = _routing(max_prompt_tokens=48, max_tokens=32)

    def auto(prompt, max_tokens, served=True):
        return decide(cfg, asked=None, header=None, max_tokens=max_tokens, prompt_tokens=lambda: prompt,
                      small_served=served)

    d = auto(12, 16)
    assert (d.tier, d.reason, d.kind) == ("small", "light(prompt=12<=48,max_tokens=16<=32)", "light")
    assert auto(48, 32).tier == "small"  # at the thresholds: still light
    assert (auto(12, 64).tier, auto(12, 64).reason) == ("large", "heavy(max_tokens=64>32)")
    assert auto(49, 16).reason == "heavy(prompt=49>48)"  # both conditions must hold: a long prompt is heavy
    assert auto(60, 64).reason == "heavy(prompt=60>48,max_tokens=64>32)"
    assert (auto(12, 16, served=False).tier, auto(12, 16, served=False).reason) == \
        ("large", "small-tier-not-served")


def test_tier_policy_headers_model_ids_and_their_conflicts():
    from tasks.serve.tiers import TierError, decide

    cfg = _routing()

    def never() -> int:
        raise AssertionError("prompt tokens are counted only when the light/heavy rule decides")

    def d(header, asked=None, served=True, max_tokens=16):
        return decide(cfg, asked=asked, header=header, max_tokens=max_tokens, prompt_tokens=never,
                      small_served=served)

    # forces the main model on a light request
    assert (d("large").tier, d("large").reason) == ("large", "header")
    assert (d("small", max_tokens=500).tier, d("small", max_tokens=500).reason) == ("small", "header")
    assert (d(" Small ").tier, d("LARGE").tier) == ("small", "large")  # header values are case-insensitive
    assert (d("small", served=False).tier, d("small", served=False).reason) == \
        ("large", "small-tier-not-served")
    assert (d(None, asked="small").tier, d(None, asked="small").reason) == ("small", "model")
    assert (d("auto", asked="large").tier, d("small", asked="small").reason) == ("large", "model")
    for header, asked in (("large", "small"), ("small", "large")):
        with pytest.raises(TierError, match="X-Tier: .* contradicts"):
            d(header, asked=asked)
    with pytest.raises(TierError, match="X-Tier must be one of small, large, auto; got 'tiny'"):
        d("tiny")
    off = _routing(enabled=False)
    assert decide(off, asked=None, header="small", max_tokens=4, prompt_tokens=never,
                  small_served=True).reason == "routing-disabled"


def test_model_ids_name_their_tier():
    from tasks.serve.tiers import small_model_id, tier_of_model

    cfg = _routing(aliases=("chat-gpt-mini",))
    assert tier_of_model("chat-gpt", "chat-gpt", cfg) is None  # the policy decides
    assert tier_of_model("chat-gpt:1", "chat-gpt", cfg) == \
        tier_of_model("chat-gpt:champion", "chat-gpt", cfg) == "large"
    for small in ("chat-gpt-small", "chat-gpt-small:champion", "chat-gpt-small:3", "chat-gpt-mini",
                  "chat-gpt-mini:2"):
        assert tier_of_model(small, "chat-gpt", cfg) == "small", small
    assert tier_of_model("gpt-9", "chat-gpt", cfg) == "large"  # unknown: the main router answers 404
    assert tier_of_model("chat-gpt-small", "chat-gpt", _routing(enabled=False)) == "large"
    assert small_model_id("chat-gpt-mini:2", cfg) == "chat-gpt-small:2" and \
        small_model_id("chat-gpt-mini", cfg) == "chat-gpt-small"


def test_routing_config_is_validated(tmp_path):
    from tasks.config import ConfigError

    s = make_settings(tmp_path)
    assert (s.serve.routing.enabled, s.serve.routing.small_model, s.serve.routing.header) == \
        (True, "chat-gpt-small", "X-Tier")
    for bad, key in (("serve.routing.small_model=../x", "small_model"),
                     ("serve.routing.aliases=[a:b]", "aliases"),
                     ("serve.routing.header='X Tier'", "header"),
                     ("serve.routing.max_tokens=0", "max_tokens"), ("serve.routing.tiers=2", "tiers")):
        with pytest.raises(ConfigError, match=f"serve.routing.{key}"):
            make_settings(tmp_path, bad)
    # the rollout and export are pointed at the small tier this way: allowed, and a gateway so configured
    # has one tier
    one = make_settings(tmp_path, "serve.triton.model_name=chat-gpt-small")
    from tasks.serve.gateway import Gateway

    assert list(Gateway(one).tiers) == ["large"] and list(Gateway(s).tiers) == ["large", "small"]


def test_small_tier_router_has_its_own_split_and_shadow(tmp_path):
    for name, aliases, traffic in (("chat-gpt", {"champion": 1, "challenger": 2}, {"challenger": 0}),
                                   ("chat-gpt-small", {"champion": 1, "challenger": 2},
                                    {"challenger": 100, "shadow": 0})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "aliases.json").write_text(json.dumps(aliases))
        (tmp_path / name / "traffic.json").write_text(json.dumps(traffic))
    large, small = Router(tmp_path, "chat-gpt"), Router(tmp_path, "chat-gpt-small", "small")
    large.ready = small.ready = {1, 2}
    r = small.route("chat-gpt-small", "s")
    assert (r.triton_model, r.version, r.alias, r.tier) == ("chat-gpt-small", 2, "challenger", "small")
    assert large.route("chat-gpt", "s").version == 1 and large.route("chat-gpt", "s").tier == "large"
    assert small.model_ids() == ["chat-gpt-small", "chat-gpt-small:challenger", "chat-gpt-small:champion",
                                 "chat-gpt-small:1", "chat-gpt-small:2"]
    (tmp_path / "chat-gpt-small" / "traffic.json").write_text(json.dumps({"challenger": 0, "shadow": 100}))
    champ = small.route("chat-gpt-small", "s")
    mirror = small.shadow_of(champ, "s")
    assert mirror is not None and \
        (mirror.triton_model, mirror.version, mirror.tier) == ("chat-gpt-small", 2, "small")
    assert large.shadow_of(large.route("chat-gpt", "s"), "s") is None  # the main tier's files say no shadow


def test_coalescing_shares_one_inference_and_survives_its_first_request_being_cancelled(tmp_path):
    """The model server itself is in tests/integration/test_serving.py (Triton's own inference count);
    here only the sharing: who waits, what they get when the first request fails or is cancelled."""
    from tasks.serve.gateway import ChatRequest, Gateway, Route

    gw = Gateway(make_settings(tmp_path, "serve.memory.enabled=false"))
    route = Route("chat-gpt", "chat-gpt", 1, "champion")
    calls = []

    async def infer(route, prompt, max_tokens, req, priority=0):
        calls.append(prompt[-1]["content"])
        await asyncio.sleep(0.05)
        if prompt[-1]["content"] == "boom":
            raise RuntimeError("model server failed")
        return {"text": f"re: {prompt[-1]['content']}", "prompt_tokens": 3, "completion_tokens": 2}

    gw.infer = infer
    greedy = ChatRequest(model="chat-gpt", messages=[{"role": "user", "content": "x"}], temperature=0)
    sampled = ChatRequest(model="chat-gpt", messages=[{"role": "user", "content": "x"}], temperature=0.7)

    def ask(text, req=greedy):
        return gw.infer_once(route, [{"role": "user", "content": text}], 8, req, INTERACTIVE)

    async def scenario():
        outs = await asyncio.gather(*[ask("hi") for _ in range(5)])
        assert calls == ["hi"] and [shared for _, shared in outs] == [False, True, True, True, True]
        assert {o["text"] for o, _ in outs} == {"re: hi"} and gw.admission.inflight == 0
        calls.clear()
        await asyncio.gather(*[ask("hi", sampled) for _ in range(3)])  # unseeded sampling: each its own
        assert len(calls) == 3
        calls.clear()
        results = await asyncio.gather(*[ask("boom") for _ in range(3)], return_exceptions=True)
        assert calls == ["boom"] and all(isinstance(r, RuntimeError) for r in results)
        calls.clear()
        first = asyncio.create_task(ask("late"))
        await asyncio.sleep(0.01)
        follower = asyncio.create_task(ask("late"))
        await asyncio.sleep(0.01)
        first.cancel()  # its client went away: the follower asks Triton itself, and gets its answer
        out, shared = await follower
        assert out["text"] == "re: late" and not shared and calls == ["late", "late"] and not gw._inflight
        assert gw.metrics.coalesced._value.get() == 4
    asyncio.run(scenario())


def test_stop_strings_cut_the_reply_even_across_streamed_chunks():
    from tasks.serve.gateway.schema import StopScanner, cut_at_stop

    assert cut_at_stop("Sure. END and more", ["END", "\n\n"]) == ("Sure. ", True)
    assert cut_at_stop("no stop here", ["END"]) == ("no stop here", False)
    assert cut_at_stop("anything", None) == ("anything", False)
    for chunks in (["Sure. E", "N", "D and more"], ["Sure. ", "END"], ["Sure. EN", "Dless"]):
        sc = StopScanner(["END"])
        sent = "".join(sc.feed(c) for c in chunks) + sc.flush()
        assert sent == "Sure. " and sc.hit, (chunks, sent)
    sc = StopScanner(["END"])  # a held-back "EN" that turns out not to be the stop is sent after all
    assert sc.feed("Hello EN") == "Hello " and sc.feed("GLAND") == "ENGLAND"
    assert sc.flush() == "" and not sc.hit
    sc = StopScanner(["<<<"])
    assert sc.feed("a <") + sc.flush() == "a <" and not sc.hit  # the stream ended: the tail is sent
    assert StopScanner(None).feed("x") == "x"


def test_unsupported_openai_parameters_answer_400_naming_them(tmp_path):
    from fastapi.testclient import TestClient

    from tasks.procs import free_port
    from tasks.serve.gateway import create_app

    s = make_settings(tmp_path, f"serve.triton.grpc_port={free_port()}")
    base = {"model": "chat-gpt", "messages": [{"role": "user", "content": "hi"}]}
    with TestClient(create_app(s), base_url="http://127.0.0.1") as http:
        for param, value in (("logprobs", True), ("top_logprobs", 3),
                             ("response_format", {"type": "json_object"}),
                             ("tools", [{"type": "function", "function": {"name": "f"}}]),
                             ("tool_choice", "required"), ("audio", {"voice": "alloy"}),
                             ("modalities", ["text", "audio"])):
            r = http.post("/v1/chat/completions", json={**base, param: value})
            assert r.status_code == 400, (param, r.text)
            err = r.json()["error"]
            assert (err["param"], err["code"]) == (param, "unsupported_parameter") and param in err["message"]
        for param, value in (("stop", ["a", "b", "c", "d", "e"]), ("stop", [""]), ("n", 2),
                             ("presence_penalty", 2.5), ("logit_bias", {"x": 1}), ("logit_bias", {"5": 101})):
            r = http.post("/v1/chat/completions", json={**base, param: value})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        # supported values and the neutral values of the rest: past validation, this request meets the missing
        # model server
        r = http.post("/v1/chat/completions", json={
            **base, "presence_penalty": 0.5, "logit_bias": {"5": -100}, "frequency_penalty": None,
            "logprobs": False, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
            "stop": "\n\n"})
        assert r.status_code == 503, r.text
