"""The ProtoNet body fine-tuned at its meta-training resolution (docs/experiments/20-protonet-at-64px.md): the meta
stage trains at `data.image_size` (64 px) while fine-tuning and test upsample to `finetune.image_size` (128 px), so
experiments 17-18 fine-tuned a meta-learned body off the resolution it learnt at. As pipeline runs chained through the
API (run ids come back from `run_pipeline`; nothing parses printed output):

1. The ProtoNet meta run (the default meta config) after the backbone run.
2. Finetune run A: `transfer`, the default recipe at 128 px (the reference).
3. Finetune run B: the ProtoNet body alone, the default recipe with the prototype head, at 64 px
   (`finetune.image_size=0`, i.e. `data.image_size`).
4. Finetune run C (secondary): `transfer`, the default recipe at 64 px: what the same resolution does to ImageNet.
5. The evaluate stage on A with B and C merged under the tag `proto` ("... (64 px)" below): paired differences
   against `transfer`; the rule's verdict from the ProtoNet arm's differences; and, from the same rows, the ProtoNet
   body minus ImageNet transfer, both at 64 px.

    OMP_NUM_THREADS=1 PIPELINE_DATA_ROOT=../shared/data python benchmarks/compare_resolution.py   # pre-registered
    python benchmarks/compare_resolution.py --seeds 1 --shots 5 --meta-iterations 2 --set finetune.epochs=1  # toy

`--part` runs one piece (to run pieces side by side); `--merge-a`, `--merge-b`, `--merge-c` score runs A, B, C of
other seed ranges (`--first`) with this one's. Killed part-way, the same command continues (finished stages and jobs are reused).
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlflow

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_meta import run_meta, summarise, verdict  # noqa: E402
from compare_prototype import frozen_contrast  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.orchestrate import run_pipeline  # noqa: E402

AT_64 = ["finetune.image_size=0"]  # fixed before the first run (the experiment's file): data.image_size, 64 px
NAME_64 = " (64 px)"  # the arms of runs B and C, merged under the tag `proto`


def run_finetune(part: str, protonet: str, cfg_file: str | None, base: list[str],
                 merge: list[str] | None = None) -> dict | str:
    """Run `A`, `B` or `C` (see the module's docstring); with `merge`, also the evaluate stage over the runs it names.
    Returns run_pipeline's outputs, or the run id."""
    arms = {"A": ["finetune.arms=[transfer]"], "C": ["finetune.arms=[transfer]", *AT_64],
            "B": ["finetune.arms=[]", f"finetune.meta_from_runs=[{protonet}]", "finetune.head_init=prototype", *AT_64]}
    over = [*base, "evaluate.ensemble=false", *arms[part],
            *([f"evaluate.merge_runs=[{','.join(merge)}]"] if merge else [])]
    out = run_pipeline(load_config(cfg_file, over), ["backbone", "finetune", *(["evaluate"] if merge else [])])
    return out if merge else out["finetune"]["run_id"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--first", type=int, default=106, help="first seed (pre-registered: 106)")
    ap.add_argument("--seeds", type=int, default=64, help="number of seeds (pre-registered: 64)")
    ap.add_argument("--shots", default="5,10", help="k values, comma-separated")
    ap.add_argument("--meta-iterations", type=int, default=0, help="meta.iterations (0: the config's default)")
    ap.add_argument("--config", default="", help="base config file (default: the built-in defaults)")
    ap.add_argument("--part", default="all", choices=["all", "backbone", "meta-protonet", "A", "B", "C"],
                    help="run one piece only (default: the whole experiment)")
    for run in "abc":
        ap.add_argument(f"--merge-{run}", action="append", default=[], metavar="RUN_ID",
                        help=f"a run {run.upper()} of other seeds, scored with this one's (repeatable)")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = ap.parse_args()
    base = [f"finetune.first_seed={args.first}", f"finetune.seeds={args.seeds}", f"finetune.shots=[{args.shots}]",
            *([f"meta.iterations={args.meta_iterations}"] if args.meta_iterations else []), *args.overrides]
    cfg_file = args.config or None

    if args.part == "backbone":
        run_pipeline(load_config(cfg_file, base), ["backbone"])
        return
    if args.part in ("A", "C"):  # need no meta run
        run_finetune(args.part, "", cfg_file, base)
        return
    protonet = run_meta("protonet", cfg_file, base)
    if args.part == "meta-protonet":
        return
    run_b = run_finetune("B", protonet, cfg_file, base)
    if args.part == "B":
        return
    run_c = run_finetune("C", protonet, cfg_file, base)
    merge = [*args.merge_a, *(f"proto={r}" for r in [run_b, *args.merge_b, run_c, *args.merge_c])]
    out = run_finetune("A", protonet, cfg_file, base, merge=merge)
    res = mlflow.artifacts.load_dict(out["evaluate"]["results_uri"])
    ids = {"protonet": protonet}
    summary = {"runs": {"meta": ids, "finetune_B": run_b, "finetune_C": run_c,
                        **{s: o["run_id"] for s, o in out.items()}},
               **summarise(res, ids, NAME_64)}
    # the rule concerns the meta arm; transfer at 64 px is the secondary contrast, outside the verdict
    summary["verdict"] = verdict([c for c in res["comparisons"] if c["arm"] != "proto.transfer"], ids,
                                 proto_name=NAME_64)
    summary["protonet_minus_transfer_at_64px"] = frozen_contrast(res["rows"], f"meta-protonet-{protonet[:6]}")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
