"""Accuracy figures against hand-computed cases and an independent full-vocabulary reference."""

import math

import numpy as np
import pytest

from compress.verify.accuracy import Reference, kld_topk, log_softmax, make_reference, perplexity, score, window_stats


def random_logprobs(rng, windows=3, positions=5, vocab=11, scale=3.0):
    return log_softmax(rng.normal(size=(windows, positions, vocab)) * scale)


def full_kl(base, art):
    return (np.exp(base) * (base - art)).sum(-1)


def test_identical_distributions_have_zero_kld_full_agreement_and_ratio_one():
    rng = np.random.default_rng(0)
    base = random_logprobs(rng)
    targets = rng.integers(0, base.shape[-1], size=base.shape[:2])
    figures = score(make_reference(base, targets, k=4), base, targets)
    assert figures["kld"] == pytest.approx(0.0, abs=1e-6)
    assert figures["top1"] == 1.0
    assert figures["ppl_ratio"] == pytest.approx(1.0)
    assert figures["delta_p_rms"] == pytest.approx(0.0, abs=1e-6)  # reference is stored as float32


def test_known_pair_matches_hand_computation():
    # p = (0.5, 0.25, 0.25), q = (0.25, 0.25, 0.5): KL = 0.5 ln 2 + 0 + 0.25 ln 0.5 = 0.25 ln 2
    base = np.log(np.array([[[0.5, 0.25, 0.25]]]))
    art = np.log(np.array([[[0.25, 0.25, 0.5]]]))
    reference = make_reference(base, np.array([[0]]), k=3)
    assert kld_topk(reference, art)[0, 0] == pytest.approx(0.25 * math.log(2))
    figures = score(reference, art, np.array([[0]]))
    assert figures["ppl"] == pytest.approx(4.0)  # p_art(correct) = 0.25
    assert figures["delta_p_rms"] == pytest.approx(0.25)  # 0.25 - 0.5
    assert figures["top1"] == 0.0  # argmax 2 vs 0


def test_full_k_equals_exact_kl_and_smaller_k_is_a_lower_bound():
    rng = np.random.default_rng(1)
    base, art = random_logprobs(rng), random_logprobs(rng)
    targets = np.zeros(base.shape[:2], dtype=np.int64)
    exact = full_kl(base, art)
    np.testing.assert_allclose(kld_topk(make_reference(base, targets, k=11), art), exact, rtol=1e-6, atol=1e-7)  # float32 reference
    for k in (1, 3, 7):
        bound = kld_topk(make_reference(base, targets, k=k), art)
        assert np.all(bound <= exact + 1e-9)
        assert np.all(bound >= 0)


def test_tail_bucket_matches_hand_computed_merge():
    # K=1 over (0.6, 0.3, 0.1) vs (0.2, 0.4, 0.4): bins {0} and {1,2}: 0.6 ln 3 + 0.4 ln(0.4/0.8)
    base = np.log(np.array([[[0.6, 0.3, 0.1]]]))
    art = np.log(np.array([[[0.2, 0.4, 0.4]]]))
    value = kld_topk(make_reference(base, np.array([[0]]), k=1), art)[0, 0]
    assert value == pytest.approx(0.6 * math.log(3) + 0.4 * math.log(0.5))


def test_uniform_model_perplexity_is_vocabulary_size():
    vocab = 17
    logprobs = np.full((4, 9, vocab), -math.log(vocab))
    ppl, se = perplexity(logprobs[..., 0])
    assert ppl == pytest.approx(vocab)
    assert se == pytest.approx(0.0)


def test_standard_error_is_over_window_means():
    per_position = np.array([[1.0, 1.0], [3.0, 3.0], [5.0, 5.0]])
    mean, se = window_stats(per_position)
    assert mean == 3.0
    assert se == pytest.approx(2.0 / math.sqrt(3))  # std of (1, 3, 5) with ddof=1 is 2


def test_window_by_window_equals_all_at_once():
    rng = np.random.default_rng(2)
    base, art = random_logprobs(rng), random_logprobs(rng)
    targets = rng.integers(0, 11, size=base.shape[:2])
    reference = make_reference(base, targets, k=5)
    one_by_one = [kld_topk(reference.window(i), art[i]) for i in range(len(art))]
    np.testing.assert_allclose(np.stack(one_by_one), kld_topk(reference, art))
    assert isinstance(reference.window(0), Reference)
