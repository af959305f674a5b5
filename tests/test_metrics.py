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


def test_average_precision_matches_sklearn_and_hand_values():
    from sklearn.metrics import average_precision_score

    from textspan.metrics import average_precision

    # hand: ranking [1, 0, 1] -> precision at hits 1/1 and 2/3, recall steps 0.5 each: AP = 0.5 + 1/3
    assert abs(average_precision([1, 0, 1], [0.9, 0.8, 0.7]) - (0.5 + 1 / 3)) < 1e-12
    rng = np.random.default_rng(1)
    for _ in range(5):
        y = rng.integers(0, 2, 300)
        s = np.round(rng.random(300), 1)  # with ties
        assert abs(average_precision(y, s) - average_precision_score(y, s)) < 1e-12


def test_segmentation_scores_on_hand_made_masks():
    from textspan.metrics import normalise_map, segmentation_scores

    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True  # 4 foreground pixels of 16
    m = np.zeros((4, 4))
    m[:2, :3] = 1.0  # predicts 6 pixels (mean 6/16): 4 right + 2 wrong
    res = segmentation_scores([normalise_map(m)], [gt])
    assert res["pixel_accuracy"] == 14 / 16 * 100
    assert res["iou_foreground"] == 4 / 6 * 100 and res["iou_background"] == 10 / 12 * 100
    assert res["miou"] == (4 / 6 + 10 / 12) / 2 * 100
    # AP: scores [1 - m, m] pooled over 32 entries; positives: 12 background + 4 foreground
    # the 16 entries with score 1 hold 10 + 4 = 14 positives (precision 14/16); the 16 with score 0 hold 2
    ap = (14 / 16) * (14 / 16) + (2 / 16) * (16 / 32)
    assert abs(res["map"] - ap * 100) < 1e-9
    # pointing game: the maximum (first of the ties, at [0, 0]) falls on the object; a map peaking outside does not
    assert res["pointing"] == 100.0
    off = np.zeros((4, 4))
    off[3, 3] = 1.0
    res2 = segmentation_scores([normalise_map(m), normalise_map(off)], [gt, gt])
    assert res2["pointing"] == 50.0 and [r["pointing"] for r in res2["rows"]] == [100.0, 0.0]
    # summing over images: intersections and unions add up before dividing
    perfect = segmentation_scores([gt.astype(float), m], [gt, gt])
    assert perfect["iou_foreground"] == (4 + 4) / (4 + 6) * 100
    assert np.allclose(normalise_map(np.array([[-1.0, 1.0], [3.0, 1.0]])), [[0, 1 / 3], [1, 1 / 3]])
