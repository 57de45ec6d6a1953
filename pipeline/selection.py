"""Validation scores of candidate models (arms and their mean-probability ensembles), paired by (k, seed): what a
choice among candidates is made on, never the test split."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss

from .metrics import classification_metrics, mean_ci, paired_comparison

SCORES = {"auc": "AUC", "log_loss": "log-loss"}  # --metric choices and their printed names


def score_rows(labels: np.ndarray, probs: dict[tuple[int, int], dict[str, np.ndarray]], members: list[str],
               ensembles: dict[str, list[str]], metric: str = "auc") -> list[dict]:
    """One row per (k, seed) holding every member's and ensemble's validation `metric` (4 decimals): ROC AUC
    (higher is better; saturates near 1 here) or the log-loss (cross-entropy, lower is better; a proper score that
    keeps separating models whose ranking is already near perfect). An ensemble scores the mean of its members'
    class probabilities. (k, seed) pairs missing a member are left out."""
    def score(p: np.ndarray) -> float:
        if metric == "log_loss":
            return round(float(log_loss(labels, p, labels=list(range(p.shape[1])))), 4)
        return round(classification_metrics(labels, p)["auc"], 4)
    rows = []
    for (k, seed), p in sorted(probs.items()):
        if set(members) - set(p):
            continue
        row = {"k": k, "seed": seed, **{a: score(p[a]) for a in members}}
        row.update({name: score(np.mean([p[a] for a in m], 0)) for name, m in ensembles.items()})
        rows.append(row)
    return rows


def summarise(rows: list[dict], ensembles: dict[str, list[str]], compare: list[tuple[str, str]] = (),
              metric: str = "auc") -> str:
    """Mean validation `metric` per arm and ensemble, the paired ensemble-minus-member differences, for two or more
    ensembles the paired difference of each later ensemble from the first, and each `compare` pair's a-minus-b;
    per k and pooled. Counts seeds where the first is better: higher AUC ("up"), lower log-loss ("lower")."""
    name, better = SCORES[metric], ("lower" if metric == "log_loss" else "up")
    members = list(dict.fromkeys([a for m in ensembles.values() for a in m] + [a for c in compare for a in c]))
    lines = []
    for k in sorted({r["k"] for r in rows}) + ["all"]:
        g = [r for r in rows if k == "all" or r["k"] == k]
        if k == "all" and len({r["k"] for r in rows}) == 1:
            break
        means = {a: mean_ci(np.array([r[a] for r in g])) for a in [*members, *ensembles]}
        head = ", ".join(f"{a} {m:.4f} [{lo:.4f}, {hi:.4f}]" for a, (m, lo, hi) in means.items())
        lines.append(f"k={k} (n={len(g)}) val {name}: {head}")
        pairs = [(e, a) for e, m in ensembles.items() for a in m]
        pairs += [(e, next(iter(ensembles))) for e in list(ensembles)[1:]]
        pairs += list(compare)
        for e, a in pairs:
            c = paired_comparison(np.array([r[e] for r in g]), np.array([r[a] for r in g]))
            n = sum((r[e] < r[a]) if metric == "log_loss" else (r[e] > r[a]) for r in g)
            lines.append(f"  PAIRED val {name} {e}-{a}: {c['mean_diff']:+.4f} [{c['ci_low']:+.4f}, "
                         f"{c['ci_high']:+.4f}], Wilcoxon p={c['wilcoxon_p']:.3g}, {n} of {len(g)} {better}")
    return "\n".join(lines)
