import pytest

from compress.verify.generation import common_prefix, generation_figures, repetition


def test_repetition_counts_repeated_4grams():
    assert repetition([1, 2, 3, 4, 5, 6]) == 0.0
    # 1 2 3 4 1 2 3 4: 4-grams (1234)(2341)(3412)(4123)(1234): one of five repeats
    assert repetition([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)
    assert repetition([7] * 10) == pytest.approx(6 / 7)  # an endless loop
    assert repetition([1, 2]) == 0.0


def test_eos_rate_and_agreement_with_the_baseline():
    stop = {0}
    outputs = [[5, 6, 0], [5, 6, 7, 8], [9, 0]]
    baseline = [[5, 6, 0], [5, 7, 7, 8], [1, 0]]
    figures = generation_figures(outputs, stop, max_new_tokens=4, baseline=baseline, agreement_tokens=2)
    assert figures["eos_rate"] == pytest.approx(2 / 3)
    assert figures["generation_agreement"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert figures["generated_tokens"] == pytest.approx(3.0)
    assert "generation_agreement" not in generation_figures(outputs, stop, 4)
    assert common_prefix([1, 2, 3], [1, 2, 4], 10) == 2
