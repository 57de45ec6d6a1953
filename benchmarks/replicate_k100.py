"""k=100 on fresh seeds, chosen by validation log-loss (docs/experiments/11-k100-fresh-seeds-log-loss.md), as one
pipeline run through the API: a backbone run that builds Lite0 and Lite2, one finetune run of the noisy-student
self-trained transfer arm of each body on seeds FIRST..LAST (`configs/best.yaml`'s recipe), and the evaluate run,
which chooses among the three pre-registered candidates on validation alone and then scores the test split. Run ids
and the selection come back from `run_pipeline` and the evaluate run's artifacts; nothing parses printed output.

    PIPELINE_DATA_ROOT=../shared/data python benchmarks/replicate_k100.py            # seeds 5-8
    python benchmarks/replicate_k100.py --first 5 --last 5 [--set key=value ...]      # one seed

Killed part-way, the same command continues: finished stages are reused and the finetune stage keeps the jobs
that finished (docs/design.md, "Resume").
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlflow

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.config import load_config  # noqa: E402
from pipeline.orchestrate import run_pipeline  # noqa: E402

LITE2 = "transfer@tf_efficientnet_lite2"
# fixed before the first run (the experiment's file); a tie goes to the earlier one
CANDIDATES = ["ensemble-2ns", "transfer", LITE2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--first", type=int, default=5, help="first seed number")
    ap.add_argument("--last", type=int, default=8, help="last seed number (pre-registered 5-9, amended to 5-8)")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = ap.parse_args()
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "configs" / "best.yaml", [
        "experiment=fewshot-medmeta-k100", f"finetune.arms=[transfer,{LITE2}]", "finetune.shots=[100]",
        f"finetune.first_seed={args.first}", f"finetune.seeds={args.last - args.first + 1}",
        "evaluate.ensemble=false", f"evaluate.ensembles=[ensemble-2ns=transfer+{LITE2}]",
        f"evaluate.candidates=[{','.join(CANDIDATES)}]", *args.overrides])
    out = run_pipeline(cfg, ["backbone", "finetune", "evaluate"])
    sel = mlflow.artifacts.load_dict(out["evaluate"]["selection_uri"])["k100"]
    res = mlflow.artifacts.load_dict(out["evaluate"]["results_uri"])
    chosen = res["chosen"]["k100"]
    print(json.dumps({"runs": {s: o["run_id"] for s, o in out.items()}, "metric": sel["metric"],
                      "validation": sel["scores"], "chosen": sel["chosen"], "test_auc": chosen["auc"],
                      "n_seeds": chosen["n_seeds"]}, indent=1))


if __name__ == "__main__":
    main()
