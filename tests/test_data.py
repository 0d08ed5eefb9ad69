"""Data: multi-crop shapes, crops seeded by (seed, epoch, index), the resumable sampler, Fashion-MNIST files."""
from __future__ import annotations

import os

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
