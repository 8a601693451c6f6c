"""A decoder-only GPT in the nanoGPT spirit: pre-norm blocks, SDPA attention, tied embeddings,
rotary or learned positions, and a KV cache that `generate()` (and later serving) uses.

    cfg = GPTConfig(vocab_size=2048, n_layer=4, n_head=4, d_model=128, block_size=128)
    model = GPT(cfg)
    logits, loss = model(idx, targets)           # idx, targets: (B, T) int64
    out = model.generate(prompt_ids, max_new_tokens=32, temperature=0.0, stop_tokens=(2,))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    block_size: int = 128
    dropout: float = 0.0
    pos: Literal["rotary", "learned"] = "rotary"
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model={self.d_model} must be divisible by model.n_head={self.n_head}")
        if self.pos == "rotary" and (self.d_model // self.n_head) % 2:
            raise ValueError("rotary positions need an even head size (model.d_model / model.n_head)")
        if self.pos not in ("rotary", "learned"):
            raise ValueError(f"model.pos must be rotary or learned, got {self.pos!r}")
        for k in ("vocab_size", "n_layer", "n_head", "d_model", "block_size"):
            if getattr(self, k) <= 0:
                raise ValueError(f"model.{k} must be positive")

    def to_dict(self) -> dict:
        return asdict(self)

    def n_params(self, non_embedding: bool = True) -> int:
        d, L = self.d_model, self.n_layer
        n = L * (12 * d * d + 13 * d) + 2 * d + self.vocab_size * d
        if self.pos == "learned":
            n += self.block_size * d
        if non_embedding:
            n -= self.vocab_size * d
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward): 6N plus the attention term (PaLM appendix B)."""
        return 6 * self.n_params(non_embedding=False) + 12 * self.n_layer * self.d_model * self.block_size


def _rotary(head_dim: int, block_size: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(block_size, dtype=torch.float32), inv)  # (T, hd/2)
    return freqs.cos(), freqs.sin()


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hd); cos/sin: (T, hd/2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def _filled(t: torch.Tensor | None) -> torch.Tensor:
    if t is None:
        raise ValueError("this KV cache holds no keys/values for a layer yet")
    return t


class KVCache:
    """Per-layer keys/values of the tokens seen so far: (B, nh, T_past, hd) each."""

    def __init__(self, n_layer: int):
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def head(self, n: int) -> KVCache:
        """The first n positions, in tensors of their own (contiguous: views would keep all of these
        alive)."""
        out = KVCache(len(self.k))
        out.k = [_filled(t)[:, :, :n].clone(memory_format=torch.contiguous_format) for t in self.k]
        out.v = [_filled(t)[:, :, :n].clone(memory_format=torch.contiguous_format) for t in self.v]
        return out


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, rope, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, nh, T, hd)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            q, k = _apply_rotary(q, *rope), _apply_rotary(k, *rope)
        if cache is not None:
            past_k = cache.k[layer]
            if past_k is not None:
                k = torch.cat((past_k, k), dim=2)
                v = torch.cat((_filled(cache.v[layer]), v), dim=2)
            cache.k[layer], cache.v[layer] = k, v
        # With a cache the T new queries see all past keys; causal masking applies among the new ones.
        if mask is not None:  # (B, 1, T, K): left-padded batch (generate_stream)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif k.shape[2] == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            past = k.shape[2] - T
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=False)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=False)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=False), nn.GELU(),
                                 nn.Linear(4 * cfg.d_model, cfg.d_model, bias=False), nn.Dropout(cfg.dropout))

    def forward(self, x, rope, cache=None, layer=0, mask=None):
        x = x + self.attn(self.ln1(x), rope, cache, layer, mask)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    rope_cos: torch.Tensor  # (block_size, hd/2) buffers, with rotary positions only
    rope_sin: torch.Tensor

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=False)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        if cfg.pos == "rotary":
            cos, sin = _rotary(cfg.d_model // cfg.n_head, cfg.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scaled init of residual projections
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                pad: torch.Tensor | None = None, pad_at: int = 0):
        """`pad` (B,): left-padding per row of a batch of prompts of different lengths. Row b's
        pad[b] positions from `pad_at` on are ignored as keys and its positions after them continue
        from pad_at. pad_at 0: the pads lead the row; pad_at P: they follow a shared prefix of P
        tokens already in the cache ([prefix][pad][suffix], see `generate_stream`)."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.cfg.block_size}")
        x = self.wte(idx)  # (B, T, C)
        rope, mask = None, None
        if pad is None:
            positions = torch.arange(start, start + T, device=idx.device)
            if self.wpe is None:
                rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        else:
            at = torch.arange(start, start + T, device=idx.device)[None, :]  # (1, T) absolute index
            positions = (at - pad[:, None]).clamp(min=pad_at)  # (B, T); a pad's own position is pad_at
            if pad_at:
                positions = torch.where(at < pad_at, at, positions)  # the shared prefix keeps its own
            if self.wpe is None:
                # (B,1,T,hd/2)
                rope = (self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1))
            q_at = torch.arange(start, start + T, device=idx.device)[:, None]  # (T, 1) absolute query index
            k_at = torch.arange(start + T, device=idx.device)[None, :]  # (1, K)
            causal = k_at <= q_at
            real = k_at[None] >= (pad_at + pad)[:, None, None]  # (B, 1, K): past this row's pads ...
            if pad_at:
                real = real | (k_at < pad_at)[None]  # ... or in the prefix before them
            mask = (causal[None] & real) | (k_at == q_at)[None]  # a pad query sees itself
            mask = mask.unsqueeze(1)  # (B, 1, T, K)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            if self.cfg.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, cache, i, mask)
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, -1:, :]), None  # (B, 1, V): only the last position is needed
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, prompt: Sequence[int] | torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, stop_tokens: Sequence[int] = (),
                 use_cache: bool = True, generator: torch.Generator | None = None) -> list[int]:
        """Continue one prompt; returns the new token ids (without the stop token). temperature 0 = greedy."""
        was_training = self.training
        self.eval()
        device = self.wte.weight.device
        ids = torch.as_tensor(list(prompt) if not isinstance(prompt, torch.Tensor) else prompt,
                              dtype=torch.long, device=device).view(1, -1)
        if ids.shape[1] == 0:
            raise ValueError("generate() needs a non-empty prompt")
        max_new_tokens = min(max_new_tokens, self.cfg.block_size - ids.shape[1])
        cache = KVCache(self.cfg.n_layer) if use_cache else None
        out: list[int] = []
        step_in = ids
        for _ in range(max(0, max_new_tokens)):
            logits, _ = self(step_in if use_cache else ids, cache=cache)
            nxt = sample(logits[:, -1, :], temperature, top_k, top_p, generator)
            tok = int(nxt)
            if tok in stop_tokens:
                break
            out.append(tok)
            ids = torch.cat((ids, nxt.view(1, 1)), dim=1)
            step_in = nxt.view(1, 1)
        self.train(was_training)
        return out


@torch.no_grad()
def generate_batch(model: GPT, prompts: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation of B equal-length prompts (B, T) with the KV cache -> (B, max_new_tokens)."""
    was_training = model.training
    model.eval()
    cache = KVCache(model.cfg.n_layer)
    step_in, out = prompts, []
    for _ in range(min(max_new_tokens, model.cfg.block_size - prompts.shape[1])):
        logits, _ = model(step_in, cache=cache)
        nxt = logits[:, -1, :].argmax(dim=-1, keepdim=True)  # (B, 1)
        out.append(nxt)
        step_in = nxt
    model.train(was_training)
    return torch.cat(out, dim=1) if out else prompts[:, :0]


@torch.no_grad()
def prefill(model: GPT, ids: Sequence[int]) -> KVCache:
    """The K/V of one token sequence (a B=1 forward), to start later batches from (`generate_stream`'s
    `prefix`). Each tensor is its own contiguous copy: (1, nh, len(ids), hd)."""
    was_training = model.training
    model.eval()
    cache = KVCache(model.cfg.n_layer)
    model(torch.tensor([list(ids)], dtype=torch.long, device=model.wte.weight.device), cache=cache)
    model.train(was_training)
    return cache.head(len(ids))  # a learned-positions k is a view into the whole qkv projection


@torch.no_grad()
def generate_stream(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
                    temperature: Sequence[float], top_p: Sequence[float | None] = (),
                    top_k: Sequence[int | None] = (), stop_tokens: Sequence[int] = (),
                    generators: Sequence[torch.Generator | None] = (), prefix: KVCache | None = None,
                    penalties: Sequence[Penalties | None] = ()):
    """Continue B prompts of different lengths together (left-padded, one KV cache), each with its
    own length limit and sampling settings. Yields, after every step, a list of B entries: the new
    token id of each row, or None once that row has finished (stop token or its limit).
    This is what the model server runs on a dynamic batch; a batch of one is exactly `generate()`.

    `prefix` (from `prefill`, batch 1): the K/V of the first prefix.length tokens, which every prompt
    starts with (a cached system prompt). Only the rest is computed, and the rows are laid out
    [prefix][pad][suffix]; the prefix's tensors are read, never written. The logits equal the full
    prefill's up to float rounding (the same keys, summed in another order).

    `penalties` (per row, None: none): OpenAI's presence and frequency penalties over the tokens this
    row has generated so far, and its logit bias, applied to the logits before the greedy pick or the
    sampling of that row."""
    B = len(prompts)
    if B == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("generate_stream() needs non-empty prompts")
    start = prefix.length if prefix is not None else 0
    if any(len(p) <= start for p in prompts):
        raise ValueError("generate_stream() needs every prompt to go on past its cached prefix")
    room = model.cfg.block_size - max(len(p) for p in prompts)
    prompts = [list(p)[start:] for p in prompts]
    longest = max(len(p) for p in prompts)
    limits = [max(0, min(int(n), room)) for n in max_new_tokens]
    top_p = list(top_p) or [None] * B
    top_k = list(top_k) or [None] * B
    generators = list(generators) or [None] * B
    was_training = model.training
    model.eval()
    device = model.wte.weight.device
    pad = torch.tensor([longest - len(p) for p in prompts], dtype=torch.long, device=device)
    ids = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    # equal lengths: the plain causal path, bit for bit generate()'s
    pad_arg = pad if bool(pad.any()) else None
    cache = KVCache(model.cfg.n_layer)
    if prefix is not None:  # (1, nh, P, hd) -> (B, nh, P, hd) views; the first step's torch.cat copies them
        cache.k = [_filled(k).expand(B, -1, -1, -1) for k in prefix.k]
        cache.v = [_filled(v).expand(B, -1, -1, -1) for v in prefix.v]
    done = [n == 0 for n in limits]
    counts = [0] * B
    adjust = [p if p is not None and p.active else None for p in (list(penalties) or [None] * B)]
    seen = {b: torch.zeros(model.cfg.vocab_size, device=device) for b, p in enumerate(adjust) if p}
    step_in = ids
    try:
        while not all(done):
            logits, _ = model(step_in, cache=cache, pad=pad_arg, pad_at=start)
            last = logits[:, -1, :]
            if seen:
                last = last.float().clone()
                for b, cnt in seen.items():
                    last[b] = adjust[b].apply(last[b], cnt)  # type: ignore[union-attr]
            picked = last.argmax(dim=-1)  # greedy rows in one op; sampled rows below
            for b in range(B):
                if not done[b] and float(temperature[b]) > 0:
                    picked[b] = sample(last[b:b + 1], float(temperature[b]), top_k[b], top_p[b],
                                       generators[b])[0]
            toks = picked.tolist()  # one device sync per step
            out: list[int | None] = [None] * B
            for b in range(B):
                if done[b]:
                    continue
                tok = toks[b]
                if tok in stop_tokens:
                    done[b] = True
                    continue
                out[b] = tok
                counts[b] += 1
                if b in seen:
                    seen[b][tok] += 1
                done[b] = counts[b] >= limits[b]
            yield out
            step_in = picked.view(B, 1)
    finally:
        model.train(was_training)


class SlotKV:
    """Preallocated K/V for up to `max_seqs` sequences of up to block_size tokens each, one slot per
    sequence: per layer (max_seqs, nh, block_size, hd). The serving engine (tasks/model/engine.py)
    keeps its running batch in slots 0..n-1 and decodes them together with `decode_slots`."""

    def __init__(self, cfg: GPTConfig, max_seqs: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        shape = (max_seqs, cfg.n_head, cfg.block_size, cfg.d_model // cfg.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.max_seqs = max_seqs

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def put(self, slot: int, cache: KVCache, n: int, row: int = 0, start: int = 0) -> None:
        """Copy n positions of one row of a cache (a finished prefill), from position `start` on (after a
        left-padded row's pads), into a slot's positions 0..n-1."""
        for dst, src in ((self.k, cache.k), (self.v, cache.v)):
            for layer, t in enumerate(src):
                dst[layer][slot, :, :n] = _filled(t)[row, :, start:start + n]

    def move(self, src: int, dst: int, n: int) -> None:
        """Move a sequence's first n positions to another slot (keeps the running batch in 0..n-1)."""
        for layer in range(len(self.k)):
            self.k[layer][dst, :, :n] = self.k[layer][src, :, :n]
            self.v[layer][dst, :, :n] = self.v[layer][src, :, :n]


@torch.no_grad()
def decode_slots(model: GPT, kv: SlotKV, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One decode step for the sequences in slots 0..n-1: token b (n,) sits at position b (n,) of its
    own sequence, whose earlier K/V are in its slot. Writes each new K/V at its position and returns
    the next-token logits (n, V). Each row attends only to its own positions <= its position."""
    n = tokens.shape[0]
    C = model.cfg.d_model
    x = model.wte(tokens.view(n, 1))
    if model.wpe is not None:
        x = x + model.wpe(positions).view(n, 1, C)
    rope = None
    if model.wpe is None:
        rope = (model.rope_cos[positions].view(n, 1, 1, -1), model.rope_sin[positions].view(n, 1, 1, -1))
    width = int(positions.max()) + 1
    mask = (torch.arange(width, device=tokens.device)[None, :] <= positions[:, None]).view(n, 1, 1, width)
    rows = torch.arange(n, device=tokens.device)
    blocks: list[Block] = list(model.blocks)  # type: ignore[arg-type]
    for layer, block in enumerate(blocks):
        attn = block.attn
        q, k, v = attn.qkv(block.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(n, 1, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            q, k = _apply_rotary(q, *rope), _apply_rotary(k, *rope)
        kv.k[layer][rows, :, positions] = k[:, :, 0]
        kv.v[layer][rows, :, positions] = v[:, :, 0]
        y = F.scaled_dot_product_attention(q, kv.k[layer][:n, :, :width], kv.v[layer][:n, :, :width],
                                           attn_mask=mask)
        x = x + attn.proj(y.transpose(1, 2).reshape(n, 1, C))
        x = x + block.mlp(block.ln2(x))
    return model.lm_head(model.ln_f(x))[:, 0, :]


@dataclass(frozen=True)
class Penalties:
    """OpenAI's logit adjustments for one sequence: logit[j] += bias[j] - frequency * count[j]
    - presence * (count[j] > 0), counts over the tokens generated so far."""

    presence: float = 0.0
    frequency: float = 0.0
    bias: tuple[tuple[int, float], ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.presence or self.frequency or self.bias)

    def apply(self, logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """(V,) logits adjusted by the (V,) counts of generated tokens."""
        out = logits - self.frequency * counts - self.presence * (counts > 0).to(logits.dtype)
        if self.bias:
            ids = torch.tensor([i for i, _ in self.bias], dtype=torch.long, device=logits.device)
            out = out.index_add(0, ids, torch.tensor([v for _, v in self.bias], dtype=out.dtype,
                                                     device=logits.device))
        return out


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token from (B, V) logits: greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def load_weights(model: nn.Module, path: Path | str) -> None:
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"{path}: weights do not fit the model (missing {missing}, unexpected {unexpected})")
