import pytest
import torch

from tasks.model.gpt import GPT, GPTConfig


@pytest.mark.parametrize("pos", ["rotary", "learned"])
def test_kv_cache_generates_the_same_tokens(pos):
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=97, n_layer=2, n_head=2, d_model=32, block_size=64, pos=pos))
    prompt = [5, 17, 3, 44, 9]
    greedy = m.generate(prompt, 40, temperature=0.0, use_cache=True)
    assert greedy == m.generate(prompt, 40, temperature=0.0, use_cache=False)
    assert len(greedy) == 40
    sampled = [m.generate(prompt, 30, temperature=0.9, top_k=20, top_p=0.9, use_cache=c,
                          generator=torch.Generator().manual_seed(7)) for c in (True, False)]
    assert sampled[0] == sampled[1]


def test_cached_logits_match_full_forward():
    torch.manual_seed(1)
    m = GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=4, d_model=32, block_size=32)).eval()
    idx = torch.randint(0, 50, (1, 12))
    full, _ = m(idx, targets=idx)  # all positions
    from tasks.model.gpt import KVCache

    cache = KVCache(2)
    m(idx[:, :7], cache=cache)
    step, _ = m(idx[:, 7:8], cache=cache)
    torch.testing.assert_close(step[0, -1], full[0, 7], rtol=1e-4, atol=1e-5)


def test_stop_tokens_and_block_size():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=20, n_layer=1, n_head=1, d_model=8, block_size=16))
    out = m.generate([1, 2, 3], 100, temperature=0.0)
    assert len(out) == 13  # capped by the context
    first = out[0]
    assert m.generate([1, 2, 3], 100, temperature=0.0, stop_tokens=(first,)) == []


def test_bad_config_names_key():
    with pytest.raises(ValueError, match="model.d_model=30 must be divisible by model.n_head=4"):
        GPTConfig(vocab_size=10, d_model=30, n_head=4)


def test_weights_are_tied_and_loss_is_finite():
    m = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, d_model=16, block_size=16))
    assert m.lm_head.weight is m.wte.weight
    x = torch.randint(0, 64, (2, 16))
    _, loss = m(x, x)
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.5


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=40, n_layer=2, n_head=2, d_model=16, block_size=16))
    ckpt = GPT(GPTConfig(vocab_size=40, n_layer=2, n_head=2, d_model=16, block_size=16,
                         activation_checkpointing=True))
    ckpt.load_state_dict(base.state_dict())
    x = torch.randint(0, 40, (2, 16))
    losses = []
    for m in (base, ckpt):
        m.train()
        _, loss = m(x, x)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    for (n, p), q in zip(base.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_generate_batch_matches_one_by_one():
    from tasks.model.gpt import generate_batch

    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=60, n_layer=2, n_head=2, d_model=32, block_size=32))
    prompts = torch.randint(0, 60, (4, 6))
    batch = generate_batch(m, prompts, 10)
    assert batch.shape == (4, 10)
    for i in range(4):
        assert batch[i].tolist() == m.generate(prompts[i].tolist(), 10, temperature=0.0)


def test_int8_variant_is_smaller_and_close():
    from tasks.judge.quantize import model_bytes, quantize_int8

    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=512, n_layer=2, n_head=4, d_model=128, block_size=64)).eval()
    q = quantize_int8(m)
    assert type(q.blocks[0].attn.qkv).__name__ == "Linear" and \
        "quantized" in type(q.blocks[0].attn.qkv).__module__
    assert type(m.blocks[0].attn.qkv) is torch.nn.Linear  # the original is untouched
    assert model_bytes(q) < 0.6 * model_bytes(m)
    x = torch.randint(0, 512, (2, 64))
    a, _ = m(x, x)
    b, _ = q(x, x)
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree > 0.9 and torch.allclose(a, b, atol=0.1)
