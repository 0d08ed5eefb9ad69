"""Batch augmentations (smog.augment.on_device) against torchvision's per-image ops, and their seeding; both blurs
against PIL's, the authors'."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from smog.augment.on_device import (BatchMultiCrop, colour_jitter, crop_boxes, crop_resize, gaussian_blur, grayscale,
                                   solarize)
from smog.augment.per_image import MultiCrop
from smog.config import DataConfig, load_config

ATOL = 2e-5  # float32 arithmetic in a different order than torchvision's


def _images(b: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def _inside(extent: int, size: int) -> torch.Tensor:
    """Which of `size` outputs resampling `extent` input pixels sample inside [0, extent - 1]."""
    at = (torch.arange(size) + 0.5) * extent / size - 0.5
    return (at >= 0) & (at <= extent - 1)


@pytest.mark.parametrize("c,h,w,size", [(1, 28, 28, 28), (3, 17, 23, 32), (3, 32, 32, 14)])
def test_crop_resize_matches_torchvision_resized_crop(c, h, w, size):
    x = _images(4, c, h, w)
    # integer pixel boxes (top, left, height, width), one per sample, some mirrored
    pixel_boxes = [(0, 0, h, w), (3, 2, h - 5, w - 7), (h // 2, w // 3, h // 2, w // 2), (1, 0, 9, 11)]
    boxes = torch.tensor([[(left + width / 2) / w, (top + height / 2) / h, width / w, height / h]
                          for top, left, height, width in pixel_boxes])
    mirror = torch.tensor([False, True, False, True])
    got = crop_resize(x, boxes, size, mirror)
    for i, (top, left, height, width) in enumerate(pixel_boxes):
        if height > size or width > size:
            continue  # torchvision antialiases when shrinking; the batch path is used for upsampling crops
        want = TF.resized_crop(x[i], top, left, height, width, [size, size], antialias=False)
        want = TF.horizontal_flip(want) if mirror[i] else want
        # torchvision clamps to the crop's border pixel; the batch path reads the image's next pixel: compare the
        # outputs whose sampling point lies inside the crop (the outermost half-pixel ring may differ)
        rows, cols = (_inside(height, size), _inside(width, size))
        cols = cols.flip(0) if mirror[i] else cols
        inside = rows.view(-1, 1) & cols.view(1, -1)
        assert int(inside.sum()) >= size * size // 2
        torch.testing.assert_close(got[i][:, inside], want[:, inside], rtol=0, atol=ATOL)


def test_crop_boxes_stay_inside_the_image_with_the_asked_area():
    g = torch.Generator().manual_seed(1)
    boxes = crop_boxes(4000, 20, 30, (0.2, 0.6), g, torch.device("cpu"))
    cx, cy, w, h = boxes.unbind(1)
    assert bool((cx - w / 2 >= -1e-6).all() and (cx + w / 2 <= 1 + 1e-6).all())
    assert bool((cy - h / 2 >= -1e-6).all() and (cy + h / 2 <= 1 + 1e-6).all())
    area = w * h
    assert bool((area <= 0.6 + 1e-5).all()) and float(area.min()) >= 0.2 - 1e-5
    ratio = (w * 30) / (h * 20)
    unclamped = (w < 1) & (h < 1)
    assert bool(((ratio[unclamped] > 0.75 - 1e-4) & (ratio[unclamped] < 4 / 3 + 1e-4)).all())


@pytest.mark.parametrize("c", [1, 3])
def test_colour_jitter_matches_torchvision_adjustments(c):
    x = _images(3, c, 9, 7, seed=2)
    bright, contrast = torch.tensor([0.7, 1.0, 1.3]), torch.tensor([1.2, 0.6, 1.0])
    saturation, hue = torch.tensor([0.9, 1.15, 1.0]), torch.tensor([0.05, -0.08, 0.0])
    got = colour_jitter(x, bright, contrast, saturation, hue)
    for i in range(3):
        want = TF.adjust_contrast(TF.adjust_brightness(x[i], float(bright[i])), float(contrast[i]))
        if c == 3:
            want = TF.adjust_hue(TF.adjust_saturation(want, float(saturation[i])), float(hue[i]))
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-4)


def test_grayscale_and_solarize_only_where_asked():
    x = _images(2, 3, 5, 5, seed=3)
    on = torch.tensor([True, False])
    grey = grayscale(x, on)
    torch.testing.assert_close(grey[0], TF.rgb_to_grayscale(x[0], num_output_channels=3), rtol=0, atol=ATOL)
    assert torch.equal(grey[1], x[1])
    sol = solarize(x, on)
    want = TF.solarize(x[0], 128 / 255)
    torch.testing.assert_close(sol[0], want, rtol=0, atol=0)
    assert torch.equal(sol[1], x[1])


@pytest.mark.parametrize("kernel", [3, 5])
def test_gaussian_blur_matches_torchvision_per_sample_sigma(kernel):
    x = _images(3, 3, 11, 8, seed=4)
    sigma = torch.tensor([0.3, 0.0, 1.7])
    got = gaussian_blur(x, kernel, sigma)
    assert torch.equal(got[1], x[1])  # sigma 0: unchanged
    for i in (0, 2):
        want = TF.gaussian_blur(x[i], [kernel, kernel], [float(sigma[i])] * 2)
        torch.testing.assert_close(got[i], want, rtol=0, atol=ATOL)


def _pil_blur_case(size: int) -> tuple[torch.Tensor, Image.Image]:
    """One uint8 image [3, size, size] of flat patches with sharp edges, and the same image in PIL."""
    patches = torch.rand(3, size // 8, size // 8, generator=torch.Generator().manual_seed(size)) * 255
    img = torch.nn.functional.interpolate(patches[None], size=(size, size), mode="nearest")[0].round().to(torch.uint8)
    return img, Image.fromarray(img.permute(1, 2, 0).numpy())


@pytest.mark.parametrize("size", [96, 224])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_blur_matches_the_authors_pil_gaussian_blur(size, sigma):
    """The loader's GaussianBlur (as smog.augment.per_image configures it for a crop of `size` px) and the batch
    blur against PIL's GaussianBlur(radius=sigma), the authors' blur, away from the borders (PIL clamps them,
    torchvision reflects). PIL approximates the Gaussian with box filters: up to 3 levels apart in a pixel, under
    1 on average; a kernel cut at 2 sigma (9 taps at sigma 2) is 8 levels and 1.6 on average apart."""
    img, pil = _pil_blur_case(size)
    want = torch.from_numpy(np.array(pil.filter(ImageFilter.GaussianBlur(radius=sigma)))).permute(2, 0, 1).float()
    crops = MultiCrop(DataConfig(large_size=size, small_size=size), 3, (0.0,) * 3, (1.0,) * 3)
    [loader_blur] = [t for t in crops.q_small.transforms if isinstance(t, v2.RandomApply)
                     if isinstance(t.transforms[0], v2.GaussianBlur)]
    blur = loader_blur.transforms[0]
    blur.sigma = [sigma, sigma]
    kernel = blur.kernel_size[0]
    got = {"loader": blur(img).float(),
           "device": gaussian_blur(img[None].float(), kernel, torch.tensor([sigma]))[0]}
    inner = (slice(None), slice(8, -8), slice(8, -8))
    for where, out in got.items():
        diff = (out - want)[inner].abs()
        assert float(diff.max()) <= 4.0 and float(diff.mean()) <= 1.0, (where, kernel, float(diff.max()),
                                                                          float(diff.mean()))


def test_batch_multicrop_shapes_seeding_and_independent_samples():
    cfg = load_config("digits")
    crops = BatchMultiCrop(cfg.data, (0.5,), (0.25,))
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    images[1] = images[0]
    out = crops(images, seed=7)
    assert [tuple(v.shape) for v in out["q"]] == [(5, 1, 8, 8)] * 2 + [(5, 1, 4, 4)] * cfg.data.small_crops
    assert [tuple(v.shape) for v in out["k"]] == [(5, 1, 8, 8)] * 2 + [(5, 1, 4, 4)] * cfg.data.small_crops
    again = crops(images, seed=7)
    for a, b in zip(out["q"] + out["k"], again["q"] + again["k"]):
        assert torch.equal(a, b)  # same seed: same crops
    assert not torch.equal(crops(images, seed=8)["q"][0], out["q"][0])  # another seed: other crops
    assert not torch.equal(out["q"][0][0], out["q"][0][1])  # equal images, independent random parameters
    assert not torch.equal(out["q"][0], out["q"][1])  # two independent views
    assert list(crops(images, seed=7, large_q_only=True)) == ["q"]
    with pytest.raises(ValueError, match="uint8"):
        crops(images.float(), seed=0)


def test_device_mode_dataset_yields_raw_images_and_refuses_varying_sizes(tmp_path):
    from torchvision.io import write_png

    from smog.config import ConfigError
    from smog.data import train_set

    item = train_set(load_config("digits", ["data.augment_on=device"]))[4]
    assert item["image"].dtype == torch.uint8 and tuple(item["image"].shape) == (1, 8, 8) and item["index"] == 4
    with pytest.raises(ConfigError, match="data.augment_on"):
        load_config("digits", ["data.augment_on=gpu"])
    os.makedirs(tmp_path / "train" / "cat")
    write_png(torch.zeros(3, 10, 12, dtype=torch.uint8), str(tmp_path / "train" / "cat" / "a.png"))
    folder = load_config("digits", ["data.name=folder", f"data.root={tmp_path}", "data.augment_on=device"])
    with pytest.raises(ConfigError, match="varying size"):
        train_set(folder)
