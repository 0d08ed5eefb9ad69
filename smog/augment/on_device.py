"""SMoG's multi-crop augmentations applied to a whole batch at once, on the training device.

The recipe of smog.augment.per_image (asymmetric q/k sets, docs/method.md) with every random parameter drawn per
sample from one seeded torch.Generator, as tensor ops over the batch: one affine resample for
resized crop + flip, per-sample colour factors, per-sample Gaussian kernels. For datasets held in memory
at one image size (Fashion-MNIST, CIFAR, STL-10, digits) this replaces the per-image loader pipeline,
whose Python overhead dominates an epoch on small images (data.augment_on=device).

Differences from torchvision's per-image transforms, by design: a crop box that does not fit is clamped
to the image instead of re-drawn (torchvision retries 10 times, then takes a centre crop); colour jitter
applies brightness, contrast, saturation, hue in this fixed order (torchvision permutes it per image).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smog.config import DataConfig
from smog.augment.per_image import (BLUR_SIGMA, GREY_P, JITTER, JITTER_P, K_BLUR_P, K_SOLARIZE_P, Q_BLUR_P,
                             blur_kernel)

_LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601 as torchvision rounds it


@dataclass(frozen=True)
class ViewRecipe:
    """One kind of crop: output side, area fraction range, blur and solarisation probabilities."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


def _uniform(n: int, low: float, high: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def _chance(n: int, p: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) < p


def _jitter(n: int, spread: float, on: torch.Tensor, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Factors uniform in [1 - spread, 1 + spread] where `on`, 1 elsewhere."""
    return torch.where(on, _uniform(n, 1 - spread, 1 + spread, g, device), 1.0)


def crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], g: torch.Generator,
               device: torch.device) -> torch.Tensor:
    """[n, 4] random boxes (centre x, centre y, width, height as fractions of the image's sides): area
    fraction uniform in `scale`, log aspect ratio uniform in [log 3/4, log 4/3], position uniform."""
    area = _uniform(n, *scale, g, device)
    ratio = torch.exp(_uniform(n, math.log(3 / 4), math.log(4 / 3), g, device))
    w = torch.sqrt(area * ratio * height / width).clamp(max=1.0)
    h = torch.sqrt(area / ratio * width / height).clamp(max=1.0)
    cx = (1 - w) * torch.rand(n, generator=g, device=device) + w / 2
    cy = (1 - h) * torch.rand(n, generator=g, device=device) + h / 2
    return torch.stack([cx, cy, w, h], dim=1)


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int, mirror: torch.Tensor) -> torch.Tensor:
    """x float [B, C, H, W] -> [B, C, size, size]: box b of x (crop_boxes' layout) resampled bilinearly
    (as torchvision's resized_crop without antialiasing), left-right mirrored where mirror [B] is True."""
    cx, cy, w, h = boxes.unbind(1)
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2] = torch.where(mirror, -w, w), 2 * cx - 1
    theta[:, 1, 1], theta[:, 1, 2] = h, 2 * cy - 1
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] in [0, 1] -> [B, 1, H, W] luminance (the image itself when C = 1)."""
    if x.shape[1] == 1:
        return x
    weights = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, per sample, clamped to [0, 1]."""
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB [B, 3, H, W] in [0, 1]: hue rotated by `shift` [B] (fractions of a turn) through HSV."""
    r, g, b = x.unbind(1)
    high, low = x.amax(1), x.amin(1)
    chroma = high - low
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(high == r, ((g - b) / safe) % 6,
                      torch.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))
    hue = (hue + shift.view(-1, 1, 1)) % 1.0
    # HSV -> RGB with value `high` and chroma `chroma`: f(n) = V - C * clamp(min(k, 4 - k), 0, 1)
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + hue.unsqueeze(1) * 6) % 6
    return high.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def colour_jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor,
                  hue: torch.Tensor) -> torch.Tensor:
    """Per-sample factors [B] applied in this order (torchvision's adjust_* semantics); saturation and hue
    only on colour images."""
    x = (x * brightness.view(-1, 1, 1, 1)).clamp(0, 1)
    x = _blend(x, _grey(x).mean(dim=(1, 2, 3), keepdim=True), contrast)
    if x.shape[1] == 1:
        return x
    return _shift_hue(_blend(x, _grey(x), saturation), hue)


def grayscale(x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Colour images [B, 3, H, W]: luminance in all three channels where on [B] is True."""
    return torch.where(on.view(-1, 1, 1, 1), _grey(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, kernel: int, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with per-sample sigma [B] (0: unchanged), reflect padding, odd `kernel` taps."""
    b, c, h, w = x.shape
    taps = torch.arange(kernel, device=x.device, dtype=x.dtype) - (kernel - 1) / 2
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma)).view(-1, 1)
    weights = torch.softmax(-(taps.view(1, -1) ** 2) / (2 * safe ** 2), dim=1)  # normalised Gaussian
    weights = torch.where(sigma.view(-1, 1) > 0, weights, (taps == 0).to(x.dtype)).repeat_interleave(c, dim=0)
    pad = kernel // 2
    y = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, weights.view(b * c, 1, 1, kernel), groups=b * c)
    y = F.conv2d(y, weights.view(b * c, 1, kernel, 1), groups=b * c)
    return y.view(b, c, h, w)


def solarize(x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Pixels >= 128/255 inverted in the samples where on [B] is True."""
    return torch.where(on.view(-1, 1, 1, 1) & (x >= 128 / 255), 1 - x, x)


class BatchMultiCrop:
    """uint8 images [B, C, H, W] (one size, any device) -> {"q": [L large + S small], "k": [L large + S small]}
    normalised float32 crops on the same device, every random choice drawn from `seed`.

    The same recipe as smog.augment.per_image.MultiCrop: q crops blurred (p=1.0) and never solarised; k crops
    blurred with p=0.1 and solarised with p=0.2; colour jitter p=0.8 on both. Drawn in the order q large,
    q small, k large, k small.
    """

    def __init__(self, cfg: DataConfig, mean: tuple[float, ...], std: tuple[float, ...], large: int = 2):
        self.cfg, self.large, self.small_crops = cfg, large, cfg.small_crops
        self.mean, self.std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        self.q_large = ViewRecipe(cfg.large_size, tuple(cfg.large_scale), Q_BLUR_P, 0.0)
        self.k_large = ViewRecipe(cfg.large_size, tuple(cfg.large_scale), K_BLUR_P, K_SOLARIZE_P)
        self.q_small = ViewRecipe(cfg.small_size, tuple(cfg.small_scale), Q_BLUR_P, 0.0)
        self.k_small = ViewRecipe(cfg.small_size, tuple(cfg.small_scale), K_BLUR_P, K_SOLARIZE_P)

    def view(self, x: torch.Tensor, recipe: ViewRecipe, g: torch.Generator) -> torch.Tensor:
        """x float [B, C, H, W] in [0, 1] -> one normalised crop per sample [B, C, size, size]."""
        b, dev = x.shape[0], x.device
        boxes = crop_boxes(b, x.shape[2], x.shape[3], recipe.scale, g, dev)
        mirror = _chance(b, 0.5 if self.cfg.flip else 0.0, g, dev)
        y = crop_resize(x, boxes, recipe.size, mirror)
        if self.cfg.color:
            on = _chance(b, JITTER_P, g, dev)
            bright, contrast, saturation = (_jitter(b, spread, on, g, dev) for spread in JITTER[:3])
            hue = torch.where(on, _uniform(b, -JITTER[3], JITTER[3], g, dev), 0.0)
            y = colour_jitter(y, bright, contrast, saturation, hue)
            if y.shape[1] == 3:
                y = grayscale(y, _chance(b, GREY_P, g, dev))
        if self.cfg.blur and recipe.blur_p > 0:
            sigma = torch.where(_chance(b, recipe.blur_p, g, dev), _uniform(b, *BLUR_SIGMA, g, dev), 0.0)
            y = gaussian_blur(y, blur_kernel(recipe.size), sigma)
        if self.cfg.color and recipe.solarize_p > 0:
            y = solarize(y, _chance(b, recipe.solarize_p, g, dev))
        return (y - self.mean.to(dev)) / self.std.to(dev)

    def __call__(self, images: torch.Tensor, seed: int, large_q_only: bool = False) -> dict[str, list[torch.Tensor]]:
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 [B, C, H, W], got {images.dtype} {tuple(images.shape)}")
        g = torch.Generator(device=images.device)
        g.manual_seed(seed)
        x = images.float() / 255
        q = [self.view(x, self.q_large, g) for _ in range(self.large)]
        if large_q_only:
            return {"q": q}
        q += [self.view(x, self.q_small, g) for _ in range(self.small_crops)]
        k = [self.view(x, self.k_large, g) for _ in range(self.large)]
        return {"q": q, "k": k + [self.view(x, self.k_small, g) for _ in range(self.small_crops)]}
