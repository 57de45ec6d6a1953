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
