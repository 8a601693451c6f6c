"""Training and evaluation windows drawn from the token shards.

The windows of a step are a pure function of (seed, salt, step): a resumed run, another world
size's rank or the evaluation's perplexity sees exactly the windows it would have otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tasks.data.shard import open_shard
from tasks.errors import InputError


class TokenSampler:
    """Random (B, T+1) windows from token shards; stateless: batch(step, micro, rank) is pure."""

    def __init__(self, paths: list[Path], block: int, seed: int, salt: int = 0):
        self.shards = [open_shard(p) for p in paths]
        self.block = block
        self.starts = np.array([max(0, len(s) - block - 1) for s in self.shards], dtype=np.int64)
        if self.starts.sum() == 0:
            raise InputError(f"shards hold fewer than block_size+1={block + 1} tokens; "
                             f"lower model.block_size")
        self.cum = np.cumsum(self.starts)
        self.seed, self.salt = seed, salt

    def windows(self, step: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.salt, step])
        return rng.integers(0, int(self.cum[-1]), size=n)

    def batch(self, step: int, micro: int, rank: int, world: int, micro_batch: int, accum: int):
        starts = self.windows(step, accum * world * micro_batch)
        mine = starts[(micro * world + rank) * micro_batch:(micro * world + rank + 1) * micro_batch]
        shard_idx = np.searchsorted(self.cum, mine, side="right")
        offsets = mine - np.concatenate(([0], self.cum[:-1]))[shard_idx]
        rows = np.stack([self.shards[s][o:o + self.block + 1].astype(np.int64)
                         for s, o in zip(shard_idx, offsets, strict=True)])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()  # (B, T), (B, T)
