"""The training loop: generic. The method (smog.method.SMoG) does everything specific to it through hooks;
callbacks (smog.callbacks) checkpoint, monitor kNN, log and profile.

One step, from batch to optimiser step, each phase named for the profiler (smog.profile):
  loader (next batch) -> learning rate of the step -> method.training_step (crops, forwards, loss,
  backward) -> a non-finite loss stops the run -> gradient clipping and optimizer.step ("optimizer") ->
  method.after_optimizer_step ("after step") -> callbacks.on_step_end.
Around the steps: method.on_fit_start (before the first epoch), method.on_epoch_start, and at each epoch's
end its record (loss, seconds, the method's metrics) through callbacks.on_epoch_end.

The run ends after train.epochs, or, with train.minutes, when that much training time is spent (the
schedules laid over it: smog.budget). Training time stops while callbacks evaluate, log or save, and every
decision taken on it uses rank 0's clock, broadcast, so that every process takes the same steps.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from smog import checkpoint
from smog.batchnorm import synchronise
from smog.budget import Budget, Clock
from smog.config import Config, ConfigError, check_processes, check_shard, to_dict
from smog.data import TrainData
from smog.dist import init_from_env
from smog.method import build_model
from smog.optim import build_optimizer
from smog.profile import STEP, phase
from smog.runlog import RunLog
from smog.schedules import learning_rate


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stopped and its last good checkpoint is kept."""


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Progress:
    """Where the run is; the schedules read step / total_steps."""

    epoch: int = 0
    step: int = 0  # optimiser steps done
    step_in_epoch: int = 0
    steps_per_epoch: int = 0
    total_steps: int = 0  # the schedules' length (with train.minutes re-estimated every step)
    seconds: float = 0.0  # training time at the last step, rank 0's (the same on every process)


class Method(Protocol):
    """What the loop needs of a method (smog.method.SMoG is one). It is an nn.Module whose state_dict is the
    model; `online` is the network the optimiser trains (DDP-wrapped by the loop on several processes)."""

    online: nn.Module

    def setup(self, trainer: "Trainer") -> None: ...

    def on_fit_start(self, trainer: "Trainer") -> dict | None: ...

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> dict | None: ...

    def training_step(self, trainer: "Trainer", batch: dict) -> torch.Tensor: ...

    def after_optimizer_step(self, trainer: "Trainer") -> None: ...

    def step_metrics(self, trainer: "Trainer") -> dict: ...

    def progress_fields(self, trainer: "Trainer") -> dict: ...

    def epoch_metrics(self) -> dict: ...

    def encoder(self) -> nn.Module: ...

    def method_state(self) -> dict: ...

    def load_method_state(self, state: dict) -> None: ...

    def rank_state(self) -> dict: ...

    def load_rank_state(self, state: dict | None) -> None: ...


class Callback:
    """What the loop calls around the steps; every hook is optional. Hooks run with the training clock
    stopped, on every process."""

    def on_fit_start(self, trainer: "Trainer") -> None: ...

    def on_step_end(self, trainer: "Trainer", loss: float) -> None: ...

    def on_epoch_end(self, trainer: "Trainer", record: dict) -> None: ...

    def on_fit_end(self, trainer: "Trainer") -> None: ...


class Trainer:
    """Holds the processes, the data, the method, the optimiser and the clock; `fit()` runs (or continues)
    the run. The default callbacks (smog.callbacks.default_callbacks) follow the config."""

    def __init__(self, cfg: Config, callbacks: list[Callback] | None = None):
        self.cfg = cfg
        self.device = pick_device(cfg.train.device)
        self.dist = init_from_env(self.device.type, timeout_s=cfg.train.dist_timeout_s)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        check_processes(cfg, self.dist.world, self.device.type)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.run_dir = os.path.join(cfg.train.out_dir, cfg.train.run_name or cfg.name)

        self.data = TrainData(cfg, self.dist, self.device)
        check_shard(cfg, len(self.data), self.dist.world)
        self.batch_size = cfg.train.batch_size // self.dist.world  # per process and optimiser step
        self.sub_batch = self.batch_size // cfg.train.accumulate  # per process and forward pass
        steps = len(self.data) // self.batch_size
        self.progress = Progress(steps_per_epoch=steps, total_steps=steps * cfg.train.epochs)

        self.method: Method = synchronise(build_model(cfg).to(self.device), cfg.model.sync_bn_group)
        if cfg.model.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        self.online = self.method.online  # what the method's forward runs: DDP-wrapped, compiled
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.online = DistributedDataParallel(self.method.online, device_ids=ids)
        if cfg.model.compile:
            self.online = torch.compile(self.online)
        self.optimizer = build_optimizer(self.method.online, cfg.optim)
        self.method.setup(self)

        self.bf16 = cfg.train.bf16 and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.clock = Clock()
        self.budget = Budget(cfg.train.minutes) if cfg.train.minutes else None
        self.meter = {"loss": 0.0, "steps": 0}
        self.files = checkpoint.RunFiles(self.run_dir, self.dist.rank, self.dist.world, self.say_on_every_rank)
        wandb = {"project": cfg.train.wandb_project, "name": cfg.train.run_name or cfg.name, "config": to_dict(cfg),
                 "resume": "allow"} if cfg.train.wandb and self.dist.main else None
        self.log = RunLog(self.run_dir, tensorboard=cfg.train.tensorboard, wandb=wandb)
        self.resumed = False
        self._saved_at: tuple[int, int] | None = None
        from smog.callbacks import default_callbacks

        self.callbacks = default_callbacks(cfg) + list(callbacks or [])

    # ----------------------------------------------------------------- helpers the hooks use
    def say(self, text: str) -> None:
        """A line on stderr from rank 0."""
        if self.dist.main:
            print(f"smog train: {text}", file=sys.stderr, flush=True)

    @staticmethod
    def say_on_every_rank(text: str) -> None:
        """A line on stderr from this process (a rank's own files)."""
        print(f"smog train: {text}", file=sys.stderr, flush=True)

    def bar(self, iterable: Iterable, desc: str, total: int, initial: int = 0) -> tqdm:
        """A progress bar on rank 0 when train.progress is on."""
        return tqdm(iterable, desc=desc, total=total, initial=initial,
                    disable=not (self.cfg.train.progress and self.dist.main))

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast where train.bf16 and the device allow it."""
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16)

    def grad_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP's gradient all-reduce only on the last sub-batch of a step (no_sync before it)."""
        no_sync = None if last else getattr(self.online, "no_sync", None)
        return no_sync() if no_sync is not None else contextlib.nullcontext()

    def barrier(self) -> None:
        if self.dist.world > 1:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def bookkeeping(self) -> Iterator[None]:
        """Work that is not training (evaluation, logs, checkpoints): off the training clock."""
        with self.clock.paused():
            yield

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The whole checkpoint: config, model, optimiser, progress, meters, method state, clock, and this
        process's own state (`rank`: RNG states and the method's, e.g. the memory bank)."""
        p = self.progress
        return {"config": to_dict(self.cfg), "world": self.dist.world, "model": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(), "epoch": p.epoch, "step": p.step,
                "step_in_epoch": p.step_in_epoch, "steps_per_epoch": p.steps_per_epoch, "meter": dict(self.meter),
                "method": self.method.method_state(), "seconds": self.clock.spent(),
                "budget": self.budget.state_dict() if self.budget is not None else None, "rank": self.rank_state()}

    def rank_state(self) -> dict:
        return {"rng": checkpoint.rng_state(), "method": self.method.rank_state()}

    def load_state_dict(self, state: dict, own: dict | None) -> None:
        """A checkpoint's state, with this process's own part (None: no own state, as on a new process)."""
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        p = self.progress
        p.epoch, p.step, p.step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
        self.meter = dict(state["meter"])
        self.method.load_method_state(state["method"])
        self.clock = Clock(state.get("seconds", 0.0))
        if self.budget is not None and state.get("budget") is not None:
            self.budget.load_state_dict(state["budget"])
        own = own if own is not None else {"rng": state["rank"]["rng"], "method": None}
        self.method.load_rank_state(own["method"])
        checkpoint.set_rng_state(own["rng"])

    def save(self) -> None:
        """Checkpoint this position (once: a position already saved is not written again)."""
        position = (self.progress.epoch, self.progress.step)
        if self._saved_at == position:
            return
        p = self.progress
        own = {"step": p.step, "epoch": p.epoch, "world": self.dist.world, "rank": self.rank_state()}
        self.files.save(self.state_dict() if self.dist.main else {}, own)
        self._saved_at = position

    def resume(self, where: str) -> bool:
        """where: "" (fresh), "auto" (this run's newest usable checkpoint, if any) or a path (see
        checkpoint.RunFiles.restore). True if resumed."""
        restored = self.files.restore(where, self.device, self.progress.steps_per_epoch)
        if restored is None:
            return False
        self.load_state_dict(*restored)
        self.resumed = True
        self._saved_at = (self.progress.epoch, self.progress.step)
        if self.dist.main:
            self.log.truncate_after(self.progress.step)
        return True

    # ----------------------------------------------------------------- the run
    def done(self) -> bool:
        if self.budget is not None:
            return self.budget.over(self.progress.seconds)
        return self.progress.epoch >= self.cfg.train.epochs

    def _share_clock(self) -> None:
        """progress.seconds <- rank 0's training time (every process decides on the same reading)."""
        seconds = self.clock.spent()
        timed = self.budget is not None or self.cfg.eval.knn_every_minutes
        if self.dist.world > 1 and timed:
            shared = torch.tensor([seconds], dtype=torch.float64, device=self.device)
            torch.distributed.broadcast(shared, src=0)
            seconds = float(shared)
        self.progress.seconds = seconds

    def step(self, batch: dict) -> float:
        """One optimiser step on this process's share of the global batch; returns its loss."""
        cfg, p = self.cfg, self.progress
        with phase(STEP):
            self._share_clock()
            if self.budget is not None:
                p.total_steps = self.budget.total_steps(p.step, p.seconds)
            lr = learning_rate(cfg.optim, p.step, p.steps_per_epoch, p.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            loss = float(self.method.training_step(self, batch))
            if not math.isfinite(loss):
                raise NonFiniteLoss(
                    f"loss became {loss} at epoch {p.epoch}, step {p.step}: stopping. The last good checkpoint "
                    f"is kept at {self.files.main_path} (if one was written); lower optim.lr or check the data.")
            with phase("optimizer"):
                if cfg.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.method.online.parameters(), cfg.optim.grad_clip)
                self.optimizer.step()
            with phase("after step"):
                self.method.after_optimizer_step(self)
            p.step += 1
            p.step_in_epoch += 1
            self.meter["loss"] += loss
            self.meter["steps"] += 1
        return loss

    def _prepare_run_dir(self) -> None:
        if not self.dist.main:
            return
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.yaml"), "w") as out:
                yaml.safe_dump(to_dict(self.cfg), out, sort_keys=False)
        except OSError as error:
            raise ConfigError(f"train.out_dir={self.cfg.train.out_dir!r}: cannot write the run directory "
                              f"{self.run_dir}: {error.strerror or error}") from error
        if not self.resumed:  # a fresh run: an earlier run's records here are not its own
            self.log.restart()

    def fit(self, stop_after_steps: int | None = None) -> dict:
        """Train to the end (train.epochs, or train.minutes of training time), or stop after `stop_after_steps`
        more steps with a checkpoint (an interruption). Returns the last epoch record ({} if stopped early)."""
        self._prepare_run_dir()
        self.clock.start()
        record = self.method.on_fit_start(self)
        with self.bookkeeping():
            if record and self.dist.main:
                self.log.write(record)
            for callback in self.callbacks:
                callback.on_fit_start(self)
        epoch_record: dict = {}
        steps_done = 0
        self._share_clock()
        while not self.done():
            p = self.progress
            epoch_started = self.clock.spent()
            if p.step_in_epoch == 0:
                record = self.method.on_epoch_start(self, p.epoch)
                if record and self.dist.main:
                    with self.bookkeeping():
                        self.log.write(record)
            bar = self.bar(None, self._bar_title(), p.steps_per_epoch, p.step_in_epoch)
            batches = iter(self.data.batches(p.epoch, self.batch_size, skip=p.step_in_epoch))
            while True:
                with phase("loader"):
                    batch = next(batches, None)
                if batch is None:
                    break
                loss = self.step(batch)
                steps_done += 1
                bar.update()
                interrupted = stop_after_steps is not None and steps_done >= stop_after_steps
                with self.bookkeeping():
                    self._show(bar, loss)
                    for callback in self.callbacks:
                        callback.on_step_end(self, loss)
                    if interrupted:
                        self.save()
                if interrupted:
                    bar.close()
                    self.clock.stop()
                    return {}
                if self.budget is not None:
                    self._share_clock()
                    if self.done():
                        break
            bar.close()
            epoch_record = self._close_epoch(self.clock.spent() - epoch_started)
        with self.bookkeeping():
            for callback in self.callbacks:
                callback.on_fit_end(self)
        self.clock.stop()
        return epoch_record

    def _close_epoch(self, seconds: float) -> dict:
        """The epoch's record through the callbacks (kNN, log, checkpoint); the progress moves to the next epoch."""
        p = self.progress
        record = {"kind": "epoch", "epoch": p.epoch, "step": p.step,
                  "loss": self.meter["loss"] / max(1, self.meter["steps"]), "seconds": seconds,
                  **self.method.epoch_metrics(), "bad_images": self.data.skipped.end_epoch()}
        self.meter = {"loss": 0.0, "steps": 0}
        p.epoch += 1
        p.step_in_epoch = 0
        with self.bookkeeping():
            for callback in self.callbacks:
                callback.on_epoch_end(self, record)
        return record

    def _bar_title(self) -> str:
        if self.budget is not None:  # a budget ends by time, not by an epoch count
            return f"epoch {self.progress.epoch + 1}"
        return f"epoch {self.progress.epoch + 1}/{self.cfg.train.epochs}"

    def _show(self, bar: tqdm, loss: float) -> None:
        if bar.disable:
            return
        rate = bar.format_dict["rate"]
        fields = {"loss": f"{loss:.3f}", "lr": f"{self.optimizer.param_groups[0]['lr']:.3g}",
                  **self.method.progress_fields(self), "img_s": f"{rate * self.cfg.train.batch_size if rate else 0:.0f}"}
        if self.budget is not None:
            left = max(0.0, self.budget.seconds - self.clock.spent())
            fields["left"] = f"{int(left // 60)}:{int(left % 60):02d}"
        bar.set_postfix(fields)
