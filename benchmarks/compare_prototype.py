"""ProtoNet used as ProtoNet (docs/experiments/19-protonet-nearest-prototype.md): the meta-learned body frozen with
the nearest-class-mean classifier of the k labelled images, against fine-tuned ImageNet transfer, as pipeline runs
chained through the API (run ids come back from `run_pipeline`; nothing parses printed output).

1. The ProtoNet meta run (the default meta config) after the backbone run.
2. Finetune run A: `transfer`, the default recipe (the reference).
3. Finetune run B: `transfer` and the ProtoNet body with `finetune.epochs=0 finetune.head_init=prototype`: no
   training, each body frozen, the head set from the k-shot class means (ProtoNet's own test-time rule).
4. The evaluate stage on A with B merged under the tag `proto`: paired differences against `transfer`, and the
   script adds ProtoNet's frozen body minus ImageNet's frozen body from the same rows.

    OMP_NUM_THREADS=1 PIPELINE_DATA_ROOT=../shared/data python benchmarks/compare_prototype.py   # pre-registered
    python benchmarks/compare_prototype.py --seeds 1 --shots 5 --meta-iterations 2 --set finetune.epochs=1  # toy

`--part` runs one piece (to run pieces side by side); `--merge-transfer` / `--merge-frozen` score runs of other seed
ranges (`--first`) with this one's. Killed part-way, the same command continues (finished stages and jobs are
reused). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlflow
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_meta import run_meta, summarise  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.metrics import paired_comparison  # noqa: E402
from pipeline.orchestrate import run_pipeline  # noqa: E402

FROZEN = ["finetune.epochs=0", "finetune.head_init=prototype"]  # fixed before the first run (the experiment's file)
FROZEN_NAME = ", frozen nearest prototype"  # the arms of run B, merged under the tag `proto`


def run_finetune(frozen: bool, protonet: str, cfg_file: str | None, base: list[str],
                 merge: list[str] | None = None, frozen_set: list[str] = ()) -> dict | str:
    """Run A (`frozen=False`: transfer, fine-tuned) or B (transfer and the ProtoNet body, frozen, nearest prototype,
    with `frozen_set` overrides); with `merge`, also the evaluate stage over the runs it names. Returns run_pipeline's
    outputs, or the run id."""
    over = [*base, "finetune.arms=[transfer]", "evaluate.ensemble=false",
            *([*FROZEN, f"finetune.meta_from_runs=[{protonet}]", *frozen_set] if frozen else []),
            *([f"evaluate.merge_runs=[{','.join(merge)}]"] if merge else [])]
    out = run_pipeline(load_config(cfg_file, over), ["backbone", "finetune", *(["evaluate"] if merge else [])])
    return out if merge else out["finetune"]["run_id"]


def frozen_contrast(rows: list[dict], protonet_arm: str) -> dict:
    """Per k: the ProtoNet arm minus `transfer`, both of the runs merged under the tag `proto` (here: both frozen,
    nearest prototype; experiment 20: both fine-tuned at 64 px), paired by seed."""
    auc = {(r["arm"], r["k"], r["seed"]): r["auc"] for r in rows}
    out = {}
    for k in sorted({r["k"] for r in rows}):
        seeds = sorted(s for (a, kk, s) in auc if a == "proto.transfer" and kk == k
                       and ("proto." + protonet_arm, k, s) in auc)
        c = paired_comparison(np.array([auc["proto." + protonet_arm, k, s] for s in seeds]),
                              np.array([auc["proto.transfer", k, s] for s in seeds]))
        out[f"k{k}"] = {key: (round(v, 4) if isinstance(v, float) else v) for key, v in c.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--first", type=int, default=63, help="first seed (pre-registered: 63)")
    ap.add_argument("--seeds", type=int, default=43, help="number of seeds (pre-registered: 43)")
    ap.add_argument("--shots", default="5,10", help="k values, comma-separated")
    ap.add_argument("--meta-iterations", type=int, default=0, help="meta.iterations (0: the config's default)")
    ap.add_argument("--config", default="", help="base config file (default: the built-in defaults)")
    ap.add_argument("--part", default="all", choices=["all", "backbone", "meta-protonet", "transfer", "frozen"],
                    help="run one piece only (default: the whole experiment)")
    ap.add_argument("--merge-transfer", action="append", default=[], metavar="RUN_ID",
                    help="a fine-tuned transfer run (run A) of other seeds, scored with this one's (repeatable)")
    ap.add_argument("--merge-frozen", action="append", default=[], metavar="RUN_ID",
                    help="a frozen nearest-prototype run (run B) of other seeds, scored with this one's (repeatable)")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    ap.add_argument("--frozen-set", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for the frozen run B only (experiment 19's amendment: finetune.image_size=0)")
    args = ap.parse_args()
    base = [f"finetune.first_seed={args.first}", f"finetune.seeds={args.seeds}", f"finetune.shots=[{args.shots}]",
            *([f"meta.iterations={args.meta_iterations}"] if args.meta_iterations else []), *args.overrides]
    cfg_file = args.config or None

    if args.part == "backbone":
        run_pipeline(load_config(cfg_file, base), ["backbone"])
        return
    if args.part == "transfer":  # needs no meta run
        run_finetune(False, "", cfg_file, base)
        return
    protonet = run_meta("protonet", cfg_file, base)
    if args.part == "meta-protonet":
        return
    run_b = run_finetune(True, protonet, cfg_file, base, frozen_set=args.frozen_set)
    if args.part == "frozen":
        return
    merge = [*args.merge_transfer, f"proto={run_b}", *(f"proto={r}" for r in args.merge_frozen)]
    out = run_finetune(False, protonet, cfg_file, base, merge=merge)
    res = mlflow.artifacts.load_dict(out["evaluate"]["results_uri"])
    ids = {"protonet": protonet}
    summary = {"runs": {"meta": ids, "finetune_frozen": run_b, **{s: o["run_id"] for s, o in out.items()}},
               **summarise(res, ids, FROZEN_NAME),
               "protonet_minus_imagenet_frozen": frozen_contrast(res["rows"], f"meta-protonet-{protonet[:6]}")}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
