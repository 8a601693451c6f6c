"""The sentence embedder of memories and queries: the packaged MiniLM (tasks.model.encoders)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


class Embedder:
    """The packaged sentence-embedding model (tasks.model.encoders), unit-length float32 vectors, with an
    LRU of query embeddings by content hash (repeated questions skip the encoder)."""

    def __init__(self, model: str, cache_size: int):
        self.model_name, self.cache_size = model, cache_size
        self._model = None
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.dim = 0

    def load(self) -> None:
        import torch

        from tasks.model.encoders import embedder, embedding_model_dir

        torch.set_num_threads(1)  # beside the model server on a few cores: one thread, no oversubscription
        self._model = embedder(embedding_model_dir(self.model_name))
        self.dim = int(self._model.get_embedding_dimension())

    @property
    def ready(self) -> bool:
        return self._model is not None

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        v = self._model.encode(list(texts), batch_size=32, convert_to_numpy=True, normalize_embeddings=True,
                               show_progress_bar=False)
        return np.asarray(v, dtype=np.float32)

    def query(self, text: str) -> np.ndarray:
        key = hashlib.sha256(text.encode()).hexdigest()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        v = self.encode([text])[0]
        if self.cache_size:
            self._cache[key] = v
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return v
