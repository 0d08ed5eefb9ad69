"""Data: multi-crop shapes, crops seeded by (seed, epoch, index), the resumable sampler, Fashion-MNIST files."""
from __future__ import annotations

import gzip
import os
import subprocess
import sys
import time

import numpy as np

import pytest
import torch
from torch.utils.data import DistributedSampler

from smog.config import load_config
from smog.data import DEBIAN_FASHION_MNIST, ResumableSampler, load_split, train_set


def test_multicrop_shapes_and_per_sample_seeding():
    cfg = load_config("digits")
    dataset = train_set(cfg)
    item = dataset[3]
    assert [tuple(c.shape) for c in item["q"]] == [(1, 8, 8)] * 2 + [(1, 4, 4)] * 2
    assert [tuple(c.shape) for c in item["k"]] == [(1, 8, 8)] * 2 + [(1, 4, 4)] * 2 and item["index"] == 3
    again = dataset[3]
    for a, b in zip(item["q"] + item["k"], again["q"] + again["k"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # same (seed, epoch, index): same crops
    assert not torch.equal(item["q"][0], item["q"][1])  # two independent crops
    dataset.set_epoch(1)
    assert not torch.equal(dataset[3]["q"][0], item["q"][0])  # a new epoch draws new crops
    state = torch.get_rng_state()
    dataset[5]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone


def test_resumable_sampler_skips_the_consumed_part_of_the_epoch():
    inner = DistributedSampler(range(100), num_replicas=1, rank=0, shuffle=True, seed=3, drop_last=True)
    inner.set_epoch(2)
    full = list(inner)
    assert list(ResumableSampler(inner, 40)) == full[40:] and len(ResumableSampler(inner, 40)) == 60


@pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION_MNIST), reason="Debian's dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_files():
    cfg = load_config("quickstart")
    test = load_split(cfg.data, "test")
    assert len(test) == 10000 and tuple(test.images.shape[1:]) == (1, 28, 28)
    assert test.images.dtype == torch.uint8 and sorted(test.labels.unique().tolist()) == list(range(10))


def test_image_folder_split_loads_and_evaluates_at_the_crop_size(tmp_path):
    from torchvision.io import write_png

    from smog.data import clean_set

    for split in ("train", "val"):
        for label, side in (("cat", 40), ("dog", 30)):
            os.makedirs(tmp_path / split / label)
            write_png(torch.full((3, side, side + 5), 100, dtype=torch.uint8), str(tmp_path / split / label / "a.png"))
    cfg = load_config("digits", ["data.name=folder", f"data.root={tmp_path}", "data.large_size=16",
                                 "data.small_size=8"])
    item = train_set(cfg)[1]
    assert [tuple(c.shape) for c in item["q"]] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 2
    images, labels = zip(*clean_set(cfg.data, "test"))
    assert [tuple(x.shape) for x in images] == [(3, 16, 16)] * 2 and list(labels) == [0, 1]
    with pytest.raises(Exception, match="train/ and val/"):
        load_split(load_config("digits", ["data.name=folder", f"data.root={tmp_path / 'none'}"]).data, "train")


def _write_idx(folder, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """The idx format by its definition: 0, 0, type 0x08 (uint8), dims, big-endian sizes, then the bytes."""
    os.makedirs(folder, exist_ok=True)
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
        with gzip.open(os.path.join(folder, f"{prefix}-{kind}-ubyte.gz"), "wb") as out:
            out.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_found_in_torchvision_layout_under_root_after_debian(tmp_path, monkeypatch):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 251
    _write_idx(tmp_path / "root" / "FashionMNIST" / "raw", "t10k", images, np.array([7, 0, 3]))
    monkeypatch.setenv("SMOG_DEBIAN_FASHION_MNIST", str(tmp_path / "debian"))  # no Debian copy
    cfg = load_config("quickstart", [f"data.root={tmp_path / 'root'}", "data.download=never"])
    test = load_split(cfg.data, "test")
    assert test.images.shape == (3, 1, 28, 28) and test.labels.tolist() == [7, 0, 3]
    assert torch.equal(test.images[:, 0], torch.from_numpy(images.astype(np.uint8)))
    _write_idx(tmp_path / "debian", "t10k", images[:2] + 1, np.array([1, 2]))  # Debian's copy comes first
    assert load_split(cfg.data, "test").labels.tolist() == [1, 2]
    monkeypatch.setenv("SMOG_DATA", str(tmp_path / "root"))  # data.root empty: the cache folder
    monkeypatch.setenv("SMOG_DEBIAN_FASHION_MNIST", str(tmp_path / "none"))
    assert load_split(load_config("quickstart", ["data.download=never"]).data, "test").labels.tolist() == [7, 0, 3]


def test_smog_train_offline_without_data_lists_the_three_ways_within_seconds(tmp_path):
    """The README's `smog train` on a machine without the data and without network (proxies pointed
    at a closed local port): it stops with the three ways to get the data, having tried the download."""
    env = {**os.environ, "SMOG_DEBIAN_FASHION_MNIST": str(tmp_path / "debian"), "SMOG_DATA": str(tmp_path / "cache"),
           "HOME": str(tmp_path), "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "smog.cli", "train", f"train.out_dir={tmp_path / 'runs'}"],
                          env=env, capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    assert "the download failed" in done.stderr and "Traceback" not in done.stderr
    for way in ("apt-get install dataset-fashion-mnist", str(tmp_path / "cache"), "data.download=auto"):
        assert way in done.stderr
    assert seconds < 60, f"took {seconds:.0f} s"


@pytest.mark.parametrize("recipe", ["quickstart", "digits"])
def test_clean_batches_are_the_images_normalised_by_hand(recipe):
    """A loader's batches (one transform per batch) hold each image as (x / 255 - mean) / std at the
    evaluation size, in order, with its label; resized sets (digits: 8 px) as the per-image transform."""
    from smog.data import clean_set, data_info, make_loader

    cfg = load_config(recipe)
    clean = clean_set(cfg.data, "test", 300)
    images, labels = map(torch.cat, zip(*make_loader(clean, 128, cfg.data)))
    raw = load_split(cfg.data, "test").subset(300)
    assert torch.equal(labels, raw.labels[:300])
    if raw.size == cfg.data.large_size:
        info = data_info(cfg.data)
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (info.mean, info.std))
        expected = (raw.images.float() / 255 - mean) / std
    else:
        expected = torch.stack([clean.transform(raw.images[i]) for i in range(300)])
        assert images.shape[-1] == cfg.data.large_size != raw.size
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)
