from compress.tradeoff import noise_neighbours, pareto_front, recommend, within_noise


def test_pareto_front_keeps_only_undominated_points():
    # (size, kld): b dominates c; a is smallest; d is best quality
    points = [(1.0, 0.5), (2.0, 0.2), (3.0, 0.3), (4.0, 0.1)]
    assert pareto_front(points) == [0, 1, 3]
    # (speed, kld), higher speed better: 30 tok/s at 0.3 beats 20 tok/s at 0.4
    assert pareto_front([(20.0, 0.4), (30.0, 0.3), (10.0, 0.1)], maximise_x=True) == [1, 2]


def test_recommendation_is_the_smallest_and_fastest_released_passing_artifact():
    rows = [
        {"label": "a", "size_bytes": 10, "kld": 0.1, "kld_se": 0.01, "decode_tps": 50, "released": False, "passed": False},
        {"label": "b", "size_bytes": 20, "kld": 0.02, "kld_se": 0.001, "decode_tps": 40, "released": True, "passed": True},
        {"label": "c", "size_bytes": 30, "kld": 0.01, "kld_se": 0.001, "decode_tps": 90, "released": True, "passed": True},
    ]
    choice = recommend(rows)
    assert choice["smallest"]["label"] == "b" and choice["fastest"]["label"] == "c"
    assert recommend([rows[0]]) == {"smallest": None, "fastest": None}


def test_differences_within_two_standard_errors_are_noise():
    a, b, c = {"kld": 0.010, "kld_se": 0.001}, {"kld": 0.012, "kld_se": 0.001}, {"kld": 0.02, "kld_se": 0.001}
    assert within_noise(a, b) and not within_noise(a, c)
    rows = [dict(a, label="a"), dict(b, label="b"), dict(c, label="c")]
    assert noise_neighbours(rows) == {"a": ["b"], "b": ["a"], "c": []}
