"""Validation scores of candidate models (arms and their mean-probability ensembles), paired by (k, seed): what a
choice among candidates is made on, never the test split."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss, roc_curve

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


def score(labels: np.ndarray, prob: np.ndarray, metric: str) -> float:
    """Validation score of one model: log-loss (lower is better) or ROC AUC (higher is better)."""
    if metric == "log_loss":  # CSVs round the probabilities: renormalise so each row sums to one exactly
        prob = np.asarray(prob, float) / np.asarray(prob, float).sum(1, keepdims=True)
        return float(log_loss(labels, prob, labels=list(range(prob.shape[1]))))
    return classification_metrics(labels, prob)["auc"]


def choose_candidates(index: dict, val_dir: Path, candidates: list[str], metric: str = "log_loss"
                      ) -> dict[str, dict]:
    """Per k, the candidate (arm or ensemble) with the best mean validation `metric` over the seeds every candidate
    has, ties to the earlier candidate; reads only validation predictions (`val_dir/<file>`), never the test split.
    Returns {"k<k>": {"metric", "scores": {candidate: mean}, "seeds", "chosen"}}; a k where no candidate has
    validation predictions is left out."""
    out: dict[str, dict] = {}
    runs = [r for r in index["runs"] if r["arm"] in candidates and (val_dir / r["file"]).is_file()]
    for k in sorted({r["k"] for r in runs}):
        by = {(r["arm"], r["seed"]): r for r in runs if r["k"] == k}
        present = [c for c in candidates if any(a == c for a, _ in by)]
        seeds = sorted(set.intersection(*({s for a, s in by if a == c} for c in present)))
        if not seeds:
            continue
        scores = {}
        for c in present:
            vals = []
            for s in seeds:
                df = pd.read_csv(val_dir / by[(c, s)]["file"])
                vals.append(score(df["label"].to_numpy(), df[[f"prob_{n}" for n in index["class_names"]]].to_numpy(),
                                  metric))
            scores[c] = float(np.mean(vals))
        best = (min if metric == "log_loss" else max)(scores.values())
        chosen = next(c for c in present if scores[c] == best)  # ties: the earlier candidate
        out[f"k{k}"] = {"metric": metric, "scores": scores, "seeds": seeds, "chosen": chosen}
    return out


def operating_threshold(labels: np.ndarray, p_pos: np.ndarray, rule: str) -> float:
    """The decision threshold on the positive class's probability that `rule` picks on validation: `youden` (the
    ROC point with the largest sensitivity + specificity - 1) or `sensitivity=<s>` (the highest threshold whose
    sensitivity is at least s)."""
    fpr, tpr, thr = roc_curve(labels, p_pos, drop_intermediate=False)  # every threshold: none skipped
    thr = np.minimum(thr, 1.0)  # sklearn's first threshold is inf
    if rule == "youden":
        return float(thr[int(np.argmax(tpr - fpr))])
    target = float(rule.split("=", 1)[1])
    return float(thr[int(np.flatnonzero(tpr >= target)[0])])
