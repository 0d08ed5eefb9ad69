"""The training loop's callbacks, one concern each, following the config (smog.loop.Callback):

- KnnMonitor: kNN top-1 of the method's encoder every eval.knn_every epochs and after the last one, or
  every eval.knn_every_minutes of training time;
- Logging: metrics.jsonl, TensorBoard and W&B (smog.runlog): a step record every train.log_every steps,
  the epoch records, the plots and the epoch line;
- Checkpointing: every train.checkpoint_every_steps steps and at every epoch's end;
- Profiling: train.profile steps under torch.profiler, into <run>/profile (smog.profile).
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from tqdm import tqdm

from smog import profile
from smog.config import Config
from smog.evaluation import knn_scores
from smog.loop import Callback

if TYPE_CHECKING:
    from smog.loop import Trainer

PROFILE_WARMUP = 2  # steps before profiling starts: the first steps pay one-off costs


def knn(trainer: "Trainer") -> dict[str, float]:
    """kNN top-1 of the method's encoder (every process extracts its share of the images)."""
    shard = (trainer.dist.rank, trainer.dist.world) if trainer.dist.world > 1 else None
    return knn_scores(trainer.method.encoder(), trainer.cfg, trainer.device, shard)


class KnnMonitor(Callback):
    """kNN into the epoch record after every eval.knn_every-th epoch and the last one (with train.minutes:
    after the last one only), and a "knn" record every eval.knn_every_minutes of training time."""

    def __init__(self, cfg: Config):
        self.every, self.every_s = cfg.eval.knn_every, 60.0 * cfg.eval.knn_every_minutes
        self.marks = 0  # minute marks passed

    def on_fit_start(self, trainer: "Trainer") -> None:
        if self.every_s:
            self.marks = int(trainer.clock.spent() // self.every_s)

    def on_step_end(self, trainer: "Trainer", loss: float) -> None:
        seconds = trainer.progress.seconds
        if not self.every_s or int(seconds // self.every_s) <= self.marks or trainer.done():
            return
        self.marks = int(seconds // self.every_s)
        scores = knn(trainer)
        if trainer.dist.main:
            trainer.log.write({"kind": "knn", "epoch": trainer.progress.epoch, "step": trainer.progress.step,
                               "minutes": seconds / 60.0, "knn": scores})

    def on_epoch_end(self, trainer: "Trainer", record: dict) -> None:
        finished = record["epoch"] + 1
        if trainer.budget is not None:
            due = trainer.done()
        else:
            due = finished == trainer.cfg.train.epochs or bool(self.every and finished % self.every == 0)
        if not due:
            return
        scores = knn(trainer)
        if trainer.dist.main:
            record["knn"] = scores
        if trainer.budget is not None:
            record["minutes"] = trainer.progress.seconds / 60.0


class Logging(Callback):
    """Step records (mean loss since the last one, lr, the method's step metrics) every train.log_every
    steps, epoch records, the epoch line and the plots (redrawn after the first epoch, then at most once every
    PLOT_EVERY_S seconds and at the end, so that short epochs are not spent drawing); rank 0 writes."""

    PLOT_EVERY_S = 60.0

    def __init__(self, cfg: Config):
        self.every, self.show = cfg.train.log_every, cfg.train.progress
        self.loss, self.steps = 0.0, 0
        self.plotted: float | None = None  # time.monotonic() of the last plot
        self.stale = False  # epoch records written since the last plot

    def on_step_end(self, trainer: "Trainer", loss: float) -> None:
        self.loss, self.steps = self.loss + loss, self.steps + 1
        if trainer.progress.step % self.every:
            return
        if trainer.dist.main:
            trainer.log.write({"kind": "step", "epoch": trainer.progress.epoch, "step": trainer.progress.step,
                               "loss": self.loss / self.steps, "lr": trainer.optimizer.param_groups[0]["lr"],
                               **trainer.method.step_metrics(trainer)})
        self.loss, self.steps = 0.0, 0

    def on_epoch_end(self, trainer: "Trainer", record: dict) -> None:
        if not trainer.dist.main:
            return
        trainer.log.write(record)
        self.stale = True
        if self.plotted is None or time.monotonic() - self.plotted >= self.PLOT_EVERY_S:
            self._plot(trainer)
        if self.show:
            tqdm.write(f"epoch {record['epoch'] + 1}: loss {record['loss']:.4f}, groups in use "
                       f"{record['nonempty']}, {record['seconds']:.1f}s" +
                       (f", kNN {record['knn']}" if "knn" in record else ""))

    def on_fit_end(self, trainer: "Trainer") -> None:
        if trainer.dist.main and self.stale:
            self._plot(trainer)

    def _plot(self, trainer: "Trainer") -> None:
        trainer.log.plot()
        self.plotted, self.stale = time.monotonic(), False


class Checkpointing(Callback):
    """A checkpoint every train.checkpoint_every_steps steps (0: none mid-epoch) and at every epoch's end."""

    def __init__(self, cfg: Config):
        self.every = cfg.train.checkpoint_every_steps

    def on_step_end(self, trainer: "Trainer", loss: float) -> None:
        if self.every and trainer.progress.step % self.every == 0:
            trainer.save()

    def on_epoch_end(self, trainer: "Trainer", record: dict) -> None:
        trainer.save()


class Profiling(Callback):
    """`steps` steps under torch.profiler after PROFILE_WARMUP steps: <run>/profile/phases.json and .txt
    (per-phase medians) and a trace for TensorBoard's profiler plugin; rank 0 profiles."""

    def __init__(self, steps: int):
        self.steps, self.seen, self.prof = steps, 0, None

    def on_step_end(self, trainer: "Trainer", loss: float) -> None:
        if not trainer.dist.main:
            return
        self.seen += 1
        folder = os.path.join(trainer.run_dir, "profile")
        if self.seen == PROFILE_WARMUP and self.prof is None:
            self.prof = profile.profiler(trainer.device, folder)
            self.prof.__enter__()
        elif self.prof is not None and self.seen == PROFILE_WARMUP + self.steps:
            self.prof.__exit__(None, None, None)
            table = profile.write(profile.phase_times(self.prof, trainer.device.type == "cuda"), folder)
            trainer.say(f"profile of {self.steps} steps in {folder} (phases.json, a TensorBoard trace):\n{table}")
            self.prof = None

    def on_fit_end(self, trainer: "Trainer") -> None:
        if self.prof is not None:  # the run ended before the profiled steps did
            self.prof.__exit__(None, None, None)
            self.prof = None


def default_callbacks(cfg: Config) -> list[Callback]:
    """kNN first (its scores go into the epoch record), then the log, then the checkpoint."""
    callbacks: list[Callback] = [KnnMonitor(cfg), Logging(cfg), Checkpointing(cfg)]
    if cfg.train.profile:
        callbacks.append(Profiling(cfg.train.profile))
    return callbacks
