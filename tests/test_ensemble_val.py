"""pipeline.selection (what benchmarks/ensemble_val.py prints): validation AUC or log-loss per member and ensemble, and its summary."""

import numpy as np
import pytest

from pipeline import selection as ensemble_val


def two_class(p1):
    p1 = np.asarray(p1, dtype=float)
    return np.stack([1 - p1, p1], 1)


def test_log_loss_by_hand_and_ensemble_is_mean_probability():
    y = np.array([0, 0, 1, 1])
    a, b = two_class([0.1, 0.4, 0.8, 0.6]), two_class([0.3, 0.2, 0.9, 0.5])
    rows = ensemble_val.score_rows(y, {(100, 5): {"a": a, "b": b}}, ["a", "b"], {"ens": ["a", "b"]}, "log_loss")
    by_hand = lambda p: -np.mean(np.log(p[np.arange(4), y]))  # noqa: E731
    assert rows[0]["a"] == pytest.approx(by_hand(a), abs=1e-4)
    assert rows[0]["ens"] == pytest.approx(by_hand((a + b) / 2), abs=1e-4)
    # log-loss is convex in the probabilities: the mean-probability ensemble is never worse than its members' mean
    assert rows[0]["ens"] <= (rows[0]["a"] + rows[0]["b"]) / 2 + 1e-4


def test_log_loss_separates_models_whose_auc_is_saturated():
    y = np.array([0, 0, 0, 1, 1, 1])
    timid, sure = two_class([0.4, 0.45, 0.48, 0.52, 0.55, 0.6]), two_class([0.02, 0.05, 0.1, 0.9, 0.95, 0.98])
    probs = {(100, 5): {"timid": timid, "sure": sure}}
    auc = ensemble_val.score_rows(y, probs, ["timid", "sure"], {}, "auc")[0]
    ll = ensemble_val.score_rows(y, probs, ["timid", "sure"], {}, "log_loss")[0]
    assert auc["timid"] == auc["sure"] == 1.0
    assert ll["sure"] < ll["timid"]


def test_rows_skip_seeds_missing_a_member_and_summary_counts_lower_log_loss():
    y = np.array([0, 1, 0, 1])
    good, bad = two_class([0.1, 0.9, 0.2, 0.8]), two_class([0.4, 0.6, 0.45, 0.55])
    probs = {(100, s): {"g": good, "b": bad} for s in (5, 6, 7)} | {(100, 8): {"g": good}}
    rows = ensemble_val.score_rows(y, probs, ["g", "b"], {}, "log_loss")
    assert [r["seed"] for r in rows] == [5, 6, 7]
    text = ensemble_val.summarise(rows, {}, [("g", "b")], "log_loss")
    assert "val log-loss" in text and "3 of 3 lower" in text
    assert "0 of 3 up" in ensemble_val.summarise(ensemble_val.score_rows(y, probs, ["g", "b"], {}, "auc"),
                                                 {}, [("g", "b")], "auc")
