"""The fine-tuning recipe (`pipeline.train`) on a tiny model and synthetic images: which weights `fit` keeps,
and the flip test-time augmentation."""
import numpy as np
import pytest
import torch

from pipeline.config import FinetuneConfig
from pipeline.data import ImageDataset
from pipeline.train import FlipTTA, fit, log_loss, predict_proba
from pipeline.transforms import build_transform
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
