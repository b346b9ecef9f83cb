from compress.tradeoff import RULE, noise_neighbours, pareto_front, recommend, within_noise


def test_pareto_front_keeps_only_undominated_points():
    # (size, kld): b dominates c; a is smallest; d is best quality
    points = [(1.0, 0.5), (2.0, 0.2), (3.0, 0.3), (4.0, 0.1)]
    assert pareto_front(points) == [0, 1, 3]
    # (speed, kld), higher speed better: 30 tok/s at 0.3 beats 20 tok/s at 0.4
    assert pareto_front([(20.0, 0.4), (30.0, 0.3), (10.0, 0.1)], maximise_x=True) == [1, 2]


def _row(label, size, kld, kld_se=0.001, tps=50.0, shipped=True):
    return {"label": label, "size_bytes": size, "kld": kld, "kld_se": kld_se, "decode_tps": tps, "released": shipped,
            "passed": shipped}


def test_smallest_and_fastest_are_named_beside_the_recommendation():
    rows = [_row("a", 10, 0.1, 0.01, 50, shipped=False), _row("b", 20, 0.02, tps=40), _row("c", 30, 0.01, tps=90)]
    choice = recommend(rows)
    assert choice["smallest"]["label"] == "b" and choice["fastest"]["label"] == "c"
    # c is 1.5x b's size: outside the slack, so the smaller b is recommended though c's KLD is better
    assert choice["recommended"]["label"] == "b"
    assert recommend([rows[0]]) == {"recommended": None, "smallest": None, "fastest": None}


def test_a_few_percent_of_size_does_not_buy_a_much_worse_kld():
    # the case: "small" is 3% smaller than "good" at five times its KLD
    rows = [_row("small", 1000, 0.050, 0.002), _row("good", 1030, 0.010, 0.001), _row("big", 2000, 0.009, 0.001)]
    choice = recommend(rows)
    assert choice["recommended"]["label"] == "good" and choice["smallest"]["label"] == "small"
    assert "1.1× its size" in RULE


def test_within_noise_of_the_best_the_smaller_artifact_is_recommended():
    rows = [_row("small", 1000, 0.0110, 0.001), _row("good", 1030, 0.0100, 0.001)]
    assert recommend(rows)["recommended"]["label"] == "small"


def test_a_dominated_artifact_is_never_recommended():
    # "worse" is smaller than nothing and better than nothing: off the front even with wide error bars
    rows = [_row("best", 1000, 0.010, 0.001), _row("worse", 1050, 0.011, 0.010)]
    assert recommend(rows)["recommended"]["label"] == "best"


def test_differences_within_two_standard_errors_are_noise():
    a, b, c = {"kld": 0.010, "kld_se": 0.001}, {"kld": 0.012, "kld_se": 0.001}, {"kld": 0.02, "kld_se": 0.001}
    assert within_noise(a, b) and not within_noise(a, c)
    rows = [dict(a, label="a"), dict(b, label="b"), dict(c, label="c")]
    assert noise_neighbours(rows) == {"a": ["b"], "b": ["a"], "c": []}
