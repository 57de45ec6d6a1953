"""Compare fine-tuning recipes on the target's *validation* split, the way the defaults were chosen.

Each seed fine-tunes one arm (transfer or scratch) with the stage's own per-job function,
`pipeline.finetune.train_job` (the k-shot subset, selection subset, training transform, initial model and
self-training of `finetune/<arm>/k<k>/seed<s>`). It then scores the chosen model on the whole validation split. The
test split is only scored with `--test`, for reporting after a recipe is fixed. Tensors stay contiguous (the stage
uses channels-last on CPU by default), so figures can differ slightly from the stage's runs of the same seed.

    python benchmarks/finetune_recipe.py [--k 20] [--seeds 0,1,2] [--arm transfer] [--test] \
        [--set finetune.image_size=128 --set finetune.lr_body=0.001 ...]

Prints one JSON line per seed and, last, `RESULT val_auc=<mean> val_loss=<mean> [test_auc=<mean>]`; with
self-training (`--set finetune.pseudo_per_class=N`) the row describes the student and also gives its teacher's
(the plain fine-tune's) figures and the paired difference. `--from-log FILE` re-prints the summary of a saved run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.backbone import create_backbone  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import ImageDataset, load_target  # noqa: E402
from pipeline.device import configure, resolve_device  # noqa: E402
from pipeline.finetune import Arm, Job, TargetInputs, prepare_inputs, train_job  # noqa: E402
from pipeline.metrics import classification_metrics, mean_ci, paired_comparison  # noqa: E402
from pipeline.train import log_loss, predict_proba, stack_inputs  # noqa: E402


def summarise(rows: list[dict]) -> str:
    """The RESULT line: means over seeds; with self-training also the teacher's (and each earlier round's student's)
    means and, for every split both were scored on, the paired final-minus-earlier difference (mean [95% t-CI],
    Wilcoxon p)."""
    def mean(key: str) -> str:
        return f"{np.mean([r[key] for r in rows]):.4f}"
    earlier = ["teacher"] + sorted({key.split("_")[0] for key in rows[0] if key.startswith("round")})
    out = "RESULT " + " ".join(f"{key}={mean(key)}" for key in ("val_auc", "val_loss", "test_auc") +
                               tuple(f"{e}_{split}_auc" for e in earlier for split in ("val", "test"))
                               if key in rows[0])
    for split in ("val", "test"):
        for e in earlier:
            if f"{e}_{split}_auc" in rows[0]:
                c = paired_comparison(np.array([r[f"{split}_auc"] for r in rows]),
                                      np.array([r[f"{e}_{split}_auc"] for r in rows]))
                m, lo, hi = mean_ci([r[f"{split}_auc"] for r in rows])
                t, tlo, thi = mean_ci([r[f"{e}_{split}_auc"] for r in rows])
                out += (f"\n{split} AUC mean [95% t-CI]: student {m:.4f} [{lo:.4f}, {hi:.4f}], "
                        f"{e} {t:.4f} [{tlo:.4f}, {thi:.4f}]")
                out += (f"\nPAIRED {split} AUC student-{e}: {c['mean_diff']:+.4f} [{c['ci_low']:+.4f}, "
                        f"{c['ci_high']:+.4f}], Wilcoxon p={c['wilcoxon_p']:.3g}, n={c['n']}")
    return out


def scores(model: torch.nn.Module, data: TargetInputs, x_test: torch.Tensor | None, tta: bool, dev: torch.device
           ) -> dict[str, float]:
    """Validation AUC and log loss on the whole val split, and test AUC with `--test`."""
    va = data.split("val")
    p_val = predict_proba(model, data.x_val, dev, tta=tta)
    out = {"val_auc": round(classification_metrics(va.labels, p_val)["auc"], 4),
           "val_loss": round(log_loss(va.labels, p_val), 4)}
    if x_test is not None:
        p_test = predict_proba(model, x_test, dev, tta=tta)
        out["test_auc"] = round(classification_metrics(data.split("test").labels, p_test)["auc"], 4)
    return out


def teacher_scores(rnd: int, teacher: torch.nn.Module, data: TargetInputs, x_test: torch.Tensor | None, tta: bool,
                   dev: torch.device) -> dict[str, float]:
    """Each teacher scored as a final model: teacher_* for the fine-tune, round<r>_* for the student of round r
    that teaches round r+1."""
    name = "teacher" if rnd == 0 else f"round{rnd}"
    return {f"{name}_{key}": v for key, v in scores(teacher, data, x_test, tta, dev).items() if key != "val_loss"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    ap.add_argument("--k", type=int, default=20, help="labelled images per class")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--arm", default="transfer", choices=["transfer", "scratch"])
    ap.add_argument("--test", action="store_true", help="also score the test split (not for choosing a recipe)")
    ap.add_argument("--from-log", default=None, metavar="FILE",
                    help="only summarise the JSON rows an earlier run printed (its saved output); trains nothing")
    args = ap.parse_args()
    if args.from_log:
        rows = [json.loads(line) for line in Path(args.from_log).read_text().splitlines() if line.startswith("{")]
        print(summarise(rows), f"({len(rows)} seeds from {args.from_log})")
        return
    cfg = load_config(args.config, args.overrides)
    ft, dev = cfg.finetune, resolve_device(cfg.device)
    configure(dev, cfg.cudnn_benchmark)
    # transfer: the ImageNet body, as the backbone stage checkpoints it; scratch: random init of that architecture
    body, _, _ = create_backbone(cfg.backbone.model, weights=cfg.backbone.weights if args.arm == "transfer" else "none",
                                 weights_file=cfg.backbone.weights_file if args.arm == "transfer" else "")
    ckpt = {"model_name": cfg.backbone.model, "state_dict": body.state_dict()}
    data = prepare_inputs(cfg, load_target(cfg), ckpt, with_test=False)  # jobs never read the test split here
    te = data.split("test")
    x_test = stack_inputs(ImageDataset(te.images, te.labels, data.eval_t)) if args.test else None
    arm = Arm(ckpt if args.arm == "transfer" else None)
    rows = []
    for s in (int(v) for v in args.seeds.split(",")):
        t0 = time.time()
        row = {"seed": s}
        # tensors stay contiguous (channels_last=False), as this script has always run them
        res = train_job(data, ft, Job(args.k, s, args.arm), arm, cfg.seed, dev,
                        before_round=lambda rnd, teacher, _fit, row=row: row.update(
                            teacher_scores(rnd, teacher, data, x_test, ft.tta, dev)))
        row |= {"best_epoch": res.best_epoch - res.first_epoch + 1,  # in the final fit's own epochs
                "selection_auc": round(res.best_val_auc, 4), **{key: round(v, 4) for key, v in res.extra.items()
                                                                 if not key.endswith("_val_auc")}}
        row |= scores(res.model, data, x_test, ft.tta, dev)
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(summarise(rows), f"(k={args.k}, size={data.size}, seeds={args.seeds}, {' '.join(args.overrides)})",
          flush=True)


if __name__ == "__main__":
    main()
