"""The paper's linear evaluation (the authors' eval_linear.py): a linear layer on the frozen backbone (BatchNorm
in eval mode) trained on augmented images, SGD with momentum 0.9 and a per-epoch cosine learning rate, with
top-1 / top-5 on centre crops after every epoch. The authors' script reports the best epoch's top-1 (and that
epoch's top-5); the last epoch's is reported beside it. Under torchrun every process takes its share of the images
(DistributedSampler), the layer is DDP-wrapped, and the test counts are all-reduced.

Views at s = data.large_size (224 for ImageNet): training RandomResizedCrop(s) (scale 0.08-1) + horizontal
flip; test Resize(round(s * 256 / 224)) + CenterCrop(s), the authors' 256/224 ratio at any size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Subset
from torchvision.transforms import v2

from smog.config import Config
from smog.data import CleanSet, ImageSet, data_info, load_split, make_loader
from smog.dist import DistInfo


def views(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[v2.Compose, v2.Compose]:
    """(training view, test view) of uint8 images [C, H, W] at `size` px, normalised."""
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    train = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *tail])
    test = v2.Compose([v2.Resize(int(round(size * 256 / 224)), antialias=True), v2.CenterCrop(size), *tail])
    return train, test


class SeededSet(Dataset):
    """(augmented image, label) items, the augmentation seeded by (seed, epoch, index): the same crops
    whichever process or batch a sample lands in."""

    def __init__(self, images: ImageSet, transform: v2.Compose, seed: int):
        self.images, self.transform, self.seed, self.epoch = images, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.images[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + (self.epoch + 1) * 2_147_483 + index) % (2 ** 63))
            return self.transform(image), label


def _all_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if info.world > 1:
        dist.all_reduce(t)
    return t.tolist()


def _scores(layer: nn.Module, feats, loader, classes: int, info: DistInfo, device: torch.device) -> tuple[float, float]:
    """(top-1, top-5) in percent of `layer` on the test images, counted over every process."""
    correct1 = correct5 = count = 0
    with torch.no_grad():
        for x, y in loader:
            top = layer(feats(x)).topk(min(5, classes), dim=1).indices.cpu()
            correct1 += int((top[:, 0] == y).sum())
            correct5 += int((top == y[:, None]).any(1).sum())
            count += len(y)
    correct1, correct5, count = _all_sum([correct1, correct5, count], info, device)
    return 100.0 * correct1 / count, 100.0 * correct5 / count


def paper_linear(backbone: nn.Module, cfg: Config, device: torch.device, info: DistInfo, epochs: int, lr: float,
                 weight_decay: float, batch_size: int) -> dict:
    """Train the linear layer for `epochs` on this process's share (`batch_size` images per process and step),
    testing it after every epoch; returns {"best": {"epoch", "top1", "top5"}, "last": {...}, "top1_per_epoch",
    "train_loss" (last epoch, mean over all samples)}: "best" is the epoch of highest top-1 (the first of
    equals), the figure the authors' eval_linear.py reports; "top5" only with more than 5 classes; epochs
    count from 1. A collective call when info.world > 1."""
    stats = data_info(cfg.data)
    train_view, test_view = views(cfg.data.large_size, stats.mean, stats.std)
    train_images, test_images = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    classes = int(max(train_images.labels.max(), test_images.labels.max())) + 1
    train_set = SeededSet(train_images, train_view, cfg.train.seed)
    sampler = DistributedSampler(train_set, num_replicas=info.world, rank=info.rank, shuffle=True, seed=cfg.train.seed)
    loader = make_loader(train_set, batch_size, cfg.data, sampler, pin=device.type == "cuda")
    test = Subset(CleanSet(test_images, test_view), range(info.rank, len(test_images), info.world))
    test_loader = make_loader(test, batch_size, cfg.data, pin=device.type == "cuda")

    backbone = backbone.to(device).eval().requires_grad_(False)
    torch.manual_seed(cfg.train.seed)  # the same layer on every process
    layer = nn.Linear(backbone.out_features, classes).to(device)
    nn.init.normal_(layer.weight, std=0.01)
    nn.init.zeros_(layer.bias)
    model = layer
    if info.world > 1:
        model = DistributedDataParallel(layer, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    autocast = cfg.train.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()

    def feats(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            return backbone(x.to(device, non_blocking=True)).float()

    loss_sum, seen, per_epoch = 0.0, 0, []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        loss_sum, seen = 0.0, 0
        for x, y in loader:
            y = y.to(device)
            loss = F.cross_entropy(model(feats(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum, seen = loss_sum + float(loss.detach()) * len(y), seen + len(y)
        per_epoch.append(_scores(layer, feats, test_loader, classes, info, device))
        schedule.step()

    loss_sum, seen = _all_sum([loss_sum, seen], info, device)
    best = max(range(epochs), key=lambda e: (per_epoch[e][0], -e))

    def entry(e: int) -> dict:
        top1, top5 = per_epoch[e]
        return {"epoch": e + 1, "top1": top1, **({"top5": top5} if classes > 5 else {})}

    return {"best": entry(best), "last": entry(epochs - 1), "top1_per_epoch": [t for t, _ in per_epoch],
            "train_loss": loss_sum / max(1.0, seen)}
