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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.config import ConfigError, load_config, parse_merge_run, tagged_arm  # noqa: E402
from pipeline.data import ImageDataset, load_target  # noqa: E402
from pipeline.predict import load_model  # noqa: E402
from pipeline.tracking import download, main_client, run_outputs, setup_tracking  # noqa: E402
from pipeline.train import predict_proba, stack_inputs  # noqa: E402
from pipeline.transforms import build_transform  # noqa: E402
from pipeline.evaluate import ensemble_members  # noqa: E402
from pipeline.selection import SCORES, score_rows, summarise  # noqa: E402


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
    ap.add_argument("--metric", action="append", choices=list(SCORES), default=[],
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
