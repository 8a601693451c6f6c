"""The continuous-batching engine (tasks/model/engine.py) on a small GPT, in process: sequences join
and leave the running batch at every step and still get exactly their solo generate() tokens."""

import threading

import pytest
import torch

from tasks.model import gpt
from tasks.model.engine import BATCH, Engine, Seq
from tasks.model.gpt import GPT, GPTConfig, Penalties
from tasks.model.prefix_cache import PrefixKV

STOP = (1,)


@pytest.fixture(scope="module", params=["rotary", "learned"])
def model(request):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=97, n_layer=2, n_head=2, d_model=32, block_size=64,
                         pos=request.param)).eval()


def _solo(model, seq_args):
    ids, n, temp, seed = seq_args
    g = torch.Generator().manual_seed(seed) if temp > 0 else None
    return model.generate(ids, n, temperature=temp, stop_tokens=STOP, generator=g)


def _seq(args, **kw):
    ids, n, temp, seed = args
    g = torch.Generator().manual_seed(seed) if temp > 0 else None
    return Seq(list(ids), n, temperature=temp, generator=g, **kw)


PROMPTS = [([5, 17, 3, 44, 9], 20, 0.0, 0), ([7, 8], 12, 0.0, 0),
           ([2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 30, 0.9, 7),
           ([60] * 30, 40, 0.0, 0), ([33, 34], 5, 1.2, 3), ([9, 9, 9], 25, 0.7, 11)]


def test_staggered_sequences_equal_their_solo_generate(model):
    engine = Engine(model, gpt, stop_tokens=STOP, max_seqs=3, max_batch_tokens=8)  # chunked prefill too
    seqs = []
    for args in PROMPTS:  # one new sequence every two steps: joins mid-decode
        seqs.append(_seq(args))
        engine.submit(seqs[-1])
        engine.step()
        engine.step()
        assert len(engine.decoding) + len(engine.prefilling) <= 3
    while not engine.idle:
        engine.step()
    for s, args in zip(seqs, PROMPTS, strict=True):
        assert s.out == _solo(model, args), args
        assert s.finish in ("stop", "length")
        ph = s.phases()
        assert min(ph.values()) >= 0
        assert abs(sum(ph.values()) - (s.t_end - s.t_submit) * 1e3) < 1e-6
    assert engine.stats["joined_mid_decode"] >= 3
    assert engine.stats["finished"] == len(PROMPTS)
    assert engine.stats["decode_tokens"] == sum(len(s.out) for s in seqs)


def test_a_later_request_finishes_before_a_long_one_ends(model):
    engine = Engine(model, gpt, max_seqs=4, max_batch_tokens=64)
    long, short = Seq([5, 6, 7], 50), Seq([8, 9], 3)
    engine.submit(long)
    for _ in range(5):
        engine.step()
    engine.submit(short)
    while short.finish is None:
        engine.step()
    assert long.finish is None and len(short.out) == 3 and short.joined == 1
    assert len(long.out) < 50


def test_penalties_and_bias_match_generate_stream(model):
    pen = Penalties(0.5, 0.8, ((4, 5.0),))
    ref = [s[0] for s in gpt.generate_stream(model, [[5, 17, 3]], [15], [0.0], penalties=[pen])
           if s[0] is not None]
    engine = Engine(model, gpt, max_seqs=2, max_batch_tokens=16)
    s = Seq([5, 17, 3], 15, penalties=pen)
    other = Seq([7, 8], 15)
    engine.submit(s)
    engine.submit(other)
    while not engine.idle:
        engine.step()
    assert s.out == ref and 4 in s.out
    assert other.out == model.generate([7, 8], 15, temperature=0.0)


def test_cancel_stops_within_one_step_and_frees_the_slot(model):
    engine = Engine(model, gpt, max_seqs=1, max_batch_tokens=16)
    gone = threading.Event()
    a = Seq([5, 6], 60, cancelled=gone.is_set)
    b = Seq([7, 8], 4)
    engine.submit(a)
    engine.submit(b)
    for _ in range(3):
        engine.step()
    assert b.t_admit == 0.0  # one slot: b waits
    n = len(a.out)
    gone.set()
    engine.step()
    assert a.finish == "cancelled" and len(a.out) == n  # not one token more
    assert b.t_admit > 0  # its slot went to b at the same step
    while not engine.idle:
        engine.step()
    assert b.finish == "length" and engine.stats["cancelled"] == 1


def test_priority_and_deadline_order_admission(model):
    engine = Engine(model, gpt, max_seqs=1, max_batch_tokens=16)
    running = Seq([5, 6], 4)
    engine.submit(running)
    engine.step()
    batch, interactive = Seq([7], 2, priority=BATCH), Seq([8], 2)
    late = Seq([9], 2, deadline=0.0)  # already past
    for s in (batch, interactive, late):
        engine.submit(s)
    while not engine.idle:
        engine.step()
    assert late.finish == "timeout" and not late.out
    assert interactive.t_admit < batch.t_admit


def test_prefix_cache_and_window_limits(model):
    kv = PrefixKV(1 << 20, 4)
    engine = Engine(model, gpt, max_seqs=2, max_batch_tokens=32, prefix_kv=kv)
    system = list(range(10, 22))
    first, second = Seq(system + [5, 6], 8, cuts=[12]), Seq(system + [7], 8, cuts=[12])
    for s in (first, second):
        engine.submit(s)
        while not engine.idle:
            engine.step()
    assert (first.cached_tokens, second.cached_tokens) == (0, 12)
    assert first.out == model.generate(system + [5, 6], 8, temperature=0.0)
    assert second.out == model.generate(system + [7], 8, temperature=0.0)
    near_full = Seq([3] * 60, 50)  # 4 positions left in the 64-token window
    too_long = Seq([3] * 64, 5)
    for s in (near_full, too_long):
        engine.submit(s)
    while not engine.idle:
        engine.step()
    assert len(near_full.out) <= 4 and near_full.finish in ("stop", "length")
    assert too_long.finish == "error" and "window" in too_long.error


def test_bad_budgets_are_refused(model):
    with pytest.raises(ValueError, match="max_batch_tokens"):
        Engine(model, gpt, max_seqs=8, max_batch_tokens=4)


def test_run_thread_serves_submissions(model):
    engine = Engine(model, gpt, max_seqs=4, max_batch_tokens=32)
    stop = threading.Event()
    t = threading.Thread(target=engine.run, args=(stop,), daemon=True)
    t.start()
    done = [threading.Event() for _ in range(6)]
    seqs = [Seq([5 + i, 6], 10, on_finish=lambda s, e=e: e.set()) for i, e in enumerate(done)]
    for s in seqs:
        engine.submit(s)
    assert all(e.wait(30) for e in done)
    stop.set()
    t.join(5)
    assert [s.out for s in seqs] == [model.generate([5 + i, 6], 10, temperature=0.0) for i in range(6)]
    snap = engine.snapshot()
    assert snap["running"] == 0 and snap["finished"] == 6 and snap["kv_bytes"] > 0


def test_joiners_prefilled_together_still_equal_their_solo_generate(model):
    engine = Engine(model, gpt, stop_tokens=STOP, max_seqs=6, max_batch_tokens=256)
    seqs = [_seq(args) for args in PROMPTS]
    for s in seqs:
        engine.submit(s)
    engine.step()  # all six admitted and prefilled in one left-padded forward
    assert not engine.prefilling and engine.stats["prefill_tokens"] == sum(len(a[0]) for a in PROMPTS)
    while not engine.idle:
        engine.step()
    assert [s.out for s in seqs] == [_solo(model, args) for args in PROMPTS]


def test_cancel_checks_are_rate_limited_when_asked(model):
    engine = Engine(model, gpt, max_seqs=2, max_batch_tokens=16, cancel_check_s=3600.0)
    asked = []
    s = Seq([5, 6], 10, cancelled=lambda: asked.append(1) or False)
    engine.submit(s)
    while not engine.idle:
        engine.step()
    assert len(asked) <= 1 and s.finish == "length"  # checked at most once in the hour
