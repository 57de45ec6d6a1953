"""Scoring of the finetune stage's test predictions, MLflow-free: ensembles and merged runs as further arms,
metrics with confidence intervals, paired comparisons, the report and plots. Everything is recomputed from
`predictions/*.csv`, so anyone can check it."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from sklearn.metrics import confusion_matrix, roc_curve  # noqa: E402

from .config import EvaluateConfig, is_replica, mlflow_key, parse_ensemble, tagged_arm  # noqa: E402
from .data import DataError  # noqa: E402
from .metrics import METRICS, bootstrap_ci, classification_metrics, mean_ci, paired_comparison  # noqa: E402
from .selection import choose_candidates, operating_threshold  # noqa: E402


def read_predictions(path: Path, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    df = pd.read_csv(path)
    return df["label"].to_numpy(), df[[f"prob_{c}" for c in class_names]].to_numpy()


def ensemble_members(arms: list[str]) -> list[str]:
    """The arms the default ensemble averages: the pretrained ones (transfer, transfer@<model> and every meta-*),
    not scratch and not replicas (`<arm>.r<n>`, which `evaluate.ensembles` can name)."""
    return [a for a in arms if not is_replica(a) and (a.partition("@")[0] == "transfer" or a.startswith("meta-"))]


def val_dir(pred_dir: Path) -> Path:
    """Where the validation predictions beside a folder of test predictions live (`val_predictions/`, same file
    names); created empty if missing (runs from before validation predictions were logged)."""
    d = pred_dir.parent / "val_predictions"
    d.mkdir(exist_ok=True)
    return d


def add_ensemble(pred_dir: Path, name: str = "ensemble", source: str = "", members: list[str] | None = None) -> int:
    """Add an arm `name` to `pred_dir`: per (k, seed), the mean class probabilities of `members` (default: every
    pretrained arm, `transfer` and `meta-*`; scratch is left out), when at least two of them are there. Its
    prediction files and index entries are written like the finetune stage's, so `compute_results` (and anyone
    re-reading the CSVs) treats it as one more arm. The ensemble is fixed in advance, nothing about it is chosen on
    test. Returns the number of ensemble rows written. `source` (where `pred_dir` was copied from) is named in
    errors; named `members` must all be arms of `pred_dir`."""
    index = json.loads((pred_dir / "index.json").read_text())
    classes = index["class_names"]
    if name in index["arms"]:
        if members is None:
            return 0
        raise DataError(f"evaluate.ensembles: {name!r} is already an arm of {source or pred_dir}; pick another name")
    if members is None:
        members = ensemble_members(index["arms"])
    else:
        missing = [m for m in members if m not in index["arms"]]
        if missing:
            raise DataError(f"evaluate.ensembles: {name!r} names {missing}, not arms of {source or pred_dir} (arms: "
                            f"{index['arms']}); fix the names or add the finetune run that has them to "
                            f"evaluate.merge_runs")
    if len(members) < 2:
        return 0
    groups: dict[tuple[int, int], dict[str, dict]] = {}
    for r in index["runs"]:
        if r["arm"] in members:
            groups.setdefault((r["k"], r["seed"]), {})[r["arm"]] = r
    n = 0
    for (k, seed), by_arm in sorted(groups.items()):
        if len(by_arm) != len(members):
            continue
        runs = [by_arm[m] for m in members]
        frames = [pd.read_csv(pred_dir / r["file"]) for r in runs]
        first = frames[0]
        for r, f in zip(runs[1:], frames[1:]):  # members must predict the same images with the same labels
            if not (f["index"].equals(first["index"]) and f["label"].equals(first["label"])):
                raise DataError(f"{r['file']} and {runs[0]['file']} in {source or pred_dir} cover different test "
                                "images; rerun the finetune stage so every arm predicts the same test split, or set "
                                "evaluate.ensemble=false")
        cols = [f"prob_{c}" for c in classes]
        ens = first[["index", "label"]].copy()
        ens[cols] = np.mean([f[cols].to_numpy(float) for f in frames], axis=0)
        file = f"{name}_k{k}_seed{seed}.csv"
        ens.to_csv(pred_dir / file, index=False)
        val = val_dir(pred_dir)  # the same mean on the validation split, where the members have it
        if all((val / r["file"]).is_file() for r in runs):
            vframes = [pd.read_csv(val / r["file"]) for r in runs]
            vens = vframes[0][["index", "label"]].copy()
            vens[cols] = np.mean([f[cols].to_numpy(float) for f in vframes], axis=0)
            vens.to_csv(val / file, index=False)
        index["runs"].append({"arm": name, "k": k, "seed": seed, "file": file, "members": [r["arm"] for r in runs],
                              "best_val_auc": None})
        n += 1
    if n:
        index["arms"].append(name)
        (pred_dir / "index.json").write_text(json.dumps(index, indent=1))
    return n


def merge_predictions(pred_dir: Path, other: Path, source: str, tag: str = "", other_val: Path | None = None) -> int:
    """Add the prediction files and index entries of another finetune run (`other`, downloaded from `source`) to
    `pred_dir`: same classes, data set and test labels, and only (arm, k, seed) combinations `pred_dir` lacks, so
    seed ranges or arms run separately are scored together. With a `tag`, the run's arms are added as
    '<tag>.<arm>' (e.g. the transfer arm of another backbone beside this one's). `other_val`: that run's validation
    predictions, copied beside `pred_dir`'s. Returns the number of runs added."""
    index = json.loads((pred_dir / "index.json").read_text())
    extra = json.loads((other / "index.json").read_text())
    prefix = f"{tag}." if tag else ""  # a tagged run's arms and files become '<tag>.<arm>', '<tag>.<file>'
    files = {prefix + r["file"]: r["file"] for r in extra["runs"]}  # merged name -> its name in `other`
    extra["runs"] = [r | {"arm": tagged_arm(tag, r["arm"]), "file": prefix + r["file"]} for r in extra["runs"]]
    extra["arms"] = [tagged_arm(tag, a) for a in extra["arms"]]
    for key in ("class_names", "dataset", "source"):
        if extra.get(key) != index.get(key):
            raise DataError(f"evaluate.merge_runs: {source} has {key} {extra.get(key)!r}, the finetune run has "
                            f"{index.get(key)!r}; merge only runs of the same target data")
    have = {(r["arm"], r["k"], r["seed"]) for r in index["runs"]}
    dup = sorted({(r["arm"], r["k"], r["seed"]) for r in extra["runs"]} & have)
    if dup:
        raise DataError(f"evaluate.merge_runs: {source} repeats (arm, k, seed) {dup[:5]} of the finetune run; merge "
                        f"runs of other seeds (finetune.first_seed) or other arms only, or tag the run "
                        f"('<tag>=<run id>') to score its arms under other names")
    labels = pd.read_csv(pred_dir / index["runs"][0]["file"])["label"] if index["runs"] else None
    for r in extra["runs"]:
        df = pd.read_csv(other / files[r["file"]])
        if labels is not None and not df["label"].equals(labels):
            raise DataError(f"evaluate.merge_runs: {files[r['file']]} of {source} scores other test images than the "
                            f"finetune run; merge only runs of the same target split")
        shutil.copy(other / files[r["file"]], pred_dir / r["file"])
        if other_val is not None and (other_val / files[r["file"]]).is_file():
            shutil.copy(other_val / files[r["file"]], val_dir(pred_dir) / r["file"])
        index["runs"].append(r)
    index["arms"] += [a for a in extra["arms"] if a not in index["arms"]]
    seeds = sorted({r["seed"] for r in index["runs"]})
    index |= {"shots": sorted({r["k"] for r in index["runs"]}), "seeds": len(seeds), "first_seed": seeds[0]}
    index["merged_from"] = index.get("merged_from", []) + [source]
    (pred_dir / "index.json").write_text(json.dumps(index, indent=1))
    return len(extra["runs"])


def compute_results(pred_dir: Path, ev_bootstrap: int = 1000, ci: float = 0.95, reference: str = "transfer"
                    ) -> dict:
    """results.json content: one row per (arm, k, seed), aggregates per (arm, k), paired comparisons."""
    index = json.loads((pred_dir / "index.json").read_text())
    classes = index["class_names"]
    rows = []
    for r in index["runs"]:
        y, prob = read_predictions(pred_dir / r["file"], classes)
        m = classification_metrics(y, prob)
        b = bootstrap_ci(y, prob, ev_bootstrap, ci, seed=r["seed"]) if ev_bootstrap else {}
        rows.append({"arm": r["arm"], "k": r["k"], "seed": r["seed"], **m,
                     **{f"{name}_ci": list(v) for name, v in b.items()},
                     "best_val_auc": r.get("best_val_auc"), "file": r["file"]})
    df = pd.DataFrame(rows)
    agg = []
    for (arm, k), g in df.groupby(["arm", "k"], sort=False):
        a = {"arm": arm, "k": int(k), "n_seeds": len(g)}
        for name in METRICS:
            mu, lo, hi = mean_ci(g[name].to_numpy(), ci)
            a |= {name: mu, f"{name}_ci": [max(lo, 0.0), min(hi, 1.0)]}  # nan stays nan; metrics live in [0, 1]
        agg.append(a)
    comps = []
    if reference in set(df["arm"]):
        for arm in [a for a in index["arms"] if a != reference]:
            for k in sorted(set(df["k"])):
                a = df[(df.arm == arm) & (df.k == k)].sort_values("seed")
                b = df[(df.arm == reference) & (df.k == k)].sort_values("seed")
                if len(a) and list(a.seed) == list(b.seed):
                    comps.append({"arm": arm, "reference": reference, "k": int(k), "metric": "auc",
                                  **paired_comparison(a.auc.to_numpy(), b.auc.to_numpy(), ci)})
            a = df[df.arm == arm].sort_values(["k", "seed"])
            b = df[df.arm == reference].sort_values(["k", "seed"])
            if len(a) and list(zip(a.k, a.seed)) == list(zip(b.k, b.seed)):
                comps.append({"arm": arm, "reference": reference, "k": "all", "metric": "auc",
                              **paired_comparison(a.auc.to_numpy(), b.auc.to_numpy(), ci)})
    return {"class_names": classes, "dataset": index["dataset"], "arms": index["arms"], "ci": ci,
            "bootstrap": ev_bootstrap, "rows": rows, "aggregates": agg, "comparisons": comps}


def add_operating_points(selection: dict, index: dict, val: Path, rule: str) -> None:
    """For a two-class target, each chosen candidate's decision threshold per seed, picked on its validation
    predictions by `rule` (`operating_threshold`), into `selection` (what `chosen_results` scores on test)."""
    if len(index["class_names"]) != 2:
        return
    for key, sel in selection.items():
        files = {r["seed"]: r["file"] for r in index["runs"] if r["arm"] == sel["chosen"] and f"k{r['k']}" == key}
        thresholds = {}
        for seed in sel["seeds"]:
            df = pd.read_csv(val / files[seed])
            thresholds[str(seed)] = operating_threshold(df["label"].to_numpy(), df.iloc[:, 3].to_numpy(float), rule)
        sel["operating_point"] = {"rule": rule, "thresholds": thresholds}


def _clipped(m_lo_hi: tuple[float, float, float]) -> list[float]:
    m, lo, hi = m_lo_hi
    return [m, max(lo, 0.0), min(hi, 1.0)]  # nan stays nan; proportions live in [0, 1]


def chosen_results(selection: dict, index: dict, pred_dir: Path, res: dict, ci: float = 0.95) -> dict[str, dict]:
    """Test figures of each k's chosen candidate (read after the choice): its AUC with the across-seed CI, and, at
    its validation-chosen threshold, test sensitivity and specificity with CIs beside the 0.5-threshold ones."""
    out = {}
    for key, sel in selection.items():
        k, arm = int(key[1:]), sel["chosen"]
        agg = next(a for a in res["aggregates"] if a["arm"] == arm and a["k"] == k)
        row = {"arm": arm, "n_seeds": agg["n_seeds"], "auc": [agg["auc"], *agg["auc_ci"]],
               "sensitivity_0.5": [agg["sensitivity"], *agg["sensitivity_ci"]],
               "specificity_0.5": [agg["specificity"], *agg["specificity_ci"]]}
        op = sel.get("operating_point")
        if op:
            files = {r["seed"]: r["file"] for r in index["runs"] if r["arm"] == arm and r["k"] == k}
            sens, spec = [], []
            for seed, t in op["thresholds"].items():
                df = pd.read_csv(pred_dir / files[int(seed)])
                y, pred = df["label"].to_numpy(), (df.iloc[:, 3].to_numpy(float) >= t).astype(int)
                sens.append(float(np.mean(pred[y == 1] == 1)))
                spec.append(float(np.mean(pred[y == 0] == 0)))
            row |= {"rule": op["rule"], "sensitivity_op": _clipped(mean_ci(sens, ci)),
                    "specificity_op": _clipped(mean_ci(spec, ci))}
        out[key] = row
    return out


def _fmt(x: float, lo: float, hi: float) -> str:
    return f"{x:.3f}" if math.isnan(lo) else f"{x:.3f} [{lo:.3f}, {hi:.3f}]"


def write_report(res: dict, cfg_dict: dict, out: Path) -> str:
    lines = [f"# Few-shot results on {res['dataset']}", "",
             f"Classes: {', '.join(res['class_names'])}. Mean over seeds with {int(res['ci'] * 100)}% t-interval "
             f"(seeds = paired k-shot subsets; every arm sees the same images).", ""]
    if res.get("chosen"):
        sel = res["selection"]
        lines += ["## Chosen on validation", "",
                  "The candidate with the best mean validation score per k (rule fixed in the config before the run; "
                  "`selection.json`), then scored once on test. Sensitivity and specificity at the decision threshold "
                  "chosen on validation (operating point) beside those at 0.5.", "",
                  "| k/class | chosen | validation score | seeds | test AUC | sensitivity / specificity at the "
                  "operating point | at 0.5 |", "|---:|---|---|---:|---|---|---|"]
        for key, c in res["chosen"].items():
            s = sel[key]
            op = (f"{_fmt(*c['sensitivity_op'])} / {_fmt(*c['specificity_op'])} ({c['rule']})"
                  if "sensitivity_op" in c else "-")
            lines.append(f"| {key[1:]} | {c['arm']} | {s['metric']} {s['scores'][c['arm']]:.4f} | {c['n_seeds']} | "
                         f"{_fmt(*c['auc'])} | {op} | {_fmt(*c['sensitivity_0.5'])} / {_fmt(*c['specificity_0.5'])} |")
        lines.append("")
    lines += ["## Every arm", "",
             "| arm | k/class | seeds | AUC | accuracy | sensitivity | specificity |",
             "|---|---:|---:|---|---|---|---|"]
    for a in sorted(res["aggregates"], key=lambda a: (a["k"], res["arms"].index(a["arm"]))):
        lines.append(f"| {a['arm']} | {a['k']} | {a['n_seeds']} | {_fmt(a['auc'], *a['auc_ci'])} | "
                     f"{_fmt(a['accuracy'], *a['accuracy_ci'])} | {_fmt(a['sensitivity'], *a['sensitivity_ci'])} | "
                     f"{_fmt(a['specificity'], *a['specificity_ci'])} |")
    if res["comparisons"]:
        lines += ["", "## Paired comparison of AUC against the reference arm", "",
                  "| arm | reference | k | n | mean difference [CI] | Cohen's d_z | Wilcoxon p |",
                  "|---|---|---|---:|---|---:|---:|"]
        for c in res["comparisons"]:
            lines.append(f"| {c['arm']} | {c['reference']} | {c['k']} | {c['n']} | "
                         f"{_fmt(c['mean_diff'], c['ci_low'], c['ci_high'])} | {c['cohens_dz']:.2f} | "
                         f"{c['wilcoxon_p']:.3g} |")
    lines += ["", "Per-run bootstrap CIs and all metrics are in `results.json`; predictions in `predictions/`.",
              "", "## Config", "", "```yaml", yaml.safe_dump(cfg_dict, sort_keys=False).rstrip(), "```", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def make_plots(res: dict, pred_dir: Path, out: Path) -> list[Path]:
    paths = []
    agg = pd.DataFrame(res["aggregates"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in res["arms"]:
        g = agg[agg.arm == arm].sort_values("k")
        if not len(g):
            continue
        ax.plot(g.k, g.auc, marker="o", label=arm)
        lo = np.array([c[0] for c in g.auc_ci], float)
        hi = np.array([c[1] for c in g.auc_ci], float)
        if not np.isnan(lo).all():
            ax.fill_between(g.k, lo, hi, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("labelled images per class (k)")
    ax.set_ylabel("test ROC AUC")
    ax.set_title(f"Data efficiency on {res['dataset']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out / "auc_vs_k.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    classes = res["class_names"]
    rows = pd.DataFrame(res["rows"])
    ks = sorted(set(rows.k))
    fig, axes = plt.subplots(1, len(ks), figsize=(4 * len(ks), 4), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for i, arm in enumerate(res["arms"]):
            for j, r in enumerate(rows[(rows.arm == arm) & (rows.k == k)].itertuples()):
                y, prob = read_predictions(pred_dir / r.file, classes)
                if len(classes) == 2:
                    fpr, tpr, _ = roc_curve(y, prob[:, 1])
                else:  # micro-average one-vs-rest
                    onehot = np.eye(len(classes))[y]
                    fpr, tpr, _ = roc_curve(onehot.ravel(), prob.ravel())
                ax.plot(fpr, tpr, color=f"C{i}", alpha=0.5, label=arm if j == 0 else None)
        ax.plot([0, 1], [0, 1], "k--", lw=0.5)
        ax.set_title(f"ROC, k={k} (one line per seed)")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.legend(loc="lower right")
    fig.tight_layout()
    paths.append(out / "roc_curves.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    k = max(ks)
    fig, axes = plt.subplots(1, len(res["arms"]), figsize=(3.5 * len(res["arms"]), 3.5), squeeze=False)
    for ax, arm in zip(axes[0], res["arms"]):
        cm = np.zeros((len(classes), len(classes)), int)
        for r in rows[(rows.arm == arm) & (rows.k == k)].itertuples():
            y, prob = read_predictions(pred_dir / r.file, classes)
            cm += confusion_matrix(y, prob.argmax(1), labels=list(range(len(classes))))
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center")
        ax.set_xticks(range(len(classes)), classes, rotation=45)
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{arm}, k={k} (all seeds)")
    fig.tight_layout()
    paths.append(out / "confusion_matrices.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def summary_metrics(res: dict) -> dict[str, float]:
    """Names that line arms up in the MLflow compare view, e.g. auc_k20_transfer."""
    out = {}
    for a in res["aggregates"]:
        for m in ("auc", "accuracy"):
            out[f"{m}_k{a['k']}_{mlflow_key(a['arm'])}"] = a[m]
    for key, c in res.get("chosen", {}).items():
        out[f"auc_{key}_chosen"] = c["auc"][0]
        if not math.isnan(c["auc"][1]):
            out |= {f"auc_{key}_chosen_ci_low": c["auc"][1], f"auc_{key}_chosen_ci_high": c["auc"][2]}
    return out


def evaluate_predictions(pred_dir: Path, ev: EvaluateConfig, merges: list[tuple[Path, Path | None, str, str]] = (),
                         source: str = "") -> dict:
    """The evaluate stage's work on downloaded predictions (`pred_dir`, validation ones beside it): merge further
    runs (folder, its validation folder, run name, tag), add the ensembles, choose a candidate per k on validation
    only, then score the test split: `results.json` content with `selection` (what `selection.json` holds) and
    `chosen` (the chosen candidates' test figures)."""
    for other, other_val, name, tag in merges:
        merge_predictions(pred_dir, other, source=name, tag=tag, other_val=other_val)
    if ev.ensemble:
        add_ensemble(pred_dir, source=source)
    for spec in ev.ensembles:
        name, members = parse_ensemble(spec)
        add_ensemble(pred_dir, name, source=source, members=members)
    index = json.loads((pred_dir / "index.json").read_text())
    unknown = [c for c in ev.candidates if c not in index["arms"]]
    if unknown:
        raise DataError(f"evaluate.candidates: {unknown} are not arms or ensembles of {source or pred_dir} "
                        f"(there: {index['arms']})")
    # the choice, from validation predictions alone, before any test prediction is read
    selection = choose_candidates(index, val_dir(pred_dir), ev.candidates or index["arms"], ev.selection_metric)
    add_operating_points(selection, index, val_dir(pred_dir), ev.operating_point)
    res = compute_results(pred_dir, ev.bootstrap, ev.ci, ev.reference_arm)
    return res | {"selection": selection, "chosen": chosen_results(selection, index, pred_dir, res, ev.ci)}
