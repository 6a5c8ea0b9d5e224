import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from polyfast.eval.metrics import (bleu4, bng, distinct_n, eval_tokens, exact_match, hcr, rouge_l,
                                   self_bleu4, token_f1, w1)


def test_tokens_english_and_chinese():
    assert eval_tokens("The Cat, sat!") == ["cat", "sat"]
    assert eval_tokens("我爱北京。OK") == ["我", "爱", "北", "京", "ok"]


def test_exact_match_and_f1_by_hand():
    assert exact_match("The cat.", "cat") == 1.0 and exact_match("a dog", "cat") == 0.0
    # pred: cat sat mat (3), ref: cat sat on mat now (5): common 3 -> P=1, R=3/5, F1=0.75
    assert token_f1("the cat sat mat", "cat sat on the mat now") == pytest.approx(0.75)
    # Chinese by character: 北京大学 vs 北京: common 2, P=2/4, R=1 -> 2/3
    assert token_f1("北京大学", "北京") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


def test_rouge_l_by_hand():
    # LCS(a b c d e, a c e f) = a c e = 3 -> P = 3/5, R = 3/4, F = 2PR/(P+R) = 2/3
    assert rouge_l("alpha beta gamma delta eps", "alpha gamma eps zeta") == pytest.approx(
        2 * 0.6 * 0.75 / 1.35)
    assert rouge_l("我们去北京", "我去北京") == pytest.approx(2 * (4 / 5) * 1 / (4 / 5 + 1))


def test_distinct_n_by_hand():
    texts = ["a b a", "b c"]  # after normalisation "a" is an article and is dropped: [b], [b c]
    assert eval_tokens("a b a") == ["b"]
    assert distinct_n(["x y x", "y z"], 1) == pytest.approx(3 / 5)
    assert distinct_n(["x y x", "y z"], 2) == pytest.approx(3 / 3)
    assert distinct_n(texts, 3) == 0.0


def test_bleu_and_self_bleu():
    h = "the quick brown fox jumps over the lazy dog".split()
    assert bleu4(h, [h]) == pytest.approx(1.0)
    assert bleu4(["zzz"], [h]) == 0.0
    same = ["one two three four five"] * 3
    assert self_bleu4(same) == pytest.approx(1.0)
    assert self_bleu4(["one two three four", "five six seven eight", "nine ten eleven twelve"]) == 0.0
    assert self_bleu4(["a b c d e"] * 50, sample=10, seed=1) == self_bleu4(["a b c d e"] * 50, sample=10, seed=1)


def test_w1_bng_hcr_against_scipy_and_hand():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 50), rng.normal(1, 2, 70)
    assert w1(a, b) == pytest.approx(wasserstein_distance(a, b))
    hum = np.stack([b, np.full(70, 3.0)], 1)  # second feature constant: left out
    gen = np.stack([a, np.full(50, 9.0)], 1)
    value, left_out = bng(gen, hum)
    assert left_out == 1 and value == pytest.approx(wasserstein_distance(a, b) / b.std())
    q10, q90 = np.array([0.0, 0.0]), np.array([1.0, 1.0])
    assert hcr(np.array([[0.5, 0.5], [0.5, 2.0], [1.0, 0.0]]), q10, q90) == pytest.approx(2 / 3)
