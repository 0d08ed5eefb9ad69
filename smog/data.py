"""Datasets as uint8 image tensors, the multi-crop training set and the loaders.

`load_split(cfg, "train" | "test")` returns an ImageSet (items: (uint8 [C, H, W], label)). A dataset
that is not where it was looked for raises DatasetNotFound saying where and how to get it.
Augmentations are seeded per (seed, epoch, dataset index), so a sample's crops do not depend on the
worker, the batch or an interruption: that is what makes a mid-epoch resume exact.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from smog.augment.on_device import BatchMultiCrop
from smog.config import Config, ConfigError, DataConfig
from smog.augment.per_image import MultiCrop, clean_transform

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
STATS = {  # (channels, native size, mean, std)
    "fashion_mnist": (1, 28, (0.286,), (0.353,)),
    "mnist": (1, 28, (0.131,), (0.308,)),
    "digits": (1, 8, (0.305,), (0.378,)),
    "cifar10": (3, 32, (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)),
    "cifar100": (3, 32, (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
    "stl10": (3, 96, (0.447, 0.440, 0.407), (0.260, 0.257, 0.271)),
    "folder": (3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class DatasetNotFound(FileNotFoundError):
    """The dataset is not where it was looked for; the message says how to get it."""


class ImageSet(Dataset):
    """uint8 images (a tensor [N, C, H, W], or a loader of index -> [C, H, W]) with int labels [N].

    size: the images' side in pixels, 0 when it varies (image folders).
    """

    def __init__(self, images: torch.Tensor | Callable[[int], torch.Tensor], labels: torch.Tensor, size: int):
        self.images, self.labels, self.size = images, labels, size

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> torch.Tensor:
        return self.images[index] if isinstance(self.images, torch.Tensor) else self.images(index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.image(index), int(self.labels[index])

    def subset(self, count: int) -> "ImageSet":
        """The first `count` items (all when count is 0 or larger than the set)."""
        if count <= 0 or count >= len(self):
            return self
        images = self.images[:count] if isinstance(self.images, torch.Tensor) else self.images
        return ImageSet(images, self.labels[:count], self.size)


def _idx_file(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def cache_root() -> str:
    """Where datasets go when data.root is empty: $SMOG_DATA, else ~/.cache/smog/data."""
    return os.environ.get("SMOG_DATA") or os.path.expanduser("~/.cache/smog/data")


def debian_fashion_mnist() -> str:
    """Debian's dataset-fashion-mnist folder ($SMOG_DEBIAN_FASHION_MNIST points elsewhere)."""
    return os.environ.get("SMOG_DEBIAN_FASHION_MNIST", DEBIAN_FASHION_MNIST)


def _idx_pair(folder: str, prefix: str) -> tuple[str, str] | None:
    """(images, labels) idx files of a split in `folder`, gzipped or not; None when either is missing."""
    for ext in (".gz", ""):
        images = os.path.join(folder, f"{prefix}-images-idx3-ubyte{ext}")
        labels = os.path.join(folder, f"{prefix}-labels-idx1-ubyte{ext}")
        if os.path.isfile(images) and os.path.isfile(labels):
            return images, labels
    return None


def _fashion_mnist(root: str, train: bool, download: str) -> ImageSet:
    """Looked for in Debian's folder, then in `root` (or cache_root()) and its torchvision layout
    (FashionMNIST/raw); with download="auto", fetched by torchvision into that folder when absent."""
    prefix = "train" if train else "t10k"
    home = root or cache_root()
    folders = [debian_fashion_mnist(), home, os.path.join(home, "FashionMNIST", "raw")]
    found = next(filter(None, (_idx_pair(folder, prefix) for folder in folders)), None)
    failure = "data.download=never"
    if found is None and download == "auto":
        try:
            _fetch("FashionMNIST", home)
            found = _idx_pair(folders[-1], prefix)
        except OSError as error:  # no network, no DNS, a proxy refusing: the reason, then the ways out
            failure = f"the download failed ({str(error)[:300]})"
    if found is not None:
        x = torch.from_numpy(_idx_file(found[0]).copy()).unsqueeze(1)
        return ImageSet(x, torch.from_numpy(_idx_file(found[1]).astype(np.int64)), 28)
    raise DatasetNotFound(
        f"Fashion-MNIST not found (looked in {', '.join(folders)}) and {failure}. Three ways to get it:\n"
        f"  1. Debian/Ubuntu: apt-get install dataset-fashion-mnist (files in {DEBIAN_FASHION_MNIST})\n"
        f"  2. copy the four *-ubyte.gz files into {home} (or point data.root at a folder holding them)\n"
        f"  3. run with internet access: data.download=auto (the default) fetches them into {home}")


def _fetch(name: str, root: str) -> None:
    """torchvision's download of dataset `name` into `root` (OSError when it cannot reach the data)."""
    import socket

    import torchvision.datasets as tvd

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # a silent network fails within seconds, not minutes
    try:
        getattr(tvd, name)(root, download=True)
    except RuntimeError as error:  # torchvision wraps every mirror's URLError in one RuntimeError
        raise OSError(str(error).replace("\n", " ")) from None
    finally:
        socket.setdefaulttimeout(previous)


def _torchvision(name: str, root: str, train: bool, download: str) -> ImageSet:
    import torchvision.datasets as tvd

    cls = getattr(tvd, name)
    try:
        if name == "STL10":
            ds = cls(root, split="train" if train else "test", download=download == "auto")
        else:
            ds = cls(root, train=train, download=download == "auto")
    except (RuntimeError, OSError) as error:  # not found (download=never) or the download failed
        raise DatasetNotFound(
            f"{name} not found under {os.path.abspath(root)} ({str(error).splitlines()[0][:200]}). Run with "
            f"internet access and data.download=auto (the default) to let torchvision fetch it there, or point "
            f"data.root at a folder that holds it.") from None
    data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else ds.data
    x = torch.from_numpy(np.ascontiguousarray(data))
    x = x.unsqueeze(1) if x.dim() == 3 else (x if name == "STL10" else x.permute(0, 3, 1, 2).contiguous())
    labels = ds.labels if name == "STL10" else ds.targets
    return ImageSet(x, torch.as_tensor(np.asarray(labels), dtype=torch.int64), x.shape[-1])


def _digits(train: bool) -> ImageSet:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy((digits.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    cut = 1500
    return ImageSet(x[:cut], y[:cut], 8) if train else ImageSet(x[cut:], y[cut:], 8)


def _folder(root: str, train: bool) -> ImageSet:
    from torchvision.datasets import ImageFolder

    split = os.path.join(root, "train" if train else "val")
    if not root or not os.path.isdir(split):
        raise DatasetNotFound(
            f"image folder split not found at {os.path.abspath(split) if root else '(data.root is empty)'}: "
            f"set data.root to a folder with train/ and val/ subfolders, one subfolder per class "
            f"(the ImageNet layout).")
    folder = ImageFolder(split)
    return ImageSet(_FileImages([p for p, _ in folder.samples]), torch.tensor(folder.targets, dtype=torch.int64), 0)


class _FileImages:
    """index -> uint8 RGB image [3, H, W] decoded from its file (picklable, for worker processes)."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __call__(self, index: int) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_image

        return decode_image(self.paths[index], mode=ImageReadMode.RGB)


def load_split(cfg: DataConfig, split: str) -> ImageSet:
    """The "train" or "test" split of cfg.name as an ImageSet."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    train = split == "train"
    root = cfg.root or cache_root()
    if cfg.name == "fashion_mnist":
        return _fashion_mnist(cfg.root, train, cfg.download)
    if cfg.name == "digits":
        return _digits(train)
    if cfg.name == "folder":
        return _folder(cfg.root, train)
    names = {"mnist": "MNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100", "stl10": "STL10"}
    if cfg.name not in names:
        raise ValueError(f"data.name must be one of {', '.join(STATS)}, got {cfg.name!r}")
    return _torchvision(names[cfg.name], root, train, cfg.download)


class MultiCropSet(Dataset):
    """Items: {"q": [crops], "k": [crops], "index": dataset index}, crops seeded by (seed, epoch, index).

    With transform None (data.augment_on=device) items are {"image": uint8 [C, H, W], "index"}: the
    trainer crops whole batches on its device (smog.augment.on_device)."""

    def __init__(self, images: ImageSet, transform: MultiCrop | None, seed: int):
        self.images, self.transform, self.seed, self.epoch = images, transform, seed, 0
        self.large_q_only = False  # set for the memory-bank fill pass

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        if self.transform is None:
            return {"image": self.images.image(index), "index": index}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + (self.epoch + 1) * 2_147_483 + index) % (2 ** 63))
            crops = self.transform(self.images.image(index), self.large_q_only)
        return {**crops, "index": index}


class CleanSet(Dataset):
    """Evaluation items: (clean normalised image, label)."""

    def __init__(self, images: ImageSet, transform: Callable):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.images[index]
        return self.transform(image), label

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """A loader's batch: in-memory images transformed as one [B, C, H, W] tensor (the same values as
        item by item, without a transform call per image)."""
        if not isinstance(self.images.images, torch.Tensor):
            return [self[i] for i in indices]
        rows = torch.as_tensor(indices)
        batch = self.transform(self.images.images[rows])
        return list(zip(batch.unbind(0), self.images.labels[rows].tolist()))


class ResumableSampler(Sampler[int]):
    """A DistributedSampler's epoch order, minus the first `skip` indices (a mid-epoch resume)."""

    def __init__(self, inner: DistributedSampler, skip: int = 0):
        self.inner, self.skip = inner, skip

    def __iter__(self):
        return iter(list(self.inner)[self.skip:])

    def __len__(self) -> int:
        return len(self.inner) - self.skip


@dataclass
class DataInfo:
    channels: int
    size: int  # large crop / evaluation size
    mean: Sequence[float]
    std: Sequence[float]


def data_info(cfg: DataConfig) -> DataInfo:
    channels, native, mean, std = STATS[cfg.name]
    return DataInfo(channels, cfg.large_size, mean, std)


def train_set(cfg: Config, large: int = 2) -> MultiCropSet:
    """The pretraining set: `large` large crops per view set (+ small q crops), seeded by cfg.train.seed;
    raw images when the crops are made on the device (data.augment_on=device)."""
    info = data_info(cfg.data)
    images = load_split(cfg.data, "train").subset(cfg.data.train_subset)
    if cfg.data.augment_on == "device":
        if images.size == 0:
            raise ConfigError(f"data.augment_on=device needs images of one size; data.name={cfg.data.name!r} has "
                              f"images of varying size: set data.augment_on=loader")
        return MultiCropSet(images, None, cfg.train.seed)
    return MultiCropSet(images, MultiCrop(cfg.data, info.channels, info.mean, info.std, large), cfg.train.seed)


def device_crops(cfg: Config, large: int = 2) -> BatchMultiCrop | None:
    """The batch augmentation the trainer applies on its device, None when the loader makes the crops."""
    if cfg.data.augment_on != "device":
        return None
    info = data_info(cfg.data)
    return BatchMultiCrop(cfg.data, info.mean, info.std, large)


def crop_seed(seed: int, rank: int, step: int) -> int:
    """The seed of a device-made batch of crops: a function of the run's seed, the process and the step."""
    return (seed * 1_000_003 + rank * 2_147_483_647 + (step + 2) * 6_700_417) % (2 ** 63)


class TrainData:
    """One process's training input: its shard of the pretraining set per epoch (a DistributedSampler over
    full batches, shuffled by train.seed and the epoch), loaders that resume mid-epoch, and the crops of a
    batch on the training device (made there from raw images when data.augment_on=device)."""

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.device = cfg, rank, device
        self.dataset = train_set(cfg)
        self.make_crops = device_crops(cfg)
        self.sampler = DistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=True,
                                          seed=cfg.train.seed, drop_last=True)
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format

    def __len__(self) -> int:
        """Images of this process's shard per epoch."""
        return len(self.sampler)

    def batches(self, epoch: int, batch_size: int, skip: int = 0, crop_epoch: int | None = None,
                large_q_only: bool = False) -> Iterator[dict]:
        """The epoch's full batches of this shard, shuffled, minus the first `skip` batches (a resume).
        crop_epoch: the epoch the per-image crops are seeded with (default `epoch`); large_q_only: only the
        large q crops (the memory-bank fill)."""
        self.dataset.set_epoch(epoch if crop_epoch is None else crop_epoch)
        self.sampler.set_epoch(epoch)
        sampler = ResumableSampler(self.sampler, skip * batch_size)
        loader = make_loader(self.dataset, batch_size, self.cfg.data, sampler, drop_last=True,
                             pin=self.device.type == "cuda")
        self.dataset.large_q_only = large_q_only
        try:
            yield from loader
        finally:
            self.dataset.large_q_only = False

    def crops(self, batch: dict, step: int, large_q_only: bool = False) -> dict[str, list[torch.Tensor]]:
        """A batch's q (and k) crops on the device, in the model's memory format: the loader's, or made from
        the batch's raw images under a seed of (train.seed, rank, step)."""
        seed = crop_seed(self.cfg.train.seed, self.rank, step)
        return batch_crops(batch, self.make_crops, seed, self.device, self.memory_format, large_q_only)


def batch_crops(batch: dict, make_crops: BatchMultiCrop | None, seed: int, device: torch.device,
                memory_format: torch.memory_format, large_q_only: bool = False) -> dict[str, list[torch.Tensor]]:
    """A training batch's q (and k) crops on `device`: the loader's, or made there from the batch's raw
    images by `make_crops` (device_crops) under `seed` (crop_seed)."""
    if make_crops is None:
        views = {key: batch[key] for key in (("q",) if large_q_only else ("q", "k"))}
    else:
        views = make_crops(batch["image"].to(device, non_blocking=True), seed, large_q_only)
    return {key: [c.to(device, non_blocking=True, memory_format=memory_format) for c in crops]
            for key, crops in views.items()}


def clean_set(cfg: DataConfig, split: str, count: int = 0) -> CleanSet:
    """Clean evaluation images of a split (first `count` when count > 0)."""
    info = data_info(cfg)
    images = load_split(cfg, split).subset(count)
    return CleanSet(images, clean_transform(cfg.large_size, images.size, info.mean, info.std))


def make_loader(dataset: Dataset, batch_size: int, cfg: DataConfig, sampler: Sampler | None = None,
                drop_last: bool = False, pin: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=drop_last,
                      num_workers=cfg.workers, pin_memory=pin and cfg.pin_memory,
                      persistent_workers=False)
