"""Trainers for tests: built from a recipe, their method's memory bank filled and epoch 0 clustered."""
from __future__ import annotations

from smog.config import load_config
from smog.loop import Trainer


def make_trainer(tmp_path, *overrides: str, config: str = "digits") -> Trainer:
    """A trainer of `config` (digits: 256 images unless overridden) writing under tmp_path."""
    return Trainer(load_config(config, [f"train.out_dir={tmp_path}", "data.train_subset=256", *overrides]))


def ready(trainer: Trainer) -> Trainer:
    """The method's fit and epoch-0 hooks run: the bank filled, the groups clustered from it."""
    trainer.method.on_fit_start(trainer)
    trainer.method.on_epoch_start(trainer, trainer.progress.epoch)
    return trainer


def first_batch(trainer: Trainer) -> dict:
    """The first batch of the trainer's current epoch."""
    return next(iter(trainer.data.batches(trainer.progress.epoch, trainer.batch_size)))
