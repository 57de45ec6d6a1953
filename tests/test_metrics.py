import numpy as np
import pytest

from sklearn.metrics import roc_auc_score

from pipeline.metrics import (auc_rows, bootstrap_ci, classification_metrics, mean_ci, paired_comparison,
                              seeds_for_half_width)


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


@pytest.mark.parametrize("n_classes", [2, 3])
def test_auc_rows_equal_scikit_learn_with_ties(n_classes):
    rng = np.random.default_rng(n_classes)
    y = np.tile(np.arange(n_classes), 40)[None].repeat(6, 0)
    for row in y:
        rng.shuffle(row)
    prob = np.round(rng.random((6, y.shape[1], n_classes)), 1) + 0.05  # coarse values: many ties
    if n_classes == 2:
        prob /= prob.sum(-1, keepdims=True)
    got = auc_rows(y, prob)
    want = [roc_auc_score(yy, pp[:, 1]) if n_classes == 2 else
            roc_auc_score(yy, pp / pp.sum(1, keepdims=True), multi_class="ovr", average="macro")
            for yy, pp in zip(y, prob)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert np.ptp(got) > 0.01  # the rows differ, so a broadcasting slip would show


@pytest.mark.parametrize("n_classes,n", [(2, 150), (3, 150), (3, 8000)])  # 8000 x 3: resamples in two blocks
def test_bootstrap_ci_equals_one_resample_at_a_time(n_classes, n):
    """The vectorised bootstrap draws the same resamples as a scikit-learn loop and gives the same quantiles."""
    rng = np.random.default_rng(7)
    y = rng.integers(0, n_classes, n)
    prob = np.round(rng.random((n, n_classes)) + 0.4 * np.eye(n_classes)[y], 1)
    prob /= prob.sum(1, keepdims=True)
    ms = ("auc", "accuracy", "f1") if n < 1000 else ("auc", "accuracy")  # f1 goes one resample at a time
    got = bootstrap_ci(y, prob, 200, seed=3, metrics=ms)
    r = np.random.default_rng(3)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    per = []
    for _ in range(200):
        idx = np.concatenate([r.choice(ix, len(ix), replace=True) for ix in by_class])
        per.append(classification_metrics(y[idx], prob[idx]))
    for m in ms:
        v = [p[m] for p in per]
        assert got[m] == pytest.approx((np.quantile(v, 0.025), np.quantile(v, 0.975)), abs=1e-12)
    assert got["auc"][1] - got["auc"][0] > 0.01


def test_mean_ci_and_paired_comparison():
    m, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and lo == pytest.approx(2 - 4.302653 * 1 / np.sqrt(3), rel=1e-5)
    assert np.isnan(mean_ci([1.0])[1])
    r = paired_comparison(np.array([0.9, 0.8, 0.85, 0.95, 0.9, 0.88]), np.array([0.8, 0.7, 0.8, 0.9, 0.85, 0.8]))
    assert r["mean_diff"] == pytest.approx(0.43 / 6) and r["wilcoxon_p"] < 0.05
    assert r["ci_low"] > 0 and r["cohens_dz"] > 0


def test_seeds_for_half_width_is_the_smallest_seed_count_whose_t_interval_is_narrow_enough():
    from scipy import stats
    rng = np.random.default_rng(3)
    d = rng.normal(0.01, 0.03, 8)
    r = paired_comparison(d, np.zeros(8))
    n = seeds_for_half_width(r["ci_low"], r["ci_high"], r["n"], 0.015)
    sd = d.std(ddof=1)  # the spread the function must recover from the interval alone
    half = lambda m: stats.t.ppf(0.975, m - 1) * sd / np.sqrt(m)  # noqa: E731
    assert half(n) <= 0.015 < half(n - 1)
    assert n > 8  # this spread is too wide for 0.015 at 8 seeds
    assert seeds_for_half_width(r["ci_low"], r["ci_high"], r["n"], 1.0) == 2
    assert seeds_for_half_width(float("nan"), float("nan"), 1, 0.015) == 0
