"""The fine-tuning recipe (`pipeline.train`) on a tiny model and synthetic images: which weights `fit` keeps,
the flip test-time augmentation, and self-training on pseudo-labels."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.config import FinetuneConfig
from pipeline.data import DataError, ImageDataset, Split
from pipeline.train import FlipTTA, fit, log_loss, predict_proba, select_confident, self_train, unlabelled_pool
from pipeline.transforms import build_transform
from pipeline.finetune import student_transform
from tests.tiny import tiny

CPU = torch.device("cpu")


def two_class_images(n: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Class 1 is brighter than class 0: separable, so validation AUC saturates at 1.0 within a few epochs."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = [np.clip(rng.normal(90 + 60 * y, 25, (8, 8, 3)), 0, 255).astype(np.uint8) for y in labels]
    return images, labels


def setup(epochs: int = 8):
    t = build_transform(8, (0.5,) * 3, (0.25,) * 3, train=False)
    tr_img, tr_y = two_class_images(16, 0)
    va_img, va_y = two_class_images(20, 1)
    x_val = torch.stack([t(im) for im in va_img])
    ft = FinetuneConfig(epochs=epochs, warmup_epochs=1, batch_size=8, lr_head=0.05, lr_body=0.02, patience=100,
                        min_steps_per_epoch=2)
    return ImageDataset(tr_img, tr_y, t), x_val, va_y, ft


def run_fit():
    train, x_val, va_y, ft = setup()
    model = tiny(seed=3, dtype=torch.float32, n_classes=2)
    res = fit(model, train, x_val, va_y, ft, CPU, seed=5, head="classifier", n_classes=2)
    return model, res, x_val, va_y


def test_fit_keeps_the_best_auc_epoch_and_breaks_ties_by_validation_loss():
    model, res, x_val, va_y = run_fit()
    keys = [(h["val_auc"], -h["val_loss"]) for h in res.history]
    ties = [h for h in res.history if h["val_auc"] == max(h["val_auc"] for h in res.history)]
    assert len(ties) >= 2  # the tie-break is exercised: several epochs share the best AUC
    assert res.best_epoch == max(range(len(keys)), key=keys.__getitem__)
    assert res.best_val_auc == res.history[res.best_epoch]["val_auc"]
    # the model holds that epoch's weights: its validation loss is reproduced exactly
    assert log_loss(va_y, predict_proba(model, x_val, CPU)) == pytest.approx(res.history[res.best_epoch]["val_loss"])


def test_zero_head_starts_the_fit_at_zero_logits():
    # lr_head 0 and a linear probe only: the head stays where fit put it, so the first epoch's loss shows the start
    train, x_val, va_y, ft = setup(epochs=1)
    ft = replace(ft, lr_head=0.0, warmup_epochs=1)
    for zero in (False, True):
        model = tiny(seed=3, dtype=torch.float32, n_classes=2)
        before = model.classifier.weight.detach().clone()
        res = fit(model, train, x_val, va_y, replace(ft, zero_head=zero), CPU, seed=5, head="classifier",
                  n_classes=2)
        if zero:  # zero logits: balanced cross-entropy is log(2) for every image, whatever the body outputs
            assert torch.count_nonzero(model.classifier.weight) == 0 and torch.count_nonzero(model.classifier.bias) == 0
            assert res.history[0]["train_loss"] == pytest.approx(np.log(2), abs=1e-6)
        else:
            assert torch.equal(model.classifier.weight, before)
            assert abs(res.history[0]["train_loss"] - np.log(2)) > 1e-3


def test_flip_tta_averages_logits_and_is_flip_invariant():
    model = tiny(seed=1, dtype=torch.float64, n_classes=3).eval()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    tta = FlipTTA(model)
    assert torch.allclose(tta(x), 0.5 * (model(x) + model(x.flip(-1))))
    assert torch.allclose(tta(x), tta(x.flip(-1)))
    assert not torch.allclose(model(x), model(x.flip(-1)))  # the model alone is not flip invariant
    p = predict_proba(model, x, CPU, tta=True)
    assert np.allclose(p, tta(x).softmax(-1).detach().numpy(), atol=1e-6)


def test_hflip_is_only_in_the_train_transform_when_asked():
    def names(**kw):
        return [type(t).__name__ for t in build_transform(16, (0.5,) * 3, (0.5,) * 3, **kw).compose.transforms]
    assert "HorizontalFlip" in names(train=True, hflip=True)
    assert "HorizontalFlip" not in names(train=True)
    assert "HorizontalFlip" not in names(train=False, hflip=True)


def test_strong_augmentation_changes_images_more_and_only_for_training():
    def names(**kw):
        return [type(t).__name__ for t in build_transform(16, (0.5,) * 3, (0.5,) * 3, **kw).compose.transforms]
    assert {"CLAHE", "GaussNoise", "CoarseDropout"} <= set(names(train=True, strong=True))
    assert not {"CLAHE", "GaussNoise", "CoarseDropout"} & set(names(train=True))
    assert names(train=False, strong=True) == names(train=False)
    # a smooth image (a radiograph's scale of detail): mean distance of 200 augmented copies from the plain one
    yy, xx = np.mgrid[0:32, 0:32]
    image = np.repeat((60 + 3 * xx + 2 * yy).astype(np.uint8)[..., None], 3, axis=2)
    plain = build_transform(32, (0.5,) * 3, (0.5,) * 3, train=False)(image)

    def spread(strong: bool) -> float:
        t = build_transform(32, (0.5,) * 3, (0.5,) * 3, train=True, seed=0, strong=strong)
        return float(np.mean([(t(image) - plain).abs().mean().item() for _ in range(200)]))
    weak, strong = spread(False), spread(True)
    assert 0 < weak and strong > 1.5 * weak, (weak, strong)


def test_student_transform_is_the_teachers_unless_strong():
    d = {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    ft = FinetuneConfig()
    teacher_t = build_transform(16, d["mean"], d["std"], train=True, seed=3)
    # runs before the option are reproduced with pseudo_augment=recipe
    assert student_transform(replace(ft, pseudo_augment="recipe"), teacher_t, 16, d, 3) is teacher_t
    strong = student_transform(ft, teacher_t, 16, d, 3)  # the default
    assert strong is not teacher_t and "CoarseDropout" in [type(t).__name__ for t in strong.compose.transforms]


def test_unlabelled_pool_leaves_out_the_labelled_subset_and_is_seeded():
    labelled = np.array([0, 3, 7])
    pool = unlabelled_pool(20, labelled, 10, seed=4)
    assert len(pool) == 10 and not set(pool) & set(labelled) and np.all(np.diff(pool) > 0)
    assert np.array_equal(pool, unlabelled_pool(20, labelled, 10, seed=4))
    assert not np.array_equal(pool, unlabelled_pool(20, labelled, 10, seed=5))
    assert np.array_equal(unlabelled_pool(20, labelled, 0, seed=4), np.setdiff1d(np.arange(20), labelled))


def test_select_confident_takes_the_most_confident_of_each_predicted_class():
    prob = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.95, 0.05], [0.45, 0.55], [0.3, 0.7]])
    pos, labels = select_confident(prob, 2)
    assert pos.tolist() == [3, 0, 2, 5] and labels.tolist() == [0, 0, 1, 1]
    pos, labels = select_confident(prob[[0, 1, 3]], 5)  # a teacher that predicts one class: none of the other made up
    assert pos.tolist() == [2, 0, 1] and labels.tolist() == [0, 0, 0]


class Brightness(torch.nn.Module):
    """A fixed teacher: class 1 for bright images (right on `two_class_images`), or class 0 when `inverted`."""

    def __init__(self, inverted: bool):
        super().__init__()
        self.sign = -1.0 if inverted else 1.0

    def forward(self, x):
        m = 4 * self.sign * x.mean((1, 2, 3))
        return torch.stack([-m, m], 1)


@pytest.mark.parametrize("inverted", [False, True])
def test_self_train_trains_a_fresh_student_on_the_teachers_pseudo_labels(inverted):
    _, x_val, va_y, ft = setup()
    t = build_transform(8, (0.5,) * 3, (0.25,) * 3, train=False)
    images, labels = two_class_images(40, 2)
    train = Split(images, labels)
    labelled = np.arange(8)
    ft.pseudo_per_class, ft.pseudo_pool, ft.pseudo_epochs, ft.pseudo_warmup_epochs = 10, 30, 4, 1
    init = tiny(seed=3, dtype=torch.float32, n_classes=2)
    student, res, diag = self_train(Brightness(inverted), lambda: tiny(seed=3, dtype=torch.float32, n_classes=2), ft,
                                    train, labelled, t, t, x_val, va_y, CPU, seed=5, n_classes=2)
    assert diag["pseudo_images"] == 20
    # the pseudo-labels are the teacher's, not the pool's true labels (which only score them)
    assert diag["pseudo_label_accuracy"] == (0.0 if inverted else 1.0)
    assert len(res.history) == 4 and res.images_seen == 4 * 24  # 8 labelled + 20 pseudo-labelled: 3 batches of 8
    moved = [not torch.equal(a, b) for a, b in zip(student.state_dict().values(), init.state_dict().values())]
    assert any(moved)  # the student was trained from a fresh initial model
    auc = res.best_val_auc
    assert (auc < 0.5) if inverted else (auc > 0.9)  # 20 wrong pseudo-labels outvote 8 true labels


def test_self_train_without_unlabelled_images_is_a_clear_error():
    _, x_val, va_y, ft = setup()
    t = build_transform(8, (0.5,) * 3, (0.25,) * 3, train=False)
    images, labels = two_class_images(8, 2)
    ft.pseudo_per_class = 4
    with pytest.raises(DataError, match="finetune.pseudo_per_class=0"):
        self_train(Brightness(False), lambda: tiny(seed=3, dtype=torch.float32, n_classes=2), ft,
                   Split(images, labels), np.arange(8), t, t, x_val, va_y, CPU, seed=5, n_classes=2)


def test_prototype_head_logits_are_negative_squared_distances_up_to_a_per_image_constant():
    from pipeline.train import prototype_head
    model = tiny(n_classes=3).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, 5, 5, generator=g, dtype=torch.float64)
    y = np.array([0, 1, 2] * 4)
    prototype_head(model, x, y, 3, "classifier", torch.device("cpu"))
    with torch.no_grad():
        f = model.forward_head(model.forward_features(x), pre_logits=True)
        protos = torch.stack([f[torch.as_tensor(y) == c].mean(0) for c in range(3)])
        q = torch.randn(7, 3, 5, 5, generator=g, dtype=torch.float64)
        fq = model.forward_head(model.forward_features(q), pre_logits=True)
        logits = model(q)
    neg_d2 = -((fq[:, None] - protos[None]) ** 2).sum(-1)
    const = logits - neg_d2  # the same for every class of an image: ||f||^2
    torch.testing.assert_close(const, const[:, :1].expand_as(const), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(const[:, 0], (fq ** 2).sum(1), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(protos[0], protos[1])  # distinct prototypes: the check above is not trivial


def test_zero_epochs_with_a_prototype_head_is_the_frozen_nearest_class_mean_classifier():
    """finetune.epochs=0, head_init=prototype: no gradient step. The body is the initial one to the bit, the head is
    built from the labelled images' class means, the predicted class is the nearest mean, and the validation AUC
    reported is that model's."""
    from pipeline.metrics import classification_metrics
    train, x_val, va_y, ft = setup()
    ft = replace(ft, epochs=0, head_init="prototype")
    model = tiny(seed=3, dtype=torch.float32, n_classes=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x_lab = torch.stack([train[i][0] for i in range(len(train))])
    res = fit(model, train, x_val, va_y, ft, CPU, seed=5, head="classifier", n_classes=2,
              head_inputs=(x_lab, train.labels))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("classifier."))
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    assert res.best_epoch == -1 and res.history == []
    model.eval()
    with torch.no_grad():
        f_lab = model.forward_head(model.forward_features(x_lab), pre_logits=True)
        means = torch.stack([f_lab[torch.as_tensor(train.labels) == c].mean(0) for c in range(2)])
        f_val = model.forward_head(model.forward_features(x_val), pre_logits=True)
    nearest = torch.cdist(f_val, means).argmin(1).numpy()
    prob = predict_proba(model, x_val, CPU)
    assert (prob.argmax(1) == nearest).all() and len(set(nearest)) == 2  # both classes predicted: not trivial
    assert res.best_val_auc == pytest.approx(classification_metrics(va_y, prob)["auc"], abs=1e-12)


def test_zero_epochs_need_the_prototype_head():
    from pipeline.config import ConfigError, load_config
    assert load_config(None, ["finetune.epochs=0", "finetune.head_init=prototype"]).finetune.epochs == 0
    with pytest.raises(ConfigError, match="finetune.head_init=prototype"):
        load_config(None, ["finetune.epochs=0"])
