"""Albumentations pipelines: HxWx3 uint8 -> normalised CHW float tensor at the backbone's input size."""
from __future__ import annotations

from typing import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2


class AlbumentationsTransform:
    """A callable wrapper so datasets take `transform(image) -> tensor` (medmnist/MONAI style)."""

    def __init__(self, compose: A.Compose):
        self.compose = compose

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.compose(image=image)["image"]

    def __repr__(self) -> str:
        return repr(self.compose)


def build_transform(size: int, mean: Sequence[float], std: Sequence[float], train: bool,
                    seed: int | None = None, hflip: bool = False, strong: bool = False) -> AlbumentationsTransform:
    """Eval: resize + normalise. Train adds what is plausible for radiographs and other medical images:
    small rotations, shifts and zooms, mild brightness/contrast/gamma changes and slight blur; no vertical
    flip (anatomy has an up) and no colour jitter on hue (stains and greys carry meaning). `hflip` adds
    left-right flips. `strong` (train only) is the noisy-student variant: about twice the geometric and
    intensity ranges, local contrast (CLAHE), sensor noise and cut-out patches, the same kinds of change."""
    resize = A.Resize(size, size, interpolation=cv2.INTER_CUBIC)
    aug = []
    if train and strong:
        aug = [
            A.Affine(scale=(0.8, 1.2), translate_percent=(-0.1, 0.1), rotate=(-15, 15), shear=(-5, 5),
                     border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.9),
            A.RandomBrightnessContrast(brightness_limit=0.3, contrast_limit=0.3, p=0.8),
            A.RandomGamma(gamma_limit=(70, 130), p=0.5),
            A.CLAHE(clip_limit=(1.0, 3.0), p=0.2),
            A.GaussianBlur(blur_limit=(3, 5), p=0.2),
            A.GaussNoise(std_range=(0.01, 0.04), p=0.3),
            A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.05, 0.15),
                            hole_width_range=(0.05, 0.15), fill=0, p=0.5),
        ]
    elif train:
        aug = [
            A.Affine(scale=(0.9, 1.1), translate_percent=(-0.06, 0.06), rotate=(-10, 10),
                     border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.8),
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
            A.RandomGamma(gamma_limit=(85, 115), p=0.3),
            A.GaussianBlur(blur_limit=(3, 3), p=0.1),
        ]
    if train and hflip:
        aug.insert(0, A.HorizontalFlip(p=0.5))
    norm = A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0)
    return AlbumentationsTransform(A.Compose([resize, *aug, norm, ToTensorV2()], seed=seed))
