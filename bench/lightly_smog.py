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

import torch
from torch import nn
from tqdm import tqdm

from smog.config import Config
from smog.data import batch_crops, crop_seed, device_crops, make_loader, train_set
from smog.evaluation import knn_scores
from smog.trainer import build_model, pick_device

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

    def reset_group_features(self, seed: int) -> None:
        from sklearn.cluster import KMeans

        bank = self.memory_bank.bank.cpu().numpy()
        centers = KMeans(self.groups, random_state=seed, n_init="auto").fit(bank).cluster_centers_
        self.smog.set_group_features(torch.nn.functional.normalize(torch.from_numpy(centers).float(), dim=1))

    def reset_momentum_weights(self) -> None:
        from lightly.models.utils import deactivate_requires_grad

        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)


def train_lightly(cfg: Config) -> dict:
    """Train lightly's recipe; returns {"knn": {...}, "seconds_per_epoch": [...]}."""
    from lightly.models.utils import update_momentum

    device = pick_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    cfg = copy.deepcopy(cfg)
    cfg.data.small_crops = 0
    dataset = train_set(cfg, large=1)  # one view per set: no crops made for nothing
    make_crops = device_crops(cfg, large=1)
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = LightlySMoG(build_model(cfg).online.backbone, cfg, len(dataset)).to(device, memory_format=fmt)
    params = (list(model.backbone.parameters()) + list(model.projection_head.parameters())
              + list(model.prediction_head.parameters()))
    optimizer = torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=1e-6)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.train.epochs)
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(cfg.train.seed)
    step, seconds = 0, []
    for epoch in range(cfg.train.epochs):
        dataset.set_epoch(epoch)
        order = torch.randperm(len(dataset), generator=generator).tolist()
        loader = make_loader(dataset, cfg.train.batch_size, cfg.data, order, drop_last=True)
        started = time.perf_counter()
        for batch in tqdm(loader, desc=f"lightly epoch {epoch + 1}/{cfg.train.epochs}", disable=not cfg.train.progress):
            views = batch_crops(batch, make_crops, crop_seed(cfg.train.seed, 0, step), device, fmt)
            x0, x1 = views["q"][0], views["k"][0]
            if step % 2:
                x0, x1 = x1, x0
            if step > 0 and step % RESET_EVERY == 0:
                model.reset_group_features(cfg.train.seed + step)
                model.reset_momentum_weights()
            else:
                update_momentum(model.backbone, model.backbone_momentum, EMA)
                update_momentum(model.projection_head, model.projection_head_momentum, EMA)
            x0_encoded = model.projection_head(model.backbone(x0))
            x0_predicted = model.prediction_head(x0_encoded)
            x1_encoded = model.projection_head_momentum(model.backbone_momentum(x1))
            assignments = model.smog.assign_groups(x1_encoded)
            group_features = model.smog.get_updated_group_features(x0_encoded)
            logits = model.smog(x0_predicted, group_features, temperature=0.1)
            model.smog.set_group_features(group_features)
            loss = criterion(logits, assignments)
            model.memory_bank(x0_encoded, update=True)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        schedule.step()
        seconds.append(time.perf_counter() - started)
    return {"knn": knn_scores(model.backbone, cfg, device), "seconds_per_epoch": seconds}
