"""The int8 and int4 tiers: quantized variants of a trained GPT, evaluated by the same suite.

    llmops register [--weights DIR]       # fp32 -> challenger, then int8 -> challenger-int8,
                                          # int4 -> challenger-int4
    python bench/tiers.py                 # fp32 / int8 / int4 / distilled side by side, one JSON line

- int8: torch.ao dynamic quantization of every nn.Linear (weights int8, activations quantized per call).
- int4: weight-only, group-wise asymmetric 4-bit quantization of every nn.Linear weight of the
  blocks (`eval.int4_group_size` weights along the input dim share one scale and one zero point),
  two codes packed per uint8. The tied lm_head/wte matrix stays fp32: it is an embedding table
  too (a lookup, not only a matmul), and rounding it to 4 bits moves every logit at once.
  `Int4Linear` keeps only the packed codes and the (bf16) scales and zeros — no fp32 copy is
  cached — and dequantizes inside the matmul. On the CPU that matmul is torch's own int4 kernel,
  `torch.ops.aten._weight_int4pack_mm_for_cpu` (weights repacked once into its own layout by
  `_convert_weight_to_int4pack_for_cpu`): measured here (AVX512, torch 2.13) it is exact against the
  dequantize reference with fp32 activations but ~10x slower than with bf16 ones, so activations enter the
  kernel as bf16 (a ~0.3 % rounding next to int4's own error) and the output goes back to fp32.
  Where the kernel does not apply (group size not 32/64/128/256, out_features not a multiple of
  16, a non-CPU tensor, or the kernel fails its self-check on this CPU) the layer dequantizes in
  pure torch and calls F.linear: the same codes, the reference the tests compare the kernel with.
  torchao was the other candidate; its CPU int4 layout calls this same aten kernel, so it would
  add a dependency pinned to torch's version without a faster matmul.

Each variant is a deterministic recipe over the same safetensors weights ({"variant": "int8"} or
{"variant": "int4", "group_size": 32}), applied at load time, so it is registered with its parent's
lineage plus the recipe (variant.json) and nothing quantized is ever pickled. It is registered only
if it passes its own gate, with the fp32 parent's metrics in the champion's place: its quality drop
must stay within the configured regressions. Its report puts the quality drop beside the measured
speed and memory gain.
"""

from __future__ import annotations

import copy
import functools
import io
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tasks.config import Settings
from tasks.errors import InputError

log = logging.getLogger(__name__)

VARIANTS = ("int8", "int4")
KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts


class QuantizeError(InputError):
    """A variant or recipe that cannot be built from these weights."""


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the model with every nn.Linear dynamically quantized to int8 (weights int8, activations
    fp32)."""
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(copy.deepcopy(model).eval(), {torch.nn.Linear}, dtype=torch.qint8)


# ---- int4: codes, packing, the reference dequantization ------------------------------------------

def quantize_int4_weight(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales_and_zeros) of a (N, K) weight: codes uint8 (N, K) in 0..15, scales_and_zeros bf16
    (K / group_size, N, 2) such that w ≈ (code - 8) * scale + zero (the int4 kernel's convention).

    Asymmetric per group: the 16 levels span the group's [min, max]. Scale and zero are rounded to
    bf16 first and the codes chosen against the rounded grid, which is widened by bf16's rounding
    margin so it always covers [min, max]: every weight is within scale / 2 of its dequantized value."""
    N, K = w.shape
    wg = w.detach().float().reshape(N, K // group_size, group_size)  # (N, G, g)
    lo, hi = wg.amin(-1), wg.amax(-1)  # (N, G)
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    zero = (lo + 8 * scale).to(torch.bfloat16).float()
    # 1 + 2^-7 outgrows bf16's relative rounding error (2^-8), so the rounded scale still covers the range
    scale = ((torch.maximum((hi - zero) / 7, (zero - lo) / 8).clamp(min=1e-10) * (1 + 2 ** -7))
             .to(torch.bfloat16).float())
    codes = (torch.round((wg - zero[..., None]) / scale[..., None]) + 8).clamp(0, 15).to(torch.uint8)
    sz = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (G, N, 2)
    return codes.reshape(N, K), sz


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in 0..15 -> (N, K / 2) uint8: column 2j in the low nibble, 2j + 1 in the high one."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: (N, K / 2) uint8 -> (N, K) codes."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(codes: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) fp32 weight from codes and (G, N, 2) scales/zeros: (code - 8) * scale + zero."""
    N, K = codes.shape
    sz = scales_and_zeros.float().transpose(0, 1)  # (N, G, 2)
    q = codes.reshape(N, K // group_size, group_size).float() - 8
    return (q * sz[..., :1] + sz[..., 1:]).reshape(N, K)


@functools.cache
def _kernel_works() -> bool:
    """Whether torch's CPU int4 kernel exists here and agrees with the dequantize reference (once per
    process)."""
    try:
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(32, 64, generator=g), torch.randn(3, 64, generator=g)
        codes, sz = quantize_int4_weight(w, 32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, 32, sz).float()
        ref = x.to(torch.bfloat16).float() @ dequantize_int4(codes, sz, 32).T
        ok = bool(torch.allclose(y, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max())))
    # an older torch, or no kernel for this CPU
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        log.info("int4: torch's CPU int4 kernel is unavailable (%s); dequantize + F.linear instead", e)
        return False
    if not ok:
        log.warning("int4: torch's CPU int4 kernel disagrees with the reference on this CPU; "
                    "dequantize + F.linear instead")
    return ok


class Int4Linear(nn.Module):
    """A Linear whose weight is stored as packed 4-bit codes plus bf16 per-group scales and zeros.

    Buffers (all that is kept, and what model_bytes counts): `weight_packed` uint8 (N, K / 2) — the
    kernel's own layout when `kernel`, else pack_int4's — and `scales_and_zeros` bf16 (K / g, N, 2)."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False,
                 kernel: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.group_size, self.kernel = (
            in_features, out_features, group_size, kernel)
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros",
                             torch.zeros(in_features // group_size, out_features, 2, dtype=torch.bfloat16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, kernel: bool | None = None) -> Int4Linear:
        """Quantize `linear`; kernel=None uses torch's CPU int4 kernel wherever it applies and works."""
        N, K = linear.out_features, linear.in_features
        if K % group_size or group_size % 2:
            raise QuantizeError(f"eval.int4_group_size={group_size} must be even and divide in_features={K}")
        fits = group_size in KERNEL_GROUP_SIZES and N % 16 == 0 and linear.weight.device.type == "cpu"
        use = (fits and _kernel_works()) if kernel is None else bool(kernel)
        if use and not fits:
            raise QuantizeError(f"the CPU int4 kernel needs eval.int4_group_size in {KERNEL_GROUP_SIZES} and "
                                f"out_features divisible by 16 on a CPU tensor (got {group_size}, {N})")
        m = cls(K, N, group_size, linear.bias is not None, use)
        codes, sz = quantize_int4_weight(linear.weight, group_size)
        m.weight_packed = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2) if use
                           else pack_int4(codes)).to(linear.weight.device)
        m.scales_and_zeros = sz.to(linear.weight.device)
        if linear.bias is not None:
            m.bias = linear.bias.detach().clone()
        return m

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 (N, K) weight (reference path only: the kernel's packed layout is its own)."""
        if self.kernel:
            raise QuantizeError("dequantized_weight() reads pack_int4's layout; "
                                "this layer holds the kernel's")
        return dequantize_int4(unpack_int4(self.weight_packed), self.scales_and_zeros, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.kernel:
            # transient, freed after the matmul
            return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)
        lead = x.shape[:-1]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous(), self.weight_packed,
            self.group_size, self.scales_and_zeros)  # (B*T, N) bf16
        y = y.to(x.dtype).view(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, "
                f"matmul={'aten int4 kernel' if self.kernel else 'dequantize + F.linear'}")


def quantize_int4(model: torch.nn.Module, group_size: int = 32,
                  kernel: bool | None = None) -> torch.nn.Module:
    """A copy of the model with every nn.Linear replaced by an Int4Linear, except a Linear whose weight
    is an nn.Embedding's too (the tied lm_head stays fp32). Raises QuantizeError naming
    `eval.int4_group_size` when the group size does not divide a layer's in_features."""
    q = copy.deepcopy(model).eval()
    tied = {id(m.weight) for m in q.modules() if isinstance(m, nn.Embedding)}
    targets = [(parent, name, child) for parent in q.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear) and id(child.weight) not in tied]
    full = {id(m): n for n, m in q.named_modules()}
    for parent, name, child in targets:  # check all before changing any: the error names the first bad layer
        if group_size < 2 or group_size % 2 or child.in_features % group_size:
            where = f"{full[id(parent)]}.{name}".lstrip(".")
            raise QuantizeError(f"eval.int4_group_size={group_size} must be even and divide the input size "
                                f"of every linear layer: {where} has in_features={child.in_features} "
                                f"(try a divisor such as 32)")
    for parent, name, child in targets:
        setattr(parent, name, Int4Linear.from_linear(child, group_size, kernel))
    return q


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's state as serialised in memory: int8 packed weights count as int8, Int4Linear's
    packed codes and bf16 scales as what they are; a tied tensor once (torch.save shares storages)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


# ---- recipes and their evaluation ----------------------------------------------------------------

def variant_recipe(settings: Settings, variant: str) -> dict[str, Any]:
    """What rebuilds the variant from the fp32 weights; recorded as the registered version's variant.json."""
    if variant == "int8":
        return {"variant": "int8"}
    if variant == "int4":
        return {"variant": "int4", "group_size": settings.eval.int4_group_size}
    raise QuantizeError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


def apply_recipe(model: torch.nn.Module, recipe: dict[str, Any]) -> torch.nn.Module:
    """The variant of `model` that `recipe` (variant_recipe's dict, or a variant.json) describes; fp32:
    itself."""
    variant = recipe.get("variant", "fp32")
    if variant == "fp32":
        return model
    if variant == "int8":
        return quantize_int8(model)
    if variant == "int4":
        if "group_size" not in recipe:
            raise QuantizeError("variant.json of an int4 version has no group_size; it cannot be rebuilt")
        return quantize_int4(model, int(recipe["group_size"]))
    raise QuantizeError(f"variant.json: unknown variant {variant!r}; expected fp32 or one of {VARIANTS}")


def evaluate_variant(settings: Settings, weights_dir: Path | str, fp32_eval: dict[str, Any],
                     variant: str) -> dict[str, Any]:
    """Evaluate a quantized variant with the same suite; its gate compares it with its fp32 parent.
    The result is evaluate()'s plus `<variant>` (bytes, memory ratio, speedups, metric deltas) and
    `recipe`."""
    from tasks.judge.evaluate import evaluate, load_chat_model
    from tasks.judge.gate import evaluate_gate

    recipe = variant_recipe(settings, variant)
    model, _, _ = load_chat_model(weights_dir)
    qmodel = apply_recipe(model, recipe)
    fp32_m = fp32_eval["metrics"]
    sizes = {"fp32_bytes": model_bytes(model), f"{variant}_bytes": model_bytes(qmodel)}
    ev = evaluate(settings, weights_dir, champion=fp32_m, model=qmodel, tag=variant)
    q = ev["metrics"]
    comparison: dict[str, Any] = {
        **sizes, "memory_ratio": sizes[f"{variant}_bytes"] / sizes["fp32_bytes"],
        "speedup_b1": q["tokens_per_s_b1"] / fp32_m["tokens_per_s_b1"],
        "speedup_b8": q["tokens_per_s_b8"] / fp32_m["tokens_per_s_b8"],
        "deltas": {k: q[k] - fp32_m[k] for k in q if k in fp32_m and k != "eval_seconds"},
    }
    if variant == "int4":
        layers = [m for m in qmodel.modules() if isinstance(m, Int4Linear)]
        comparison |= {"group_size": recipe["group_size"], "layers": len(layers),
                       "kernel_layers": sum(m.kernel for m in layers)}
    ev[variant], ev["recipe"], ev["model_bytes"] = comparison, recipe, sizes[f"{variant}_bytes"]
    ev["gate"] = evaluate_gate(q, settings.eval.gate, fp32_m)  # its own gate, against its parent
    _rewrite_report(ev, weights_dir, comparison, variant)
    log.info("%s: %.2fx memory, %.2fx tokens/s at batch 1, %.2fx at batch 8; gate %s: %s", variant,
             comparison["memory_ratio"], comparison["speedup_b1"], comparison["speedup_b8"],
             "PASSED" if ev["gate"]["passed"] else "FAILED", ev["gate"]["reason"])
    return ev


def evaluate_int8(settings: Settings, weights_dir: Path | str, fp32_eval: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the int8 variant; its gate compares it with its fp32 parent."""
    return evaluate_variant(settings, weights_dir, fp32_eval, "int8")


def evaluate_int4(settings: Settings, weights_dir: Path | str, fp32_eval: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the int4 variant (group size `eval.int4_group_size`); its gate compares it with its fp32
    parent."""
    return evaluate_variant(settings, weights_dir, fp32_eval, "int4")


def _rewrite_report(ev: dict[str, Any], weights_dir: Path | str, cmp: dict[str, Any], variant: str) -> None:
    import html

    from tasks.atomic import atomic_file, write_json
    from tasks.judge.evaluate import render_report

    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:+.4g}</td></tr>" for k, v in cmp["deltas"].items())
    recipe = ""
    if variant == "int4":
        recipe = (f"<p>groups of {cmp['group_size']} weights along the input dim, asymmetric, "
                  f"bf16 scales and zeros; {cmp['kernel_layers']} of {cmp['layers']} linear layers use "
                  "torch's CPU int4 kernel, the rest dequantize + F.linear; the tied embedding / lm_head "
                  "stays fp32</p>")
    body = (f"{recipe}<p>memory {cmp['fp32_bytes'] / 1e6:.2f} MB → {cmp[f'{variant}_bytes'] / 1e6:.2f} MB "
            f"(×{cmp['memory_ratio']:.2f}); tokens/s ×{cmp['speedup_b1']:.2f} at batch 1, "
            f"×{cmp['speedup_b8']:.2f} at batch 8 (measured in this evaluation)</p>"
            f"<table><tr><th>metric</th><th>{variant} − fp32</th></tr>{rows}</table>")
    loss = Path(weights_dir).parent / "metrics.jsonl"
    with atomic_file(ev["report"]) as tmp:
        tmp.write_text(render_report(ev, loss if loss.is_file() else None,
                                     {f"{variant} vs fp32: quality drop beside speed and memory": body}))
    write_json(ev["metrics_path"], ev)
