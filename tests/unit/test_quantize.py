"""The int4 tier's arithmetic: round-trip error, packing, Int4Linear against nn.Linear and the kernel
against the dequantize reference, a quantized tiny GPT, and errors that name the config key."""

import pytest
import torch
import torch.nn as nn

from tasks.config import ConfigError
from tasks.judge.quantize import (
    Int4Linear,
    QuantizeError,
    _kernel_works,
    apply_recipe,
    dequantize_int4,
    model_bytes,
    pack_int4,
    quantize_int4,
    quantize_int4_weight,
    unpack_int4,
    variant_recipe,
)
from tasks.model.gpt import GPT, GPTConfig
from tests.helpers.project import make_settings


def _gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=256, n_layer=2, n_head=2, d_model=64, block_size=32)).eval()


def test_round_trip_error_is_within_half_a_step_per_group():
    torch.manual_seed(0)
    # skewed groups: the zero point matters
    w = torch.randn(96, 128) * 0.02 + torch.linspace(-0.01, 0.03, 128)
    codes, sz = quantize_int4_weight(w, 32)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and sz.shape == (4, 96, 2)
    deq = dequantize_int4(codes, sz, 32)
    scale = sz[..., 0].float().T  # (N, G)
    err = (deq - w).reshape(96, 4, 32).abs().amax(-1)
    assert bool((err <= scale / 2 * (1 + 1e-5) + 1e-8).all())
    # 16 levels over a group's range: ~range/15/sqrt(12) rms, about 8 % of a Gaussian weight's norm
    assert float((deq - w).norm() / w.norm()) < 0.12
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


def test_int4_linear_stores_half_a_byte_per_weight_and_matches_nn_linear():
    torch.manual_seed(1)
    lin = nn.Linear(128, 64, bias=True)
    q = Int4Linear.from_linear(lin, 32, kernel=False)
    stored = {n: b.untyped_storage().nbytes() for n, b in q.named_buffers()}
    assert stored == \
        {"weight_packed": 64 * 128 // 2, "scales_and_zeros": (128 // 32) * 64 * 2 * 2, "bias": 64 * 4}
    x = torch.randn(3, 5, 128)
    with torch.no_grad():
        ref, got = lin(x), q(x)
    assert got.shape == ref.shape
    assert float((got - ref).norm() / ref.norm()) < 0.1


@pytest.mark.skipif(not _kernel_works(), reason="torch's CPU int4 kernel is unavailable on this CPU")
def test_the_cpu_kernel_agrees_with_the_dequantize_reference():
    torch.manual_seed(2)
    lin = nn.Linear(256, 384, bias=False)
    fast, ref = Int4Linear.from_linear(lin, 64, kernel=True), Int4Linear.from_linear(lin, 64, kernel=False)
    assert fast.kernel and not ref.kernel
    assert fast.weight_packed.shape == ref.weight_packed.shape  # same bytes, the kernel's own layout
    x = torch.randn(7, 256)
    # the kernel takes bf16 activations: agreement to bf16's precision, not fp32's
    torch.testing.assert_close(fast(x), ref(x.bfloat16().float()), rtol=2e-2,
                               atol=2e-2 * float(ref(x).abs().max()))


def test_quantized_gpt_is_small_generates_and_keeps_its_logits():
    m = _gpt()
    q = quantize_int4(m, 32)
    layers = [mod for mod in q.modules() if isinstance(mod, Int4Linear)]
    assert len(layers) == 2 * 4 and isinstance(q.lm_head, nn.Linear) and q.lm_head.weight is q.wte.weight
    linear_fp32 = sum(mod.weight.numel() * 4 for mod in m.modules()
                      if isinstance(mod, nn.Linear) and mod is not m.lm_head)
    linear_int4 = sum(b.untyped_storage().nbytes() for mod in layers for b in mod.buffers())
    assert linear_int4 / linear_fp32 == pytest.approx(0.5 / 4 + 2 * 2 / 32 / 4)  # codes + bf16 scale and zero
    assert linear_int4 / linear_fp32 < 0.3
    saved = model_bytes(m) - model_bytes(q)
    assert abs(saved - (linear_fp32 - linear_int4)) < 16_000  # the rest is torch.save's per-tensor overhead
    idx = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        a, _ = m(idx, idx)
        b, _ = q(idx, idx)
    assert float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min()) > 0.98
    out = q.generate([3, 1, 4, 1, 5], 8, temperature=0.0)
    assert len(out) == 8 and all(0 <= t < 256 for t in out)


def test_bad_group_size_names_the_key(tmp_path):
    with pytest.raises(QuantizeError, match=r"eval\.int4_group_size=24 .*blocks\.0\.attn\.qkv has "
                                            r"in_features=64"):
        quantize_int4(_gpt(), 24)
    with pytest.raises(ConfigError, match="int4_group_size"):
        make_settings(tmp_path, "eval.int4_group_size=33")


def test_the_recipe_rebuilds_the_variant_with_its_group_size(tmp_path):
    recipe = variant_recipe(make_settings(tmp_path, "eval.int4_group_size=64"), "int4")
    assert recipe == {"variant": "int4", "group_size": 64}
    q = apply_recipe(_gpt(), recipe)
    assert {mod.group_size for mod in q.modules() if isinstance(mod, Int4Linear)} == {64}
    with pytest.raises(QuantizeError, match="group_size"):
        apply_recipe(_gpt(), {"variant": "int4"})
