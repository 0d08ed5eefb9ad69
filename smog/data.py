"""Datasets as uint8 image tensors, the multi-crop training set and the loaders.

`load_split(cfg, "train" | "test")` returns an ImageSet (items: (uint8 [C, H, W], label)). A dataset
that is not where it was looked for raises DatasetNotFound saying where and how to get it.
Augmentations are seeded per (seed, epoch, dataset index), so a sample's crops do not depend on the
worker, the batch or an interruption: that is what makes a mid-epoch resume exact.

Image folders are decoded by Pillow, every mode to RGB. A file that cannot be decoded (empty, truncated,
not an image, over Pillow's decompression-bomb limit) never stops a loader: the next readable image of the
set stands in for it, so a batch keeps its size and the order stays a function of the seed (the same in a
worker and in the main process, and on resume). A training item says which image stood in ("source"
beside "index"); SkippedImages names each such file once, counts them per epoch and stops the run past
data.max_bad_fraction of the set.
"""
from __future__ import annotations

import gzip
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from smog.augment.on_device import BatchMultiCrop
from smog.config import Config, ConfigError, DataConfig
from smog.augment.per_image import MultiCrop, clean_transform
from smog.dist import DistInfo

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


class UnreadableImage(OSError):
    """An image file that cannot be decoded: `path` and `reason` (empty, truncated, not an image, a bomb)."""

    def __init__(self, path: str, reason: str = ""):
        super().__init__(f"{path}: {reason}" if reason else path)
        self.path, self.reason = path, reason


class UnreadableData(ConfigError):
    """More of the training images are unreadable than data.max_bad_fraction allows."""


class UnreadableImageWarning(UserWarning):
    """An evaluation image was unreadable and the next readable one stood in for it."""


class ImageSet(Dataset):
    """uint8 images (a tensor [N, C, H, W], or a loader of index -> [C, H, W]) with int labels [N].

    size: the images' side in pixels, 0 when it varies (image folders).
    """

    def __init__(self, images: torch.Tensor | Callable[[int], torch.Tensor], labels: torch.Tensor, size: int):
        self.images, self.labels, self.size = images, labels, size

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> torch.Tensor:
        """The image at `index`; UnreadableImage when its file cannot be decoded."""
        return self.images[index] if isinstance(self.images, torch.Tensor) else self.images(index)

    def first_readable(self, index: int) -> tuple[torch.Tensor, int]:
        """(image, source): the image at `index` (source = index) or, when its file is unreadable, the first
        readable one after it (index + 1, ..., round to 0): a stand-in fixed by the set alone. UnreadableImage
        when no image of the set decodes."""
        index = range(len(self))[index]  # IndexError past the end (how iterating a Dataset stops)
        for step in range(len(self)):
            source = (index + step) % len(self)
            try:
                return self.image(source), source
            except UnreadableImage:
                continue
        raise UnreadableImage(f"image {index}", f"no image of the {len(self)} in the set decodes")

    def skipped(self, index: int, source: int) -> list[int]:
        """The indices whose files first_readable(index) passed over to reach `source`."""
        return [i % len(self) for i in range(index, index + (source - index) % len(self))]

    def failure(self, index: int) -> UnreadableImage | None:
        """Why the image at `index` cannot be decoded (None when it can)."""
        try:
            self.image(index)
        except UnreadableImage as error:
            return error
        return None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """(image, label); the image that stands in (first_readable), with its own label, for an unreadable
        one, with an UnreadableImageWarning naming the file (shown once per file and process)."""
        image, source = self.first_readable(index)
        if skipped := self.skipped(range(len(self))[index], source):
            named = "; ".join(str(self.failure(i)) for i in skipped)
            warnings.warn(f"skipped unreadable image {named}; image {source} stands in", UnreadableImageWarning,
                          stacklevel=2)
        return image, int(self.labels[source])

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
    """index -> uint8 RGB image [3, H, W] decoded from its file by Pillow (picklable, for worker processes).

    Pillow's convert makes RGB of every mode (CMYK, greyscale, palette, LA and RGBA: transparency dropped,
    the colour under it kept), but for 16-bit greyscale (modes I;16*, I), taken by its top 8 bits where
    convert would clip it to white. A file that does not decode is an UnreadableImage saying why; Pillow's
    decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS) stays on and a file past it is refused as one.
    """

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __call__(self, index: int) -> torch.Tensor:
        from PIL import Image

        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return _rgb(image)
        except Image.DecompressionBombError as error:
            raise UnreadableImage(path, f"refused as a decompression bomb by Pillow's limit: {error}") from None
        except Exception as error:  # noqa: BLE001 (whatever a broken file makes a decoder raise: the file is unreadable)
            empty = os.path.isfile(path) and os.path.getsize(path) == 0
            raise UnreadableImage(path, "empty file (0 bytes)" if empty else
                                  f"{type(error).__name__}: {error}") from None


def _rgb(image) -> torch.Tensor:
    """A Pillow image as uint8 RGB [3, H, W] (see _FileImages)."""
    from torchvision.transforms.functional import pil_to_tensor

    if image.mode == "I" or image.mode.startswith("I;16"):
        grey = np.asarray(image).astype(np.int64).clip(0, 65535) >> 8
        return torch.from_numpy(grey.astype(np.uint8)).expand(3, -1, -1).contiguous()
    return pil_to_tensor(image.convert("RGB"))


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
        """source: the index of the image the item holds, index itself unless that file is unreadable
        (ImageSet.first_readable); the crops are seeded by `index` either way."""
        image, source = self.images.first_readable(index)
        if self.transform is None:
            return {"image": image, "index": index, "source": source}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + (self.epoch + 1) * 2_147_483 + index) % (2 ** 63))
            crops = self.transform(image, self.large_q_only)
        return {**crops, "index": index, "source": source}


class SkippedImages:
    """The training set's unreadable files as the batches a process takes report them: an item whose
    "source" is not its "index" stood in for the files from index up to source (MultiCropSet).

    note(batch) names each file once on stderr, with Pillow's reason, and raises UnreadableData as soon as
    the files this process knows pass data.max_bad_fraction of the set. end_epoch() pools every process's
    files (a collective call when there are several), applies the same limit to them all and returns how
    many distinct files the epoch met (the epoch record's "bad_images"). After a resume a file is named
    again when next met.
    """

    def __init__(self, dataset: MultiCropSet, max_fraction: float, dist: DistInfo | None = None):
        self.images, self.max_fraction, self.dist = dataset.images, max_fraction, dist
        self.known: dict[int, str] = {}  # index -> "path: reason"
        self.this_epoch: set[int] = set()

    def note(self, batch: dict) -> None:
        moved = batch["source"] != batch["index"]
        for index, source in zip(batch["index"][moved].tolist(), batch["source"][moved].tolist()):
            for bad in self.images.skipped(index, source):
                self.this_epoch.add(bad)
                if bad not in self.known:
                    self.known[bad] = str(self.images.failure(bad))
                    rank = f" (rank {self.dist.rank})" if self.dist is not None and self.dist.world > 1 else ""
                    print(f"smog train{rank}: skipped unreadable image {self.known[bad]}; the next readable image "
                          f"stands in for it", file=sys.stderr, flush=True)
        self._check()

    def end_epoch(self) -> int:
        if self.dist is not None and self.dist.world > 1:
            every: list = [None] * self.dist.world
            torch.distributed.all_gather_object(every, (self.known, self.this_epoch))
            for known, met in every:
                self.known.update(known)
                self.this_epoch |= met
        count, self.this_epoch = len(self.this_epoch), set()
        self._check()
        return count

    def _check(self) -> None:
        if len(self.known) > self.max_fraction * len(self.images):
            examples = "; ".join(list(self.known.values())[:5])
            raise UnreadableData(
                f"{len(self.known)} of the {len(self.images)} training images are unreadable, more than "
                f"data.max_bad_fraction={self.max_fraction:g} of them; for example {examples}"
                f"{'; ...' if len(self.known) > 5 else ''}. Repair or remove them, or raise data.max_bad_fraction")


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
    full batches, shuffled by train.seed and the epoch), loaders that resume mid-epoch, the crops of a batch
    on the training device (made there from raw images when data.augment_on=device), and the unreadable
    files its batches met (`skipped`)."""

    def __init__(self, cfg: Config, dist: DistInfo, device: torch.device):
        self.cfg, self.rank, self.device = cfg, dist.rank, device
        self.dataset = train_set(cfg)
        self.skipped = SkippedImages(self.dataset, cfg.data.max_bad_fraction, dist)  # unreadable files met
        self.make_crops = device_crops(cfg)
        self.sampler = DistributedSampler(self.dataset, num_replicas=dist.world, rank=dist.rank, shuffle=True,
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
            for batch in loader:
                self.skipped.note(batch)  # names unreadable files; stops the run past data.max_bad_fraction
                yield batch
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
