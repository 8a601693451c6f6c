"""Long-term memory records to test the indexes with: a settable clock and orthogonal vectors."""

from __future__ import annotations

import numpy as np

from tasks.serve.memory import Memory

DIM = 16


class Clock:
    """A clock that stands still until a test moves it (`clock.t += seconds`)."""

    def __init__(self, t: float = 1_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def unit_vector(i: int) -> np.ndarray:
    """Memory i's vector: orthogonal to every other one (cosine 1 with itself, 0 with the rest)."""
    return np.eye(DIM, dtype=np.float32)[i]


def make_memory(session: str, i: int, text: str = "x" * 300, user: str | None = None) -> Memory:
    return Memory(f"m{i}", session, user, text, unit_vector(i), 0.0, 0.0)
