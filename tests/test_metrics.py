import numpy as np

from textspan.metrics import correlation_ratio


def test_correlation_ratio_by_hand():
    X = np.array([[0.0], [2.0], [10.0], [12.0]])
    # class means 1 and 11, grand mean 6: between = 4 * 25 = 100; total = 36 + 16 + 16 + 36 = 104
    assert abs(correlation_ratio(X, ["a", "a", "b", "b"]) - 100 / 104) < 1e-12
    assert correlation_ratio(X, [0, 1, 2, 3]) == 1.0
    assert correlation_ratio(X, [0, 0, 0, 0]) == 0.0
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(4000, 3))
    assert correlation_ratio(noise, rng.integers(0, 2, 4000)) < 0.01
