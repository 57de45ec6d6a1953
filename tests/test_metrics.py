import numpy as np
import pytest

from pipeline.metrics import bootstrap_ci, classification_metrics, mean_ci, paired_comparison


def test_binary_metrics_by_hand():
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    p1 = np.array([0.1, 0.6, 0.2, 0.9, 0.8, 0.4, 0.7])
    m = classification_metrics(y, np.stack([1 - p1, p1], 1))
    # predictions: 0 1 0 1 1 0 1 -> TP=3 FN=1 TN=2 FP=1
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    # AUC = fraction of (pos, neg) pairs ranked correctly
    pairs = [(a > b) + 0.5 * (a == b) for a in p1[y == 1] for b in p1[y == 0]]
    assert m["auc"] == pytest.approx(np.mean(pairs))


def test_multiclass_metrics_are_macro():
    y = np.array([0, 1, 2, 2])
    prob = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    m = classification_metrics(y, prob)
    assert m["sensitivity"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["balanced_accuracy"] == pytest.approx(m["sensitivity"])
    assert 0 <= m["auc"] <= 1


def test_bootstrap_ci_brackets_estimate_and_narrows_with_n():
    rng = np.random.default_rng(0)
    def sample(n):
        y = rng.integers(0, 2, n)
        p = np.clip(y * 0.3 + rng.random(n) * 0.7, 0, 1)
        return y, np.stack([1 - p, p], 1)
    y, prob = sample(200)
    lo, hi = bootstrap_ci(y, prob, 300, seed=1)["auc"]
    est = classification_metrics(y, prob)["auc"]
    assert lo < est < hi
    y2, prob2 = sample(2000)
    lo2, hi2 = bootstrap_ci(y2, prob2, 300, seed=1)["auc"]
    assert hi2 - lo2 < hi - lo


def test_mean_ci_and_paired_comparison():
    m, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and lo == pytest.approx(2 - 4.302653 * 1 / np.sqrt(3), rel=1e-5)
    assert np.isnan(mean_ci([1.0])[1])
    r = paired_comparison(np.array([0.9, 0.8, 0.85, 0.95, 0.9, 0.88]), np.array([0.8, 0.7, 0.8, 0.9, 0.85, 0.8]))
    assert r["mean_diff"] == pytest.approx(0.43 / 6) and r["wilcoxon_p"] < 0.05
    assert r["ci_low"] > 0 and r["cohens_dz"] > 0
