"""The servable best model: one MLflow pyfunc that holds the chosen candidate's members (one for an arm, several for
an ensemble), each with its own preprocessing, returns the mean of their class probabilities, and the class at the
decision threshold chosen on validation. Registered as `<finetune.registry_name>-best`."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd

SERVING_FILE = "serving.json"


class MeanOfMembers(mlflow.pyfunc.PythonModel):
    """Input: a list of image file paths. Output: one row per image with
    `prob_<class>` (the mean of the members' probabilities, each member with its own preprocessing and flip TTA)
    and `predicted` (for two classes: the positive class when its probability reaches the stored threshold)."""

    def load_context(self, context) -> None:
        from .predict import load_model
        self.serving = json.loads(Path(context.artifacts["serving"]).read_text())
        self.members = [load_model(context.artifacts[f"member{i}"]) for i in range(len(self.serving["members"]))]

    def predict(self, context, model_input: list[str], params=None) -> pd.DataFrame:
        from .predict import predict_files
        prob = np.mean([predict_files(m, spec, [Path(p) for p in model_input]) for m, spec in self.members], axis=0)
        return probability_frame(prob, self.serving)


def probability_frame(prob: np.ndarray, serving: dict) -> pd.DataFrame:
    """`prob_<class>` columns and the class `predicted` at the serving threshold (argmax for more classes)."""
    names = serving["class_names"]
    df = pd.DataFrame(prob, columns=[f"prob_{c}" for c in names])
    t = serving.get("threshold")
    pred = (prob[:, 1] >= t).astype(int) if t is not None and len(names) == 2 else prob.argmax(1)
    df["predicted"] = [names[i] for i in pred]
    return df


def log_best(members: list[str], serving: dict, work: Path, name: str) -> str:
    """Log the pyfunc of `members` (logged model URIs) with `serving` (class names, threshold, how it was chosen)
    into the active run; returns the model URI."""
    work.mkdir(parents=True, exist_ok=True)
    (work / SERVING_FILE).write_text(json.dumps(serving, indent=1))
    artifacts = {"serving": str(work / SERVING_FILE)}
    for i, uri in enumerate(members):
        artifacts[f"member{i}"] = mlflow.artifacts.download_artifacts(artifact_uri=uri,
                                                                      dst_path=str(work / f"member{i}"))
    info = mlflow.pyfunc.log_model(name=name, python_model=MeanOfMembers(), artifacts=artifacts,
                                   code_paths=[str(Path(__file__).resolve().parent)], pip_requirements=_requirements())
    return info.model_uri


def _requirements() -> list[str]:
    import timm
    import torch
    return [f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}", f"mlflow=={mlflow.__version__}"]


def register_best(res: dict, index: dict, val_dir: Path, registry: str, work: Path) -> dict[str, str]:
    """For each k, register the chosen candidate (`res["selection"]`) as `<registry>-best`: its models of the seed
    with the best validation score, as one `MeanOfMembers`, with that seed's validation-chosen threshold. Version
    tags: k, candidate, seed, selection rule and validation score, threshold, test AUC. Returns
    {'model.best_k<k>': 'models:/<registry>-best/<version>'}; a candidate whose models were not logged is skipped."""
    from mlflow.tracking import MlflowClient

    from .selection import score
    client, out = MlflowClient(), {}
    by = {(r["arm"], r["k"], r["seed"]): r for r in index["runs"]}
    for key, sel in res["selection"].items():
        k, cand = int(key[1:]), sel["chosen"]

        def val_score(seed: int) -> float:
            df = pd.read_csv(val_dir / by[(cand, k, seed)]["file"])
            return score(df["label"].to_numpy(), df.iloc[:, 2:].to_numpy(float), sel["metric"])
        scores = {s: val_score(s) for s in sel["seeds"]}
        seed = (min if sel["metric"] == "log_loss" else max)(sel["seeds"], key=lambda s: scores[s])
        entry = by[(cand, k, seed)]
        members = [by[(m, k, seed)] for m in entry.get("members", [cand])]
        if not all(m.get("model_uri") for m in members):
            print(f"[evaluate] {cand} (k={k}) has no logged models (finetune.log_models); nothing registered",
                  flush=True)
            continue
        op = sel.get("operating_point", {})
        serving = {"class_names": index["class_names"], "candidate": cand, "k": k, "seed": seed,
                   "members": [m["arm"] for m in members], "threshold": op.get("thresholds", {}).get(str(seed)),
                   "rule": op.get("rule", "argmax"), "selection_metric": sel["metric"],
                   "validation_score": scores[seed]}
        uri = log_best([m["model_uri"] for m in members], serving, work / key, f"best_{key}")
        mv = mlflow.register_model(uri, f"{registry}-best")
        test_auc = res["chosen"][key]["auc"][0]
        seed_auc = next(r["auc"] for r in res["rows"] if (r["arm"], r["k"], r["seed"]) == (cand, k, seed))
        tags = {"k": k, "candidate": cand, "members": "+".join(serving["members"]), "seed": seed,
                "selection_metric": sel["metric"],
                "validation_score": f"{scores[seed]:.6f}", "threshold": serving["threshold"], "rule": serving["rule"],
                "test_auc_mean_over_seeds": f"{test_auc:.6f}",
                "test_auc": f"{seed_auc:.6f}"}
        for t, v in tags.items():
            client.set_model_version_tag(mv.name, mv.version, t, str(v))
        out[f"model.best_{key}"] = f"models:/{mv.name}/{mv.version}"
        print(f"[evaluate] registered {out[f'model.best_{key}']}: {cand}, k={k}, seed {seed}, validation "
              f"{sel['metric']} {scores[seed]:.4f}, threshold {serving['threshold']}", flush=True)
    return out
