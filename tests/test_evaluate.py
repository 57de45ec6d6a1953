"""The evaluate stage's ensemble arms and merging of finetune runs on synthetic prediction files (the real-data path
is in test_pipeline)."""
import json

import numpy as np
import pandas as pd
import pytest

from pipeline.data import DataError
from pipeline.metrics import classification_metrics
from pipeline.evaluate import add_ensemble, compute_results, merge_predictions


def write_preds(d, arms, ks=(5, 20), seeds=(0, 1), n=40, skip=()):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    runs = []
    for arm in arms:
        for k in ks:
            for s in seeds:
                if (arm, k, s) in skip:
                    continue
                p1 = np.clip(0.5 * y + rng.uniform(0, 0.5, n), 0, 1)  # informative, different per model
                f = f"{arm}_k{k}_seed{s}.csv"
                pd.DataFrame({"index": np.arange(n), "label": y, "prob_0": 1 - p1, "prob_1": p1}).to_csv(
                    d / f, index=False)
                runs.append({"arm": arm, "k": k, "seed": s, "file": f, "best_val_auc": 0.9})
    (d / "index.json").write_text(json.dumps({"class_names": ["0", "1"], "dataset": "synthetic", "arms": list(arms),
                                              "runs": runs}))


def test_ensemble_is_the_mean_of_the_pretrained_arms_and_scored_like_an_arm(tmp_path):
    write_preds(tmp_path, ["scratch", "transfer", "meta-maml", "meta-reptile"], skip={("meta-maml", 20, 1)})
    assert add_ensemble(tmp_path) == 3  # (20, 1) lacks a member, so it gets no ensemble row
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["arms"][-1] == "ensemble"
    ens = pd.read_csv(tmp_path / "ensemble_k5_seed1.csv")
    members = [pd.read_csv(tmp_path / f"{a}_k5_seed1.csv") for a in ("transfer", "meta-maml", "meta-reptile")]
    np.testing.assert_allclose(ens[["prob_0", "prob_1"]], np.mean([m[["prob_0", "prob_1"]] for m in members], 0))
    scratch = pd.read_csv(tmp_path / "scratch_k5_seed1.csv")
    assert not np.allclose(ens.prob_1, np.mean([m.prob_1 for m in [*members, scratch]], 0))  # scratch is left out
    assert not (tmp_path / "ensemble_k20_seed1.csv").exists()
    res = compute_results(tmp_path, ev_bootstrap=0)
    row = next(r for r in res["rows"] if r["arm"] == "ensemble" and r["k"] == 5 and r["seed"] == 1)
    assert row["auc"] == pytest.approx(classification_metrics(ens.label.to_numpy(), ens[["prob_0", "prob_1"]]
                                                              .to_numpy())["auc"])
    assert any(c["arm"] == "ensemble" and c["k"] == 5 for c in res["comparisons"])  # paired against transfer
    assert add_ensemble(tmp_path) == 0  # idempotent: a second call adds nothing


def test_no_ensemble_with_one_pretrained_arm(tmp_path):
    write_preds(tmp_path, ["scratch", "transfer"])
    assert add_ensemble(tmp_path) == 0
    assert json.loads((tmp_path / "index.json").read_text())["arms"] == ["scratch", "transfer"]


def test_members_predicting_different_images_are_refused(tmp_path):
    write_preds(tmp_path, ["transfer", "meta-reptile"])
    f = tmp_path / "meta-reptile_k5_seed0.csv"
    df = pd.read_csv(f)
    df.loc[0, "label"] = 1 - df.loc[0, "label"]
    df.to_csv(f, index=False)
    with pytest.raises(DataError, match="meta-reptile_k5_seed0.csv"):
        add_ensemble(tmp_path)


def test_named_ensembles_and_replicas(tmp_path):
    write_preds(tmp_path, ["transfer", "meta-reptile", "transfer.r1"])
    assert add_ensemble(tmp_path) == 4  # the default ensemble leaves the replica out ...
    ens = pd.read_csv(tmp_path / "ensemble_k5_seed0.csv")
    t, m, t1 = (pd.read_csv(tmp_path / f"{a}_k5_seed0.csv") for a in ("transfer", "meta-reptile", "transfer.r1"))
    np.testing.assert_allclose(ens.prob_1, (t.prob_1 + m.prob_1) / 2)
    assert add_ensemble(tmp_path, "two-transfer", members=["transfer", "transfer.r1"]) == 4  # ... a named one has it
    two = pd.read_csv(tmp_path / "two-transfer_k5_seed0.csv")
    np.testing.assert_allclose(two.prob_1, (t.prob_1 + t1.prob_1) / 2)
    res = compute_results(tmp_path, ev_bootstrap=0, reference="two-transfer")  # ensemble against the control
    assert {c["arm"] for c in res["comparisons"]} == {"transfer", "meta-reptile", "transfer.r1", "ensemble"}
    with pytest.raises(DataError, match="already an arm"):
        add_ensemble(tmp_path, "transfer", members=["transfer", "meta-reptile"])
    with pytest.raises(DataError, match=r"names \['meta-maml'\]"):
        add_ensemble(tmp_path, "x", members=["transfer", "meta-maml"])


def test_merging_a_later_seed_range_scores_all_seeds_together(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    write_preds(a, ["transfer", "meta-reptile"], seeds=(0, 1, 2))
    write_preds(b, ["transfer", "meta-reptile"], seeds=(3, 4))
    write_preds(c, ["transfer"], seeds=(2,))
    assert merge_predictions(a, b, "run b") == 8
    index = json.loads((a / "index.json").read_text())
    assert index["seeds"] == 5 and index["merged_from"] == ["run b"] and index["shots"] == [5, 20]
    assert add_ensemble(a) == 10
    res = compute_results(a, ev_bootstrap=0)
    agg = next(x for x in res["aggregates"] if x["arm"] == "ensemble" and x["k"] == 20)
    assert agg["n_seeds"] == 5
    assert next(x for x in res["comparisons"] if x["arm"] == "ensemble" and x["k"] == "all")["n"] == 10
    with pytest.raises(DataError, match=r"repeats \(arm, k, seed\) \[\('transfer', 5, 2\)"):
        merge_predictions(a, c, "run c")
    d = tmp_path / "d"
    d.mkdir()
    write_preds(d, ["transfer"], seeds=(7,), n=41)
    with pytest.raises(DataError, match="other test images"):
        merge_predictions(a, d, "run d")


def test_a_tagged_run_is_scored_under_its_own_arm_names(tmp_path):
    """`lite2=<run id>`: another backbone's transfer arm joins as `lite2.transfer` beside this run's transfer arm."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
    write_preds(a, ["transfer", "meta-reptile"])
    write_preds(b, ["transfer"])
    other = pd.read_csv(b / "transfer_k5_seed1.csv")
    other[["prob_0", "prob_1"]] = other[["prob_1", "prob_0"]].to_numpy()  # tell the two transfer models apart
    other.to_csv(b / "transfer_k5_seed1.csv", index=False)
    mine = pd.read_csv(a / "transfer_k5_seed1.csv")
    with pytest.raises(DataError, match="tag the run"):
        merge_predictions(a, b, "run b")
    assert merge_predictions(a, b, "run b", tag="lite2") == 4
    index = json.loads((a / "index.json").read_text())
    assert index["arms"] == ["transfer", "meta-reptile", "lite2.transfer"]
    assert {r["file"] for r in index["runs"] if r["arm"] == "lite2.transfer"} == {
        f"lite2.transfer_k{k}_seed{s}.csv" for k in (5, 20) for s in (0, 1)}
    pd.testing.assert_frame_equal(pd.read_csv(a / "lite2.transfer_k5_seed1.csv"), other)
    pd.testing.assert_frame_equal(pd.read_csv(a / "transfer_k5_seed1.csv"), mine)  # not overwritten
    assert add_ensemble(a) == 4  # the default ensemble stays transfer + meta-reptile ...
    m = pd.read_csv(a / "meta-reptile_k5_seed1.csv")
    np.testing.assert_allclose(pd.read_csv(a / "ensemble_k5_seed1.csv").prob_1, (mine.prob_1 + m.prob_1) / 2)
    assert add_ensemble(a, "ensemble-lite", members=["transfer", "lite2.transfer"]) == 4  # ... a named one mixes
    np.testing.assert_allclose(pd.read_csv(a / "ensemble-lite_k5_seed1.csv").prob_1, (mine.prob_1 + other.prob_1) / 2)
    res = compute_results(a, ev_bootstrap=0)
    assert {c["arm"] for c in res["comparisons"]} == {"meta-reptile", "lite2.transfer", "ensemble", "ensemble-lite"}
    with pytest.raises(DataError, match=r"repeats \(arm, k, seed\) \[\('lite2.transfer'"):
        merge_predictions(a, b, "run b", tag="lite2")


def write_val_and_test(tmp_path, probs_val, probs_test, y_val, y_test):
    """A predictions folder with index.json, test CSVs and validation CSVs beside it (as the finetune stage logs)."""
    pred = tmp_path / "predictions"
    val = tmp_path / "val_predictions"
    pred.mkdir()
    val.mkdir()
    runs = []
    for (arm, k, seed), p in probs_val.items():
        f = f"{arm}_k{k}_seed{seed}.csv"
        for d, prob, y in ((val, p, y_val), (pred, probs_test[(arm, k, seed)], y_test)):
            df = pd.DataFrame({"index": np.arange(len(y)), "label": y, "prob_a": 1 - prob, "prob_b": prob})
            df.to_csv(d / f, index=False)
        runs.append({"arm": arm, "k": k, "seed": seed, "file": f, "best_val_auc": 0.5})
    arms = list(dict.fromkeys(a for a, _, _ in probs_val))
    (pred / "index.json").write_text(json.dumps({"class_names": ["a", "b"], "dataset": "t", "source": "t",
                                                 "arms": arms, "runs": runs}))
    return pred, val


def test_choice_reads_validation_only_and_takes_the_lowest_mean_log_loss(tmp_path):
    from sklearn.metrics import log_loss

    from pipeline.selection import choose_candidates
    y = np.array([0, 0, 1, 1, 0, 1])
    sure = np.array([0.1, 0.2, 0.9, 0.8, 0.1, 0.7])
    timid = np.array([0.4, 0.45, 0.6, 0.55, 0.4, 0.6])
    pv = {("timid", 20, s): timid for s in (0, 1)} | {("sure", 20, s): sure for s in (0, 1)}
    pred, val = write_val_and_test(tmp_path, pv, pv, y, y)
    for f in pred.glob("*.csv"):  # the choice must not read the test split
        f.write_text("not read")
    index = json.loads((pred / "index.json").read_text())
    sel = choose_candidates(index, val, ["timid", "sure"], "log_loss")
    assert sel["k20"]["chosen"] == "sure" and sel["k20"]["seeds"] == [0, 1]
    two = np.stack([1 - sure, sure], 1)
    assert sel["k20"]["scores"]["sure"] == pytest.approx(log_loss(y, two))
    tie = choose_candidates(index, val, ["timid", "sure"], "auc")  # both rank perfectly: the earlier one
    assert tie["k20"]["scores"]["timid"] == tie["k20"]["scores"]["sure"] == 1.0 and tie["k20"]["chosen"] == "timid"


def test_youden_and_sensitivity_thresholds_by_hand():
    from pipeline.selection import operating_threshold
    y = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    p = np.array([0.1, 0.3, 0.35, 0.4, 0.6, 0.7, 0.9, 0.65])
    # thresholds and their sensitivity + specificity - 1: 0.4 -> 1 + 0.75 - 1 = 0.75, the largest
    assert operating_threshold(y, p, "youden") == pytest.approx(0.4)
    t = operating_threshold(y, p, "sensitivity=0.75")  # the highest threshold with 3 of 4 positives found
    assert t == pytest.approx(0.6) and np.mean(p[y == 1] >= t) >= 0.75


def test_evaluate_predictions_chooses_then_scores_the_choice_at_its_threshold(tmp_path):
    from pipeline.config import EvaluateConfig
    from pipeline.evaluate import evaluate_predictions
    rng = np.random.default_rng(0)
    y_val, y_test = rng.integers(0, 2, 60), rng.integers(0, 2, 80)
    noisy = lambda y, s: np.clip(y * 0.6 + 0.2 + rng.normal(0, s, len(y)), 0.01, 0.99)  # noqa: E731
    pv = {(a, 20, s): noisy(y_val, 0.1 if a == "good" else 0.4) for a in ("good", "poor") for s in range(3)}
    pt = {key: noisy(y_test, 0.1 if key[0] == "good" else 0.4) for key in pv}
    pred, _ = write_val_and_test(tmp_path, pv, pt, y_val, y_test)
    res = evaluate_predictions(pred, EvaluateConfig(bootstrap=0, ensemble=False))
    sel, chosen = res["selection"]["k20"], res["chosen"]["k20"]
    assert sel["chosen"] == chosen["arm"] == "good" and set(sel["operating_point"]["thresholds"]) == {"0", "1", "2"}
    for seed, t in sel["operating_point"]["thresholds"].items():
        assert 0.0 < t <= 1.0
    assert 0.9 <= chosen["sensitivity_op"][0] <= 1.0 and 0.9 <= chosen["specificity_op"][0] <= 1.0
    agg = next(a for a in res["aggregates"] if a["arm"] == "good")
    assert chosen["auc"][0] == agg["auc"]
