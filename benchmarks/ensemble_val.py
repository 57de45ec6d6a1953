"""Validation check of the evaluate stage's `ensemble` arm: does averaging the pretrained arms help on *validation*?

The evaluate stage adds an `ensemble` arm (mean class probabilities of the transfer and meta-* arms on the same
k-shot subset) from the test predictions. Whether to recommend it has to be decided on validation data, so this
script reloads every logged model of a finetune run, predicts the target's whole validation split with the
preprocessing stored beside the model (flip TTA included if the model was scored with it), and compares the
ensemble with each member arm, paired by (k, seed). The test split is not read.

    python benchmarks/ensemble_val.py --run <finetune run id> [--run [<tag>=]<another>]
        [--members a,b [--members c,d]] [--compare a,b] [--metric auc|log_loss ...]
        [--config configs/default.yaml] [--set key=value]

A run given as `<tag>=<run id>` has its arms named `<tag>.<arm>`, as `evaluate.merge_runs` names them (e.g.
`lite2=<id>` for another backbone's transfer arm, `lite2.transfer`). The config only has to describe the same
target data set as the finetune run (`data.*`). Prints one JSON line per (k, seed) and a summary per k and pooled:
mean validation AUC per arm and the paired ensemble-minus-arm difference; `--compare a,b` adds the paired a-minus-b
difference of two arms (e.g. a meta arm against the transfer arm it is meant to beat). `--metric log_loss` scores
validation by log-loss (lower is better) instead of AUC, for models whose validation AUC is saturated near 1;
repeat `--metric` for both.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import log_loss

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.config import ConfigError, load_config, parse_merge_run, tagged_arm  # noqa: E402
from pipeline.data import ImageDataset, load_target  # noqa: E402
from pipeline.metrics import classification_metrics, mean_ci, paired_comparison  # noqa: E402
from pipeline.predict import load_model  # noqa: E402
from pipeline.tracking import download, main_client, run_outputs, setup_tracking  # noqa: E402
from pipeline.train import predict_proba, stack_inputs  # noqa: E402
from pipeline.transforms import build_transform  # noqa: E402
from stages.evaluate import ensemble_members  # noqa: E402


METRICS = {"auc": "AUC", "log_loss": "log-loss"}  # --metric choices and their printed names


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
    name, better = METRICS[metric], ("lower" if metric == "log_loss" else "up")
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, action="append",
                    help="finetune stage run id (its predictions/index.json lists models); repeat to pool runs of "
                         "other seeds or arms; '<tag>=<id>' names that run's arms '<tag>.<arm>'")
    ap.add_argument("--members", action="append", default=[],
                    help="arms of one ensemble, comma-separated (e.g. transfer,transfer.r1); repeat for several "
                         "ensembles, the first is the reference; default: transfer and every meta-* arm")
    ap.add_argument("--compare", action="append", default=[],
                    help="two arms 'a,b': also print the paired a-minus-b validation score; repeatable")
    ap.add_argument("--metric", action="append", choices=list(METRICS), default=[],
                    help="validation score, repeatable, in the order printed: auc (default) or log_loss (lower is "
                         "better; not saturated when every AUC is near 1)")
    ap.add_argument("--config", default=None)
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    setup_tracking(cfg.experiment)
    runs = []
    for spec in args.run:
        try:
            tag, rid = parse_merge_run(spec, "--run")
        except ConfigError as e:
            sys.exit(str(e))
        run = main_client().get_run(rid)
        if run.data.tags.get("pipeline.stage") != "finetune":
            sys.exit(f"run {rid} is not a finetune stage run; give the id of the run named 'finetune'")
        index = json.loads((download(run_outputs(run)["predictions_uri"]) / "index.json").read_text())
        runs += [r | {"arm": tagged_arm(tag, r["arm"]), "finetune_run": rid} for r in index["runs"]]
    seen = [(r["arm"], r["k"], r["seed"]) for r in runs]
    if len(set(seen)) != len(seen):  # as evaluate.merge_runs refuses them: one model per (arm, k, seed)
        sys.exit(f"--run: the runs repeat (arm, k, seed) {sorted({x for x in seen if seen.count(x) > 1})[:5]}; pool "
                 f"runs of other seeds or arms, or tag one ('<tag>=<run id>') to name its arms '<tag>.<arm>'")
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    groups = [m.split(",") for m in args.members] or [ensemble_members(arms)]
    ensembles = {"ensemble" if not args.members else "ens(" + "+".join(m) + ")": m for m in groups}
    for name, m in ensembles.items():
        if len(m) < 2 or set(m) - set(arms):
            sys.exit(f"{name}: members {m} must be at least two of the runs' arms {arms}")
    compare = [tuple(c.split(",")) for c in args.compare]
    for c in compare:
        if len(c) != 2 or set(c) - set(arms):
            sys.exit(f"--compare {','.join(c)}: give two of the runs' arms {arms}, comma-separated")
    members = list(dict.fromkeys([a for m in ensembles.values() for a in m] + [a for c in compare for a in c]))
    va = load_target(cfg).splits["val"]
    torch.manual_seed(0)
    inputs: dict[tuple, torch.Tensor] = {}  # one stacked val tensor per preprocessing spec
    probs: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    for r in runs:
        if r["arm"] not in members:
            continue
        if not r.get("model_uri"):
            sys.exit(f"run {r['finetune_run']} logged no models (finetune.log_models was false); rerun with it on")
        model, spec = load_model(r["model_uri"])
        key = (spec["image_size"], tuple(spec["mean"]), tuple(spec["std"]))
        if key not in inputs:
            t = build_transform(spec["image_size"], spec["mean"], spec["std"], train=False)
            inputs[key] = stack_inputs(ImageDataset(va.images, va.labels, t))
        probs.setdefault((r["k"], r["seed"]), {})[r["arm"]] = predict_proba(
            model, inputs[key], torch.device("cpu"), tta=bool(spec.get("tta")))
    for metric in args.metric or ["auc"]:
        rows = score_rows(va.labels, probs, members, ensembles, metric)
        for row in rows:
            print(json.dumps(row if metric == "auc" else {"metric": metric, **row}), flush=True)
        print(summarise(rows, ensembles, compare, metric),
              f"(finetune runs {', '.join(args.run)}, {len(va.labels)} validation images)", flush=True)


if __name__ == "__main__":
    main()
