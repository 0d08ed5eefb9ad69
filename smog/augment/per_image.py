"""SMoG's asymmetric multi-crop augmentations on torchvision.transforms.v2.

q set: 2 large + `small_crops` small crops, Gaussian blur p=1.0, no solarisation; k set: 2 large +
`small_crops` small crops, blur p=0.1, solarisation p=0.2 (the sets swap roles on odd iterations, small
crops included). Colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8 and grayscale p=0.2 on
colour images; brightness/contrast jitter only on grey ones. Inputs are uint8 tensors [C, H, W].
"""
from __future__ import annotations

import math

import torch
from torchvision.transforms import v2

from smog.config import DataConfig

# The recipe's constants, shared with the batch version (smog.augment.on_device).
JITTER = (0.4, 0.4, 0.2, 0.1)  # colour jitter strengths: brightness, contrast, saturation, hue
JITTER_P, GREY_P = 0.8, 0.2  # probabilities of colour jitter and (colour images) grayscale
BLUR_SIGMA = (0.1, 2.0)
Q_BLUR_P, K_BLUR_P, K_SOLARIZE_P = 1.0, 0.1, 0.2  # q crops are never solarised


def blur_kernel(size: int) -> int:
    """Gaussian blur taps for a crop of `size` px: 3 sigma each side of the centre at the largest sigma (the
    authors' PIL GaussianBlur(radius=sigma) has no kernel size to set), capped at 2 * size - 1 taps, the widest
    that reflect padding allows."""
    return min(2 * math.ceil(3 * BLUR_SIGMA[1]) + 1, 2 * size - 1)


def _view(cfg: DataConfig, size: int, scale: tuple[float, float], channels: int, mean: tuple[float, ...],
          std: tuple[float, ...], blur_p: float, solarize_p: float) -> v2.Compose:
    steps: list = [v2.RandomResizedCrop(size, scale=scale, antialias=True)]
    if cfg.flip:
        steps.append(v2.RandomHorizontalFlip())
    if cfg.color:
        if channels == 3:
            steps += [v2.RandomApply([v2.ColorJitter(*JITTER)], p=JITTER_P), v2.RandomGrayscale(p=GREY_P)]
        else:
            steps.append(v2.RandomApply([v2.ColorJitter(*JITTER[:2])], p=JITTER_P))
    if cfg.blur and blur_p > 0:
        steps.append(v2.RandomApply([v2.GaussianBlur(blur_kernel(size), sigma=BLUR_SIGMA)], p=blur_p))
    if cfg.color and solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


class MultiCrop:
    """uint8 image [C, H, W] -> {"q": [L large + S small crops], "k": [L large + S small crops]} (float, normalised).

    L = `large` (2 for SMoG: two targets; 1 gives the plain two-view pair other recipes use).
    """

    def __init__(self, cfg: DataConfig, channels: int, mean: tuple[float, ...], std: tuple[float, ...],
                 large: int = 2):
        self.q_large = _view(cfg, cfg.large_size, cfg.large_scale, channels, mean, std, Q_BLUR_P, 0.0)
        self.k_large = _view(cfg, cfg.large_size, cfg.large_scale, channels, mean, std, K_BLUR_P, K_SOLARIZE_P)
        self.q_small = _view(cfg, cfg.small_size, cfg.small_scale, channels, mean, std, Q_BLUR_P, 0.0)
        self.k_small = _view(cfg, cfg.small_size, cfg.small_scale, channels, mean, std, K_BLUR_P, K_SOLARIZE_P)
        self.small_crops, self.large = cfg.small_crops, large

    def __call__(self, image: torch.Tensor, large_q_only: bool = False) -> dict[str, list[torch.Tensor]]:
        """large_q_only: just the large q crops (the memory-bank fill pass needs nothing else)."""
        q = [self.q_large(image) for _ in range(self.large)]
        if large_q_only:
            return {"q": q}
        q += [self.q_small(image) for _ in range(self.small_crops)]
        k = [self.k_large(image) for _ in range(self.large)]
        return {"q": q, "k": k + [self.k_small(image) for _ in range(self.small_crops)]}


def clean_transform(size: int, native: int, mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Compose:
    """Evaluation view at `size` px: images larger than that, or of varying size (native 0), are resized to
    size * 256/224 and centre-cropped (ImageNet style); smaller ones are resized up; equal ones kept."""
    steps: list = []
    if native == 0 or native > size:
        steps += [v2.Resize(int(round(size * 256 / 224)), antialias=True), v2.CenterCrop(size)]
    elif native < size:
        steps.append(v2.Resize(size, antialias=True))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)
