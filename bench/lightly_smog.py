"""lightly's SMoG recipe, as in lightly's SMoG example and CIFAR-10 benchmark, on smog's data and backbone.

lightly's parts: SMoGProjectionHead / SMoGPredictionHead, SMoGPrototypes (one head, 300 groups, beta 0.99,
the gradient flowing into the updated groups), a 10000-row FIFO MemoryBankModule of the online z, scikit-learn KMeans on that bank
and a momentum-network reset every 300 steps (EMA 0.99 otherwise), the two views swapped every second
step, SGD lr 0.01 momentum 0.9 weight decay 1e-6 with a per-epoch cosine schedule. Shared with smog's run:
backbone, data and augmentations (one q-style and one k-style large crop per image, made where smog's run
makes them: data.augment_on), epochs, batch size, seed, threads, memory format.
"""
from __future__ import annotations

import copy
import time
from typing import Iterator

import torch
from torch import nn
from tqdm import tqdm

from smog.config import Config, config_from_dict, to_dict
from smog.data import batch_crops, crop_seed, device_crops, make_loader, train_set
from smog.evaluation import knn_scores
from smog.loop import build_model, pick_device

GROUPS, BANK_ROWS, RESET_EVERY, EMA, BETA, LR = 300, 10000, 300, 0.99, 0.99, 0.01


class LightlySMoG(nn.Module):
    """lightly's SMoG model around a given backbone (with `out_features`)."""

    def __init__(self, backbone: nn.Module, cfg: Config, rows: int):
        from lightly.models.modules.heads import SMoGPredictionHead, SMoGProjectionHead, SMoGPrototypes
        from lightly.models.modules.memory_bank import MemoryBankModule
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        dim = cfg.model.dim
        self.backbone = backbone
        self.projection_head = SMoGProjectionHead(backbone.out_features, cfg.model.proj_hidden, dim)
        self.prediction_head = SMoGPredictionHead(dim, cfg.model.pred_hidden, dim)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.groups = min(GROUPS, rows)
        self.memory_bank = MemoryBankModule(size=(min(BANK_ROWS, rows), dim))
        self.smog = SMoGPrototypes(torch.nn.functional.normalize(torch.rand(self.groups, dim), dim=1), beta=BETA)
        self.criterion = nn.CrossEntropyLoss()
        self.seed = cfg.train.seed

    def reset_group_features(self, seed: int) -> None:
        from sklearn.cluster import KMeans

        bank = self.memory_bank.bank.cpu().numpy()
        centers = KMeans(self.groups, random_state=seed, n_init="auto").fit(bank).cluster_centers_
        self.smog.set_group_features(torch.nn.functional.normalize(torch.from_numpy(centers).float(), dim=1))

    def trained_parameters(self) -> list[nn.Parameter]:
        return (list(self.backbone.parameters()) + list(self.projection_head.parameters())
                + list(self.prediction_head.parameters()))

    def training_step(self, x0: torch.Tensor, x1: torch.Tensor, step: int, total_steps: int = 0) -> torch.Tensor:
        """The loss of one step on views x0, x1 [B, C, H, W] (swapped on odd steps), after the step's momentum
        update or (every RESET_EVERY steps) group re-clustering and momentum reset; fills the memory bank.
        total_steps: unused (the recipe's rates are constant), there for the budget loop's one signature."""
        from lightly.models.utils import update_momentum

        if step % 2:
            x0, x1 = x1, x0
        if step > 0 and step % RESET_EVERY == 0:
            self.reset_group_features(self.seed + step)
            self.reset_momentum_weights()
        else:
            update_momentum(self.backbone, self.backbone_momentum, EMA)
            update_momentum(self.projection_head, self.projection_head_momentum, EMA)
        x0_encoded = self.projection_head(self.backbone(x0))
        x0_predicted = self.prediction_head(x0_encoded)
        x1_encoded = self.projection_head_momentum(self.backbone_momentum(x1))
        assignments = self.smog.assign_groups(x1_encoded)
        group_features = self.smog.get_updated_group_features(x0_encoded)
        logits = self.smog(x0_predicted, group_features, temperature=0.1)
        self.smog.set_group_features(group_features)
        self.memory_bank(x0_encoded, update=True)
        return self.criterion(logits, assignments)

    def reset_momentum_weights(self) -> None:
        from lightly.models.utils import deactivate_requires_grad

        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)


class LargeViews:
    """The data of the lightly-based methods: per epoch, in a seeded order, full batches of one q-style and
    one k-style large crop per image, made where smog's run makes them (data.augment_on)."""

    def __init__(self, cfg: Config, device: torch.device):
        cfg = config_from_dict(to_dict(cfg), ["data.small_crops=0"])
        self.cfg, self.device = cfg, device
        self.dataset = train_set(cfg, large=1)  # one view per set: no crops made for nothing
        self.make_crops = device_crops(cfg, large=1)
        self.fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.steps_per_epoch = len(self.dataset) // cfg.train.batch_size
        self.step = 0  # steps served so far: the crops' seed

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x0 [B, C, H, W], x1 [B, C, H, W]) pairs of one epoch."""
        self.dataset.set_epoch(epoch)
        order = torch.randperm(len(self.dataset), generator=self.generator).tolist()
        for batch in make_loader(self.dataset, self.cfg.train.batch_size, self.cfg.data, order, drop_last=True):
            views = batch_crops(batch, self.make_crops, crop_seed(self.cfg.train.seed, 0, self.step), self.device,
                                self.fmt)
            self.step += 1
            yield views["q"][0], views["k"][0]


def train_lightly(cfg: Config) -> dict:
    """Train lightly's recipe; returns {"knn": {...}, "seconds_per_epoch": [...]}."""
    device = pick_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    views = LargeViews(cfg, device)
    model = LightlySMoG(build_model(views.cfg).online.backbone, views.cfg, len(views.dataset))
    model = model.to(device, memory_format=views.fmt)
    optimizer = torch.optim.SGD(model.trained_parameters(), lr=LR, momentum=0.9, weight_decay=1e-6)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.train.epochs)
    seconds = []
    for epoch in range(cfg.train.epochs):
        started = time.perf_counter()
        for x0, x1 in tqdm(views.epoch(epoch), desc=f"lightly epoch {epoch + 1}/{cfg.train.epochs}",
                           total=views.steps_per_epoch, disable=not cfg.train.progress):
            loss = model.training_step(x0, x1, views.step - 1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
        seconds.append(time.perf_counter() - started)
    return {"knn": knn_scores(model.backbone, cfg, device), "seconds_per_epoch": seconds}
