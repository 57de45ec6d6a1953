"""Classification metrics (scikit-learn), bootstrap and across-seed confidence intervals, paired tests."""
from __future__ import annotations

import math

import numpy as np
from scipy import stats
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, recall_score,
                             roc_auc_score)

METRICS = ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1")


def classification_metrics(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """y: (N,) ints; prob: (N, C). Binary: class 1 is positive. Multi-class: macro averages, OvR AUC."""
    y = np.asarray(y)
    n_classes = prob.shape[1]
    pred = prob.argmax(1)
    labels = list(range(n_classes))
    if n_classes == 2:
        auc = roc_auc_score(y, prob[:, 1])
        sens = recall_score(y, pred, pos_label=1, zero_division=0)
        spec = recall_score(y, pred, pos_label=0, zero_division=0)
        f1 = f1_score(y, pred, pos_label=1, zero_division=0)
    else:
        p = prob / prob.sum(1, keepdims=True)
        auc = roc_auc_score(y, p, multi_class="ovr", average="macro", labels=labels)
        sens = recall_score(y, pred, average="macro", labels=labels, zero_division=0)
        cm = confusion_matrix(y, pred, labels=labels)
        tn = cm.sum() - cm.sum(0) - cm.sum(1) + np.diag(cm)
        fp = cm.sum(0) - np.diag(cm)
        spec = float(np.mean(tn / np.maximum(tn + fp, 1)))
        f1 = f1_score(y, pred, average="macro", labels=labels, zero_division=0)
    return {"auc": float(auc), "accuracy": float(accuracy_score(y, pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)), "sensitivity": float(sens),
            "specificity": float(spec), "f1": float(f1)}


def auc_rows(y: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of y (B, N) ints and prob (B, N, C): the Mann-Whitney rank form of what
    `roc_auc_score` gives (ties count one half; one-vs-rest macro over C > 2 columns, rows renormalised), for
    all rows at once. Every row must hold every class."""
    if prob.shape[-1] > 2:
        prob = prob / prob.sum(-1, keepdims=True)
    cols = [1] if prob.shape[-1] == 2 else range(prob.shape[-1])
    aucs = []
    for c in cols:
        pos = y == c
        n1 = pos.sum(1)
        n0 = pos.shape[1] - n1
        ranks = stats.rankdata(prob[..., c], axis=1)  # average ranks for ties
        aucs.append(((ranks * pos).sum(1) - n1 * (n1 + 1) / 2) / (n1 * n0))
    return np.mean(aucs, axis=0)


def bootstrap_ci(y: np.ndarray, prob: np.ndarray, n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                 metrics: tuple[str, ...] = ("auc", "accuracy")) -> dict[str, tuple[float, float]]:
    """Percentile CI over test-set resamples, stratified by class so every resample has every class.
    AUC and accuracy are computed for all resamples at once (`auc_rows`); other metrics one resample at a time."""
    y, prob = np.asarray(y), np.asarray(prob, dtype=float)
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    idx = np.stack([np.concatenate([rng.choice(ix, len(ix), replace=True) for ix in by_class])
                    for _ in range(n_boot)])
    vals: dict[str, np.ndarray] = {}
    all_classes = len(by_class) == prob.shape[1]  # else let scikit-learn raise its own error
    step = max(1, 2**22 // prob.size)  # resamples per block: a few tens of MB however large the test set
    blocks = [idx[i:i + step] for i in range(0, n_boot, step)]
    if "auc" in metrics and all_classes:
        vals["auc"] = np.concatenate([auc_rows(y[b], prob[b]) for b in blocks])
    if "accuracy" in metrics:
        vals["accuracy"] = np.concatenate([(prob[b].argmax(-1) == y[b]).mean(1) for b in blocks])
    rest = [m for m in metrics if m not in vals]
    if rest:
        per = [classification_metrics(y[i], prob[i]) for i in idx]
        vals |= {m: np.array([r[m] for r in per]) for m in rest}
    a = (1 - ci) / 2
    return {m: (float(np.quantile(vals[m], a)), float(np.quantile(vals[m], 1 - a))) for m in metrics}


def mean_ci(values: list[float] | np.ndarray, ci: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t CI across seeds; (mean, nan, nan) with fewer than two values."""
    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    if len(v) < 2:
        return m, math.nan, math.nan
    h = float(stats.t.ppf((1 + ci) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m, m - h, m + h


def seeds_for_half_width(ci_low: float, ci_high: float, n: int, half_width: float, ci: float = 0.95,
                         max_seeds: int = 10_000) -> int:
    """How many paired seeds a Student-t interval of `ci` would need for a half-width of at most `half_width`, at the
    spread of the observed interval [ci_low, ci_high] over `n` seeds (sd = h·sqrt(n) / t_{n-1}); `max_seeds` if even
    that many would not do, 0 for an interval without a width (fewer than two seeds)."""
    h = (ci_high - ci_low) / 2
    if n < 2 or not math.isfinite(h):
        return 0
    sd = h * math.sqrt(n) / stats.t.ppf((1 + ci) / 2, n - 1)
    for m in range(2, max_seeds + 1):
        if stats.t.ppf((1 + ci) / 2, m - 1) * sd / math.sqrt(m) <= half_width:
            return m
    return max_seeds


def paired_comparison(a: np.ndarray, b: np.ndarray, ci: float = 0.95) -> dict[str, float]:
    """a - b on paired observations: mean difference with t-CI, Cohen's d_z and Wilcoxon signed-rank p."""
    d = np.asarray(a, float) - np.asarray(b, float)
    mean, lo, hi = mean_ci(d, ci)
    sd = d.std(ddof=1) if len(d) > 1 else math.nan
    dz = float(mean / sd) if sd and not math.isnan(sd) and sd > 0 else math.nan
    if len(d) >= 2 and np.any(d != 0):
        p = float(stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)
    else:
        p = math.nan
    return {"n": int(len(d)), "mean_diff": mean, "ci_low": lo, "ci_high": hi, "cohens_dz": dz, "wilcoxon_p": p}
