"""The finetune stage's sweep plan: seed ranges (finetune.first_seed) and the per-seed subsets they rely on."""
import numpy as np

from pipeline.config import FinetuneConfig
from stages.finetune import job_subsets, plan_jobs


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
