"""The methods of `bench/accuracy --budget-minutes`, each trained for one smog.budget.Budget of training time.

smog: smog's Trainer (Trainer.fit with the budget). The lightly-based methods share one loop (train_lightly_for)
over smog's data and crops maker (bench.lightly_smog.LargeViews: one q-style and one k-style large crop
per image, data.augment_on), backbone (cfg.model.backbone / width at train.seed's initial weights), batch
size and threads; their learning rates follow smog.schedules.learning_rate's cosine (no warm-up, to 0)
and BYOL's momentum smog.schedules.ema_rate, laid out over the budget's time (Budget.total_steps):

- lightly-smog: bench.lightly_smog's recipe (SGD lr 0.01, momentum 0.9, weight decay 1e-6).
- byol: lightly's CIFAR-10 benchmark (benchmarks/cifar10 of the lightly repository, lightly 1.5-1.6):
  BYOLProjectionHead(F, 1024, 256), BYOLPredictionHead(256, 1024, 256), symmetric NegativeCosineSimilarity
  0.5 (D(p0, z1) + D(p1, z0)), momentum network by lightly.models.utils.update_momentum at a rate rising
  0.996 -> 1 on a cosine; SGD lr 0.06 x batch / 128, momentum 0.9, weight decay 5e-4, cosine to 0.
- swav: the same benchmark: SwaVProjectionHead(F, 512, 128), L2-normalised output, SwaVPrototypes(128,
  512) normalised before every step, SwaVLoss() (temperature 0.1, 3 Sinkhorn iterations, epsilon 0.05)
  over the two large crops, no queue; Adam lr 1e-3 x batch / 128, weight decay 1e-6, cosine to 0.
"""
from __future__ import annotations

import copy
import dataclasses
import os

import torch
from torch import nn

from bench.lightly_smog import LR as LIGHTLY_SMOG_LR
from bench.lightly_smog import LargeViews, LightlySMoG
from smog import checkpoint
from smog.budget import Budget
from smog.config import Config, MethodConfig, OptimConfig
from smog.evaluation import knn_scores
from smog.schedules import ema_rate, learning_rate
from smog.loop import Trainer, build_model

LIGHTLY_METHODS = ("lightly-smog", "byol", "swav")
BYOL_EMA = MethodConfig(ema_start=0.996, ema_end=1.0)


class BYOL(nn.Module):
    """lightly's BYOL modules around a backbone (with `out_features`)."""

    def __init__(self, backbone: nn.Module):
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(backbone.out_features, 1024, 256)
        self.prediction_head = BYOLPredictionHead(256, 1024, 256)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()

    def trained_parameters(self) -> list[nn.Parameter]:
        return (list(self.backbone.parameters()) + list(self.projection_head.parameters())
                + list(self.prediction_head.parameters()))

    def training_step(self, x0: torch.Tensor, x1: torch.Tensor, step: int, total_steps: int) -> torch.Tensor:
        """The symmetric loss on views x0, x1 [B, C, H, W], after the momentum update of the step."""
        from lightly.models.utils import update_momentum

        rate = ema_rate(BYOL_EMA, step, total_steps)
        update_momentum(self.backbone, self.backbone_momentum, rate)
        update_momentum(self.projection_head, self.projection_head_momentum, rate)
        p0, p1 = (self.prediction_head(self.projection_head(self.backbone(x))) for x in (x0, x1))
        with torch.no_grad():
            z0, z1 = (self.projection_head_momentum(self.backbone_momentum(x)) for x in (x0, x1))
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))


class SwAV(nn.Module):
    """lightly's SwaV modules around a backbone (with `out_features`)."""

    def __init__(self, backbone: nn.Module):
        from lightly.loss import SwaVLoss
        from lightly.models.modules.heads import SwaVProjectionHead, SwaVPrototypes

        super().__init__()
        self.backbone = backbone
        self.projection_head = SwaVProjectionHead(backbone.out_features, 512, 128)
        self.prototypes = SwaVPrototypes(128, 512)
        self.criterion = SwaVLoss()

    def trained_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def training_step(self, x0: torch.Tensor, x1: torch.Tensor, step: int, total_steps: int) -> torch.Tensor:
        """The swapped-prediction loss of views x0, x1 [B, C, H, W] (high resolution both, no low)."""
        self.prototypes.normalize()
        scores = [self.prototypes(nn.functional.normalize(self.projection_head(self.backbone(x)), dim=1))
                  for x in (x0, x1)]
        return self.criterion(scores, [])


def lightly_method(name: str, cfg: Config, rows: int) -> tuple[nn.Module, torch.optim.Optimizer, OptimConfig]:
    """(model, optimizer, its schedule as an OptimConfig) of a lightly-based method at train.seed's weights."""
    backbone = build_model(cfg).online.backbone
    scale = cfg.train.batch_size / 128  # lightly's lr_factor
    cosine = OptimConfig(warmup_epochs=0.0, final_lr=0.0)
    if name == "lightly-smog":
        model = LightlySMoG(backbone, cfg, rows)
        optimizer = torch.optim.SGD(model.trained_parameters(), lr=LIGHTLY_SMOG_LR, momentum=0.9, weight_decay=1e-6)
        return model, optimizer, dataclasses.replace(cosine, lr=LIGHTLY_SMOG_LR)
    if name == "byol":
        model = BYOL(backbone)
        optimizer = torch.optim.SGD(model.trained_parameters(), lr=0.06 * scale, momentum=0.9, weight_decay=5e-4)
        return model, optimizer, dataclasses.replace(cosine, lr=0.06 * scale)
    if name == "swav":
        model = SwAV(backbone)
        optimizer = torch.optim.Adam(model.trained_parameters(), lr=1e-3 * scale, weight_decay=1e-6)
        return model, optimizer, dataclasses.replace(cosine, lr=1e-3 * scale)
    raise ValueError(f"method must be one of {', '.join(LIGHTLY_METHODS)}, got {name!r}")


def train_lightly_for(name: str, cfg: Config, budget: Budget, device: torch.device, run_dir: str) -> dict:
    """Train lightly-based method `name` until `budget` is spent (checked after every step), kNN when the
    budget says and at the end; its state goes to run_dir/model.pt. Returns {"backbone", "steps", "epochs",
    "lr_progress" (step / total_steps at the last step)}."""
    views = LargeViews(cfg, device)
    model, optimizer, schedule = lightly_method(name, views.cfg, len(views.dataset))
    model = model.to(device, memory_format=views.fmt)
    step, epoch, total = 0, 0, 1
    budget.start()
    while not budget.over():
        for x0, x1 in views.epoch(epoch):
            total = budget.total_steps(step)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(schedule, step, views.steps_per_epoch, total)
            loss = model.training_step(x0, x1, step, total)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if budget.over():
                break
            if budget.eval_due():
                with budget.paused():
                    budget.record(step, knn_scores(model.backbone, cfg, device))
        epoch += 1
    budget.stop()
    budget.record(step, knn_scores(model.backbone, cfg, device))
    checkpoint.save({"step": step, "method": name, "model": model.state_dict()}, os.path.join(run_dir, "model.pt"))
    return {"backbone": model.backbone, "steps": step, "epochs": step / views.steps_per_epoch,
            "lr_progress": step / total}


def train_smog_for(cfg: Config, budget: Budget, run_dir: str) -> dict:
    """smog's Trainer until `budget` is spent; its checkpoint (`smog eval knn` reads it) goes to
    run_dir/checkpoint.pt. Returns as train_lightly_for."""
    cfg = copy.deepcopy(cfg)
    cfg.train.out_dir, cfg.train.run_name = os.path.dirname(run_dir), os.path.basename(run_dir)
    trainer = Trainer(cfg)
    trainer.fit(budget=budget)
    budget.stop()  # training ended: closing the log is not training time
    trainer.log.close()
    if not budget.points or budget.points[-1]["step"] != trainer.step:  # the bank fill spent the whole budget
        budget.record(trainer.step, trainer.knn())
    return {"backbone": trainer.model.online.backbone, "steps": trainer.step,
            "epochs": trainer.step / trainer.steps_per_epoch, "lr_progress": trainer.step / trainer.total_steps}
