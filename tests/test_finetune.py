"""The finetune stage's sweep plan: seed ranges (finetune.first_seed), the per-seed subsets they rely on, and
replica arms (`<arm>.r<n>`): the same subsets, another training seed."""
import numpy as np
import pytest
import torch

from pipeline.config import FinetuneConfig
from pipeline.finetune import build_arm_model, build_job_transform, job_seed, job_subsets, plan_jobs, queue_order


def test_a_later_seed_range_plans_exactly_the_missing_jobs():
    arms = ["transfer", "meta-reptile"]
    full = plan_jobs(FinetuneConfig(shots=[5, 20], seeds=5), arms)
    first = plan_jobs(FinetuneConfig(shots=[5, 20], seeds=3), arms)
    later = plan_jobs(FinetuneConfig(shots=[5, 20], seeds=2, first_seed=3), arms)
    assert len(full) == 2 * 5 * 2 and {s for _, s, _ in later} == {3, 4}
    assert sorted(first + later) == sorted(full) and not set(first) & set(later)


def test_subsets_depend_only_on_the_seed_number():
    rng = np.random.default_rng(0)
    tr, va = rng.integers(0, 2, 300), rng.integers(0, 2, 120)
    a = job_subsets(tr, va, 20, 10, 0, 3, "synthetic")
    b = job_subsets(tr, va, 20, 10, 0, 3, "synthetic")
    c = job_subsets(tr, va, 20, 10, 0, 2, "synthetic")
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    assert a[0] != c[0] and not np.array_equal(a[1], c[1])
    assert len(a[1]) == 40 and set(np.bincount(tr[a[1]])) == {20}


def test_a_replica_trains_with_another_seed_on_the_same_subsets():
    assert job_seed(3, 0) == 3  # the arm itself keeps the split seed: earlier runs reproduce
    seeds = {job_seed(s, r) for s in (0, 1, 1000) for r in (1, 2)}
    assert len(seeds) == 6 and not seeds & {0, 1, 1000}
    assert job_seed(1, 1) == job_seed(1, 1)
    a, b = (build_arm_model(None, "tf_efficientnet_lite0", 2, job_seed(5, r)) for r in (0, 1))
    again = build_arm_model(None, "tf_efficientnet_lite0", 2, job_seed(5, 1))
    wa, wb, wc = (m.get_classifier().weight for m in (a, b, again))
    assert not torch.equal(wa, wb) and torch.equal(wb, wc)  # another initialisation, reproducible
    img = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    dinfo = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    ft = FinetuneConfig()
    ta, tb = (build_job_transform(ft, 32, dinfo, job_seed(5, r)) for r in (0, 1))
    assert not torch.equal(ta(img), tb(img))  # other augmentation draws


def test_queue_order_takes_every_job_once_largest_k_first():
    """torchrun ranks take jobs in this order: each job once, the costliest (largest k) first so that the sweep does
    not end on one slow job; within a k, arm by arm and seed by seed."""
    ft = FinetuneConfig(shots=[5, 20, 10], seeds=3, first_seed=3)
    jobs = plan_jobs(ft, ["transfer", "meta", "scratch"])
    order = queue_order(jobs)
    assert sorted(order) == sorted(jobs) and len(set(order)) == len(jobs)
    assert [j.k for j in order] == [20] * 9 + [10] * 9 + [5] * 9
    assert [(j.arm, j.seed) for j in order[:4]] == [("meta", 3), ("meta", 4), ("meta", 5), ("scratch", 3)]


class Interrupt(Exception):
    """Stands in for a kill at the end of an epoch's curve point (before that epoch's progress is saved)."""


def resume_setup(real_data, tmp_path):
    from pipeline.backbone import create_backbone, load_checkpoint, save_checkpoint
    from pipeline.config import load_config
    from pipeline.data import load_target
    from pipeline.finetune import Arm, prepare_inputs
    cfg = load_config(None, [f"data.root={real_data}", "finetune.image_size=32", "finetune.val_per_class=10",
                             "finetune.shots=[5]", "finetune.epochs=3", "finetune.warmup_epochs=1",
                             "finetune.patience=3", "finetune.pseudo_per_class=4", "finetune.pseudo_pool=40",
                             "finetune.pseudo_rounds=2", "finetune.pseudo_epochs=3",
                             "finetune.pseudo_warmup_epochs=1", "finetune.pseudo_augment=strong",
                             "finetune.min_steps_per_epoch=1"])
    model, _, _ = create_backbone("tf_efficientnet_lite0", num_classes=2)
    save_checkpoint(tmp_path / "backbone.pt", model, "tf_efficientnet_lite0")
    ckpt = load_checkpoint(tmp_path / "backbone.pt")
    return cfg.finetune, prepare_inputs(cfg, load_target(cfg), ckpt), Arm(ckpt, 0, "tf_efficientnet_lite0")


@pytest.mark.parametrize("stop_at", [1, 4, 7])  # mid fine-tune; mid round 1 (fine-tune saved); mid round 2
def test_a_job_cut_off_mid_way_continues_to_the_uninterrupted_result(real_data, tmp_path, stop_at):
    """A self-trained job (fine-tune, then two student rounds of 3 epochs each) stopped after `stop_at` epochs in
    all continues from its saved progress to bit-identical final weights, test probabilities and curves; the epochs
    done before are passed to `on_epoch` again, and the new attempt trains only the epochs left."""
    from pipeline.finetune import Job, train_job
    from pipeline.job_state import JobState
    ft, data, arm = resume_setup(real_data, tmp_path)
    job, cpu = Job(5, 0, "transfer"), torch.device("cpu")
    full_curve = []
    full = train_job(data, ft, job, arm, 0, cpu, on_epoch=lambda e, r: full_curve.append((e, r)))
    assert len(full_curve) == 9 and [e for e, _ in full_curve] == list(range(9))

    path = tmp_path / "state" / "job.pt"

    def stop(e, r):
        if e == stop_at:
            raise Interrupt
    with pytest.raises(Interrupt):
        train_job(data, ft, job, arm, 0, cpu, on_epoch=stop, state=JobState(path, every_s=0))
    assert path.exists()
    saved = torch.load(path, weights_only=False)
    assert (saved["done"] or {}).get("phase", -1) == stop_at // 3 - 1 and saved["fit"]["epoch"] == stop_at % 3

    curve, trained = [], []
    again = train_job(data, ft, job, arm, 0, cpu, on_epoch=lambda e, r: curve.append((e, r)),
                      state=JobState(path, every_s=0))
    assert curve == full_curve
    assert again.extra.pop("resumed_epochs") == stop_at  # the epochs before `stop_at` were not trained again
    sd_full, sd_again = full.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(sd_full[k], sd_again[k]) for k in sd_full)
    assert np.array_equal(full.prob, again.prob) and full.extra == again.extra


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt, "KILLED"), (ValueError, "FAILED")])
def test_a_job_run_cut_off_by_ctrl_c_or_sigterm_ends_killed(store, error, status):
    """A job's nested run ends as its stage run does: KILLED for Ctrl-C/SIGTERM (KeyboardInterrupt here), FAILED for an
    error (MLflow's own `with start_run()` ends both FAILED)."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from pipeline.finetune import Job
    from pipeline.finetune_runs import job_run
    mlflow.set_tracking_uri(store)
    with mlflow.start_run(run_name="stage"):
        with pytest.raises(error):
            with job_run(Job(5, 0, "transfer"), "tf_efficientnet_lite0", "kermany", "key") as run:
                raise error
        assert mlflow.active_run().info.run_name == "stage"  # the stage run is active again
    assert MlflowClient(store).get_run(run.info.run_id).info.status == status
