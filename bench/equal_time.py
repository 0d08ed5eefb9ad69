"""The methods of `bench/accuracy --budget-minutes`, each trained for the same minutes of training time.

smog: smog's Trainer with train.minutes (and eval.knn_every_minutes for the curve). The lightly-based methods
share one loop (train_lightly_for) on the same clock (smog.budget's Clock and Budget),
over smog's data and crops maker (bench.lightly_smog.LargeViews: one q-style and one k-style large crop
per image, data.augment_on), backbone (cfg.model.backbone / width at train.seed's initial weights), batch
size and threads; their learning rates follow smog.schedules.learning_rate's cosine (no warm-up, to 0)
and BYOL's momentum smog.schedules.ema_rate, laid out over the time (Budget.total_steps):

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
from smog.budget import Budget, Clock
from smog.callbacks import knn
from smog.config import Config, MethodConfig, OptimConfig, config_from_dict, to_dict
from smog.evaluation import knn_scores
from smog.loop import Trainer
from smog.method import build_model
from smog.schedules import ema_rate, learning_rate

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
    backbone = build_model(cfg).encoder()
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


class Timed:
    """The lightly loop's clock: `minutes` of training time, the schedules' length over it, and kNN points
    every `every_minutes` of it (0: at the end only), as smog's loop keeps them."""

    def __init__(self, minutes: float, every_minutes: float):
        self.clock, self.budget = Clock(), Budget(minutes)
        self.every, self.marks = 60.0 * every_minutes, 0
        self.points: list[dict] = []

    def over(self) -> bool:
        return self.budget.over(self.clock.spent())

    def eval_due(self) -> bool:
        spent = self.clock.spent()
        if not self.every or self.over() or int(spent // self.every) <= self.marks:
            return False
        self.marks = int(spent // self.every)
        return True

    def record(self, step: int, scores: dict[str, float]) -> None:
        self.points.append({"minutes": self.clock.spent() / 60.0, "step": step, "knn": scores})


def train_lightly_for(name: str, cfg: Config, minutes: float, every_minutes: float, device: torch.device,
                      run_dir: str) -> dict:
    """Train lightly-based method `name` for `minutes` of training time (checked after every step), kNN every
    `every_minutes` and at the end; its state goes to run_dir/model.pt. Returns {"backbone", "steps", "epochs",
    "lr_progress" (step / total_steps at the last step), "curve" (the kNN points), "train_seconds"}."""
    views = LargeViews(cfg, device)
    model, optimizer, schedule = lightly_method(name, views.cfg, len(views.dataset))
    model = model.to(device, memory_format=views.fmt)
    timed = Timed(minutes, every_minutes)
    step, epoch, total = 0, 0, 1
    timed.clock.start()
    while not timed.over():
        for x0, x1 in views.epoch(epoch):
            total = timed.budget.total_steps(step, timed.clock.spent())
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(schedule, step, views.steps_per_epoch, total)
            loss = model.training_step(x0, x1, step, total)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if timed.over():
                break
            if timed.eval_due():
                with timed.clock.paused():
                    timed.record(step, knn_scores(model.backbone, cfg, device))
        epoch += 1
    timed.clock.stop()
    timed.record(step, knn_scores(model.backbone, cfg, device))
    checkpoint.save({"step": step, "method": name, "model": model.state_dict()}, os.path.join(run_dir, "model.pt"))
    return {"backbone": model.backbone, "steps": step, "epochs": step / views.steps_per_epoch,
            "lr_progress": step / total, "curve": timed.points, "train_seconds": timed.clock.spent()}


def train_smog_for(cfg: Config, minutes: float, every_minutes: float, run_dir: str) -> dict:
    """smog's Trainer for `minutes` of training time (train.minutes, eval.knn_every_minutes); its checkpoint
    (`smog eval knn` reads it) goes to run_dir/checkpoint.pt. Returns as train_lightly_for."""
    cfg = config_from_dict(to_dict(cfg), [f"train.out_dir={os.path.dirname(run_dir)}",
                                          f"train.run_name={os.path.basename(run_dir)}", f"train.minutes={minutes}",
                                          f"eval.knn_every_minutes={every_minutes}"])
    trainer = Trainer(cfg)
    final = trainer.fit()
    trainer.log.close()
    p = trainer.progress
    curve = [{k: r[k] for k in ("minutes", "step", "knn")} for r in trainer.log.records() if r["kind"] == "knn"]
    if "knn" not in final:  # the bank fill spent the whole budget: no epoch ran
        final = {"minutes": trainer.clock.spent() / 60.0, "knn": knn(trainer)}
    curve.append({"minutes": final["minutes"], "step": p.step, "knn": final["knn"]})
    return {"backbone": trainer.method.encoder(), "steps": p.step, "epochs": p.step / p.steps_per_epoch,
            "lr_progress": p.step / p.total_steps, "curve": curve, "train_seconds": 60.0 * curve[-1]["minutes"]}
