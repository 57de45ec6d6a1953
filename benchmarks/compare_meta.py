"""Meta-learned bodies against ImageNet transfer at k <= 20 (docs/experiments/17-meta-vs-transfer-k-le-20.md), as
pipeline runs chained through the API (MLflow's multistep pattern): run ids come back from `run_pipeline`, nothing
parses printed output, and every run is in the store for the MLflow UI.

1. One meta run per algorithm (ANIL, ProtoNet, the multitask control; the default config's budget unless
   `--meta-iterations`), all from the same backbone run.
2. Finetune run A: `transfer` and the ANIL and multitask bodies (`finetune.meta_from_runs`), default head.
3. Finetune run B: `transfer` and the ProtoNet body with the prototype head (`finetune.head_init=prototype`).
4. The evaluate stage on A with B merged under the tag `proto` (`evaluate.merge_runs`): every arm on the same
   paired k-shot subsets (seeds), test AUC with CIs, paired differences against `transfer`.

    PIPELINE_DATA_ROOT=../shared/data python benchmarks/compare_meta.py                 # the pre-registered run
    python benchmarks/compare_meta.py --seeds 1 --shots 5 --meta-iterations 2 --set finetune.epochs=1   # toy size

`--merge-default` / `--merge-prototype` score finetune runs of other seed ranges (`--first`) with this one's, as
one comparison (docs/experiments/18-meta-vs-transfer-43-seeds.md).

Killed part-way, the same command continues: finished stages are reused (same config, same code), a finetune
stage keeps its finished jobs (docs/design.md, "Resume"). Prints one JSON object (runs, AUCs, paired differences and
the pre-registered rule's verdict).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlflow

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.config import load_config  # noqa: E402
from pipeline.metrics import seeds_for_half_width  # noqa: E402
from pipeline.orchestrate import run_pipeline  # noqa: E402

# fixed before the first run (the experiment's file): the meta-learners and their fine-tuning head
META = {"anil": "default", "multitask": "default", "protonet": "prototype"}


PROTO = " + prototype head"  # what the arms of the run merged under the tag `proto` are called here


def arm_label(arm: str, meta_ids: dict[str, str], proto_name: str = PROTO) -> str:
    """'meta-anil-1a2b3c' -> 'meta-anil', 'proto.meta-protonet-...' -> 'meta-protonet + prototype head'."""
    proto = arm.startswith("proto.")
    base = arm.removeprefix("proto.")
    for alg, rid in meta_ids.items():
        if base == f"meta-{alg}-{rid[:6]}":
            base = f"meta-{alg}"
    return base + (proto_name if proto else "")


def verdict(comparisons: list[dict], meta_ids: dict[str, str], k_max: int = 10, half_width: float = 0.015,
            proto_name: str = PROTO) -> dict:
    """The pre-registered rule: a meta arm beats transfer at a k <= k_max if its paired interval lies above zero;
    otherwise a null, precise if every paired interval at k <= k_max has a half-width <= `half_width`, else imprecise,
    with the seeds the widest one would need at its observed spread."""
    at = [c for c in comparisons if isinstance(c["k"], int) and c["k"] <= k_max]
    label = {id(c): f"{arm_label(c['arm'], meta_ids, proto_name)} k{c['k']}" for c in at}
    above = [label[id(c)] for c in at if c["arm"].removeprefix("proto.").startswith("meta-") and c["ci_low"] > 0]
    widest = max(at, key=lambda c: c["ci_high"] - c["ci_low"])
    hw = (widest["ci_high"] - widest["ci_low"]) / 2
    outcome = "meta beats transfer" if above else ("precise null" if hw <= half_width else "imprecise null")
    return {"outcome": outcome, "meta_arms_above_zero": above, "widest_interval": label[id(widest)],
            "widest_half_width": round(hw, 4),
            "seeds_for_half_width": seeds_for_half_width(widest["ci_low"], widest["ci_high"], widest["n"], half_width)}


def summarise(res: dict, meta_ids: dict[str, str], proto_name: str = PROTO) -> dict:
    """The printed summary of an evaluate stage's `results.json` content `res`: each meta run's meta-validation
    accuracy, test AUC per arm and k, paired differences against `transfer`, and the rule's verdict."""
    def name(arm: str, k) -> str:
        return f"{arm_label(arm, meta_ids, proto_name)} k{k}"
    meta_runs = {a: mlflow.get_run(r).data.metrics for a, r in meta_ids.items()}
    return {
        "meta_val": {a: {"start": m.get("meta_val_start_acc"), "best": m.get("meta_val_best_acc"),
                         "seconds": m.get("meta_seconds")} for a, m in meta_runs.items()},
        "test_auc": {name(g["arm"], g["k"]): [round(g["auc"], 4), [round(v, 4) for v in g["auc_ci"]], g["n_seeds"]]
                     for g in res["aggregates"]},
        "paired_vs_transfer": {name(c["arm"], c["k"]): {
            key: (round(v, 4) if isinstance(v, float) else v) for key, v in c.items()
            if key not in ("arm", "reference", "k", "metric")} for c in res["comparisons"]},
        "verdict": verdict(res["comparisons"], meta_ids, proto_name=proto_name),
    }


def run_meta(alg: str, cfg_file: str | None, base: list[str]) -> str:
    """The meta run of one algorithm (after the backbone stage); its run id."""
    cfg = load_config(cfg_file, [*base, f"meta.algorithm={alg}"])
    return run_pipeline(cfg, ["backbone", "meta"])["meta"]["run_id"]


def run_finetune(head: str, meta_ids: dict[str, str], cfg_file: str | None, base: list[str],
                 merge: list[str] | None = None) -> dict:
    """Finetune run of `transfer` and the bodies of the algorithms fine-tuned with `head`; with `merge` (further
    finetune runs as `evaluate.merge_runs` entries) also the evaluate stage over all of them. Returns run_pipeline's
    outputs."""
    algs = [a for a in meta_ids if META[a] == head]
    over = [*base, "finetune.arms=[transfer]", "evaluate.ensemble=false",
            *(["finetune.head_init=prototype"] if head == "prototype" else []),
            f"finetune.meta_from_runs=[{','.join(meta_ids[a] for a in algs)}]",
            *([f"evaluate.merge_runs=[{','.join(merge)}]"] if merge else [])]
    stages = ["backbone", "finetune", *(["evaluate"] if merge else [])]
    out = run_pipeline(load_config(cfg_file, over), stages)
    return out if merge else out["finetune"]["run_id"]


def run_part(part: str, cfg_file: str | None, base: list[str], algorithms: list[str]) -> None:
    """`backbone`, `meta-ALG` or `finetune-HEAD` alone (finetune parts need their meta runs finished; under torchrun
    the finetune jobs are shared among the processes)."""
    if part == "backbone":
        run_pipeline(load_config(cfg_file, base), ["backbone"])
    elif part.startswith("meta-"):
        run_meta(part.removeprefix("meta-"), cfg_file, base)
    else:
        head = part.removeprefix("finetune-")
        meta_ids = {a: run_meta(a, cfg_file, base) for a in algorithms if META[a] == head}
        run_finetune(head, meta_ids, cfg_file, base)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--first", type=int, default=20, help="first seed (pre-registered: 20)")
    ap.add_argument("--seeds", type=int, default=8, help="number of seeds (pre-registered: 8)")
    ap.add_argument("--shots", default="5,10,20", help="k values, comma-separated")
    ap.add_argument("--meta-iterations", type=int, default=0, help="meta.iterations (0: the config's default)")
    ap.add_argument("--config", default="", help="base config file (default: the built-in defaults)")
    parts = ["all", "backbone", *(f"meta-{a}" for a in META), "finetune-default", "finetune-prototype"]
    ap.add_argument("--part", default="all", choices=parts, help="run one piece only (default: the whole experiment)")
    ap.add_argument("--merge-default", action="append", default=[], metavar="RUN_ID",
                    help="a default-head finetune run of this experiment on other seeds (--first), scored with this "
                         "one's (evaluate.merge_runs; repeatable)")
    ap.add_argument("--merge-prototype", action="append", default=[], metavar="RUN_ID",
                    help="the same for a prototype-head finetune run (scored under the tag 'proto')")
    ap.add_argument("--algorithms", default=",".join(META),
                    help=f"the meta arms, comma-separated, of {list(META)} (default: all; experiment 22: protonet)")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = ap.parse_args()
    algorithms = args.algorithms.split(",")
    if not algorithms or set(algorithms) - set(META):
        ap.error(f"--algorithms {args.algorithms!r}: choose from {', '.join(META)}")
    base = [f"finetune.first_seed={args.first}", f"finetune.seeds={args.seeds}", f"finetune.shots=[{args.shots}]",
            *([f"meta.iterations={args.meta_iterations}"] if args.meta_iterations else []), *args.overrides]
    cfg_file = args.config or None

    if args.part != "all":  # one piece, to run pieces side by side (the full command then reuses them)
        run_part(args.part, cfg_file, base, algorithms)
        return
    meta_ids = {alg: run_meta(alg, cfg_file, base) for alg in algorithms}
    run_b = run_finetune("prototype", meta_ids, cfg_file, base)
    merge = [*args.merge_default, f"proto={run_b}", *(f"proto={r}" for r in args.merge_prototype)]
    out = run_finetune("default", meta_ids, cfg_file, base, merge=merge)
    res = mlflow.artifacts.load_dict(out["evaluate"]["results_uri"])

    summary = {"runs": {"meta": meta_ids, "finetune_prototype_head": run_b, **{s: o["run_id"] for s, o in out.items()}},
               **summarise(res, meta_ids)}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
