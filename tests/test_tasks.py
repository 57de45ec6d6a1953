import numpy as np
import pytest
import torch

from pipeline.data import DataError, LabeledData, Split
from pipeline.tasks import EpisodeSampler, split_classes
from pipeline.transforms import build_transform


def fake_pool():
    rng = np.random.default_rng(0)
    pool = []
    for name, n_cls in (("a", 3), ("b", 4), ("c", 2)):
        splits = {}
        for s, n in (("train", 12), ("val", 6), ("test", 2)):
            labels = np.repeat(np.arange(n_cls), n)
            # pixel value encodes (set, split, index) so tests can tell images apart
            imgs = rng.integers(0, 255, (len(labels), 8, 8, 3), dtype=np.uint8)
            splits[s] = Split(imgs, labels)
        pool.append(LabeledData(name, name, [str(i) for i in range(n_cls)], splits))
    return pool


def sampler(pool, split="train", mode="within", seed=0, ways=3, classes=None):
    return EpisodeSampler(pool, split, ways, 2, 3, build_transform(8, (0.5,) * 3, (0.5,) * 3, False), mode, seed,
                          classes)


def test_episodes_are_seeded_by_index_and_shaped():
    pool = fake_pool()
    s = sampler(pool)
    xs, ys, xq, yq = s.episode(5)
    assert xs.shape == (6, 3, 8, 8) and xq.shape == (9, 3, 8, 8)
    assert ys.tolist() == [0, 0, 1, 1, 2, 2] and yq.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert torch.equal(xs, sampler(pool).episode(5)[0])
    assert not torch.equal(xs, s.episode(6)[0])
    b = s.batch(0, 4)
    assert b.xs.shape == (4, 6, 3, 8, 8) and torch.equal(b.xs[2], s.episode(2)[0])


def test_within_mode_uses_one_data_set_and_skips_small_ones():
    s = sampler(fake_pool(), ways=3)
    assert all(len({d for d, _ in g}) == 1 for g in s.groups)
    assert {g[0][0] for g in s.groups} == {0, 1}  # set "c" has only 2 classes
    with pytest.raises(DataError, match="no 5-way task"):
        sampler(fake_pool(), ways=5)
    assert sampler(fake_pool(), ways=5, mode="across").episode(0)[0].shape[0] == 10


def test_support_and_query_are_disjoint_and_splits_do_not_mix():
    pool = fake_pool()
    def key(t):
        return t.numpy().tobytes()
    train_images = {key(sampler(pool).transform(im)) for d in pool for im in d.splits["train"].images}
    for i in range(10):
        xs, _, xq, _ = sampler(pool, "val").episode(i)
        keys = [key(x) for x in torch.cat([xs, xq])]
        assert len(set(keys)) == len(keys)  # no image twice in a task
        assert not set(keys) & train_images  # meta-val never sees meta-train images


def test_disjoint_classes():
    pool = fake_pool()
    tr, va = split_classes(pool, 0.5, 0)
    assert not tr & va and va
    s = sampler(pool, "val", mode="across", ways=2, classes=va)
    assert set(s.index) <= va
