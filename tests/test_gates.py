from compress.verify.gates import check_gates


def test_every_failed_gate_is_a_sentence_and_passing_gates_are_silent():
    metrics = {"kld": 0.031, "top1": 0.95, "ppl_ratio": 1.2, "size_ratio": 0.3, "decode_speedup": 1.5}
    gates = {"max_kld": 0.02, "min_top1": 0.9, "max_ppl_ratio": 1.1, "max_size_ratio": 0.6, "min_decode_speedup": None}
    assert check_gates(gates, metrics) == ["KLD 0.031 > max_kld 0.02", "perplexity ratio 1.2 > max_ppl_ratio 1.1"]


def test_zero_kld_gate_fails_any_real_artifact_and_min_gates_fail_below():
    assert check_gates({"max_kld": 0.0}, {"kld": 1e-6}) == ["KLD 1e-06 > max_kld 0"]
    assert check_gates({"min_top1": 0.9}, {"top1": 0.89}) == ["top-1 agreement 0.89 < min_top1 0.9"]
    assert check_gates({"min_top1": 0.9}, {"top1": 0.9}) == []


def test_missing_or_nan_metric_cannot_pass():
    assert check_gates({"min_decode_speedup": 1.0}, {}) == [
        "decode speedup was not measured, so min_decode_speedup 1 cannot be checked"
    ]
    assert len(check_gates({"max_kld": 1.0}, {"kld": float("nan")})) == 1
