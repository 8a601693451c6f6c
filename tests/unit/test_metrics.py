import math

import pytest

from tasks.judge import metrics as m


def test_perplexity():
    assert m.perplexity(0.0) == 1.0
    assert m.perplexity(math.log(50)) == pytest.approx(50.0)


def test_rouge_l_known_values():
    assert m.rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert m.rouge_l(["dogs bark loudly"], ["the cat sat on the mat"]) == 0.0
    # LCS "the cat the mat" (4) over 6 and 6 tokens -> P = R = F = 4/6
    assert m.rouge_l(["the cat ate the mat now"], ["the cat sat on the mat"]) == \
        pytest.approx(4 / 6, abs=1e-6)


def test_bleu_known_values():
    assert m.bleu(["the quick brown fox jumps over the lazy dog"],
                  ["the quick brown fox jumps over the lazy dog"]) == pytest.approx(100.0)
    assert m.bleu(["completely unrelated words here"], ["the quick brown fox jumps over the lazy dog"]) < 5.0


def test_embedding_similarity_orders_paraphrase_above_unrelated():
    same = m.embedding_similarity(["How do I reset my password?"], ["How can I reset my password?"])
    other = m.embedding_similarity(["How do I reset my password?"], ["Bananas are rich in potassium."])
    assert same > 0.85 and other < 0.3 and same > other


def test_toxicity_rate():
    texts = ["Have a lovely day, friend.", "You are a stupid idiot.", "Thanks for the help!",
             "shut up you moron"]
    scores = m.toxicity_scores(texts)
    assert scores[1] > 0.5 and scores[3] > 0.5 and scores[0] < 0.5 and scores[2] < 0.5
    assert m.toxicity_rate(texts) == 0.5


def test_factuality_exact_and_fuzzy():
    assert m.answer_matches("The capital of France is Paris.", ["Paris"]) == (True, True)
    assert m.answer_matches("It is Pariss, I think", ["Paris"]) == (False, True)  # one typo
    assert m.answer_matches("No idea.", ["Paris"]) == (False, False)
    assert m.factuality(["Paris.", "London", "Berlinn"], [["Paris"], ["Rome"], ["Berlin"]]) == {
        "exact": pytest.approx(1 / 3), "fuzzy": pytest.approx(2 / 3)}


def test_latency_stats():
    s = m.latency_stats([0.1] * 99 + [1.0], [10] * 100)
    assert s["p50_ms"] == pytest.approx(100.0)
    assert s["p99_ms"] == pytest.approx(109.0)  # linear interpolation between the 99th and 100th sample
    assert s["tokens_per_s"] == pytest.approx(1000 / 10.9)


def test_toxicity_scores_equal_the_packaged_classifier():
    from profanity_check import predict_prob

    texts = ["Hi, my order has not arrived yet.", "you are a fucking idiot", "shit happens", "", "Paris"]
    assert m.toxicity_scores(texts) == pytest.approx([float(x) for x in predict_prob(texts)], abs=1e-12)
