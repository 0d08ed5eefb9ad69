"""The SMoG training loop: memory-bank fill, per-epoch momentum reset and re-clustering, iterations,
kNN evaluation, metrics, plots and exact-resume checkpoints (rank 0 writes, every rank loads)."""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import time

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from smog import checkpoint
from smog.backbones import build_backbone
from smog.budget import Budget
from smog.config import LARGE_CROPS, Config, ConfigError, to_dict
from smog.data import (ResumableSampler, SkippedImages, batch_crops, crop_seed, data_info, device_crops, make_loader,
                       train_set)
from smog.dist import DistInfo, init_from_env, kmeans, stats_reducer
from smog.evaluation import knn_scores
from smog_kernels.memory_bank import MemoryBank
from smog.method import GroupCycle, SMoG
from smog.optim import build_optimizer
from smog.runlog import RunLog, usage
from smog.schedules import ema_rate, group_momentum, learning_rate


def part(batch: dict, i: int, size: int) -> dict:
    """Sub-batch i (samples i * size .. (i + 1) * size) of a loader batch: index, and crops or images."""
    def cut(value):
        return [cut(v) for v in value] if isinstance(value, list) else value[i * size:(i + 1) * size]

    return {key: cut(value) for key, value in batch.items()}


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stopped and its last good checkpoint is kept."""


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(cfg: Config) -> SMoG:
    """The SMoG model at its seeded initial weights (the same for a given train.seed)."""
    info = data_info(cfg.data)
    torch.manual_seed(cfg.train.seed)
    return SMoG(build_backbone(cfg.model, info.channels, info.size), cfg)


def swap_roles(q: list[torch.Tensor], k: list[torch.Tensor], step: int, swap: str) -> tuple[list, list]:
    """The q and k crop sets of `step` (each 2 large crops first): on odd steps the sets swap roles,
    whole (swap "all", the authors' code) or only their large crops (swap "large")."""
    if step % 2 == 0:
        return q, k
    if swap == "all":
        return k, q
    return k[:LARGE_CROPS] + q[LARGE_CROPS:], q[:LARGE_CROPS] + k[LARGE_CROPS:]


class Trainer:
    """Holds every piece of training state; `fit()` runs (or continues) the run."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = pick_device(cfg.train.device)
        self.dist: DistInfo = init_from_env(self.device.type, timeout_s=cfg.train.dist_timeout_s)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        if cfg.method.cuda_graphs and (self.device.type != "cuda" or self.dist.world > 1):
            raise ConfigError(f"method.cuda_graphs=true needs one CUDA process (this run: {self.device.type}, "
                              f"{self.dist.world} processes): the statistics cannot be reduced across processes "
                              f"inside a graph; set method.cuda_graphs=false")
        accumulate = cfg.train.accumulate
        if accumulate > 1 and (cfg.method.cuda_graphs or cfg.method.grad_into_groups):
            raise ConfigError(f"train.accumulate={accumulate} needs method.cuda_graphs=false and "
                              f"method.grad_into_groups=false (got {cfg.method.cuda_graphs} and "
                              f"{cfg.method.grad_into_groups}): a cycle runs the grouping step as separate ops over "
                              f"sub-batches, outside a CUDA graph and without a gradient into the groups")
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.run_dir = os.path.join(cfg.train.out_dir, cfg.train.run_name or cfg.name)
        self.ckpt_path = os.path.join(self.run_dir, "checkpoint.pt")

        self.dataset = train_set(cfg)
        self.skipped = SkippedImages(self.dataset, cfg.data.max_bad_fraction, self.dist)
        self.device_crops = device_crops(cfg)
        self.sampler = DistributedSampler(self.dataset, num_replicas=self.dist.world, rank=self.dist.rank,
                                          shuffle=True, seed=cfg.train.seed, drop_last=True)
        if cfg.train.batch_size % (self.dist.world * accumulate):
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} (the global batch of one optimiser step) must "
                              f"split evenly into train.accumulate={accumulate} sub-batches on each of "
                              f"{self.dist.world} processes: a multiple of {self.dist.world * accumulate}")
        self.batch_size = cfg.train.batch_size // self.dist.world  # per process and optimiser step
        self.sub_batch = self.batch_size // accumulate  # per process and forward pass
        self.steps_per_epoch = len(self.sampler) // self.batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} exceeds the {len(self.sampler)} images per "
                              f"process: no full batch per epoch")
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        bank_rows = self.steps_per_epoch * self.batch_size  # per process: one epoch's shard
        if cfg.method.groups > bank_rows * self.dist.world:
            raise ConfigError(f"method.groups={cfg.method.groups} exceeds the {bank_rows * self.dist.world} rows of "
                              f"the memory banks (one epoch's batches): k-means cannot seed that many groups")

        self.model = build_model(cfg).to(self.device)
        if cfg.model.sync_bn and self.dist.world > 1:
            if self.device.type != "cuda":
                raise ConfigError("model.sync_bn=true needs CUDA devices: torch's SyncBatchNorm does not run on "
                                  "CPU (gloo) processes; set model.sync_bn=false")
            convert = torch.nn.SyncBatchNorm.convert_sync_batchnorm
            self.model.online, self.model.momentum = convert(self.model.online), convert(self.model.momentum)
        if cfg.model.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.online = self.model.online
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.online = DistributedDataParallel(self.model.online, device_ids=ids)
        if cfg.model.compile:
            self.online = torch.compile(self.online)
        self.optimizer = build_optimizer(self.model.online, cfg.optim)
        self.bank = MemoryBank(bank_rows, cfg.model.dim, len(self.model.update_crops), self.device)
        self.reduce_stats = stats_reducer(self.dist)
        self.autocast = cfg.train.bf16 and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.epoch, self.step, self.step_in_epoch, self.bank_ready = 0, 0, 0, False
        self.meter = self._empty_meter()
        wandb = {"project": cfg.train.wandb_project, "name": cfg.train.run_name or cfg.name, "config": to_dict(cfg),
                 "resume": "allow"} if cfg.train.wandb and self.dist.main else None
        self.log = RunLog(self.run_dir, tensorboard=cfg.train.tensorboard, wandb=wandb)

    # ----------------------------------------------------------------- state
    def _empty_meter(self) -> dict:
        return {"loss": 0.0, "steps": 0, "counts": torch.zeros(self.cfg.method.heads, self.cfg.method.groups,
                                                                dtype=torch.int64)}

    def state_dict(self) -> dict:
        return {"config": to_dict(self.cfg), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "bank": self.bank.state_dict(),
                "epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch,
                "steps_per_epoch": self.steps_per_epoch, "bank_ready": self.bank_ready, "meter": self.meter,
                "rng": checkpoint.rng_state(), "world": self.dist.world}

    def load_state_dict(self, state: dict) -> None:
        """Everything but, when the checkpoint was written by another number of processes, the memory bank
        (bank_ready is then False: the next fit() refills it)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step, self.step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
        self.meter = state["meter"]
        self.bank_ready = state["bank_ready"] and state["world"] == self.dist.world
        if self.bank_ready:
            self.bank.load_state_dict(state["bank"])
        checkpoint.set_rng_state(state["rng"])

    def _rank_state_path(self) -> str:
        return os.path.join(self.run_dir, f"rank{self.dist.rank}.pt")

    def save(self) -> None:
        """With several processes every rank first writes its own memory bank and RNG state (rank{r}.pt),
        then rank 0 writes checkpoint.pt. Each write keeps the file it replaces (*.prev.pt), so a crash at
        any moment leaves a position (epoch, step) that the checkpoint and every rank file hold."""
        if self.dist.world > 1:
            own = {"step": self.step, "epoch": self.epoch, "world": self.dist.world,
                   "bank": self.bank.state_dict(), "rng": checkpoint.rng_state()}
            checkpoint.save(own, self._rank_state_path())
            self._barrier()
        if self.dist.main:
            checkpoint.save(self.state_dict(), self.ckpt_path)
        self._barrier()

    def _usable(self, paths: list[str], world: int | None = None, report: bool = True) -> tuple[dict, list[str]]:
        """({(epoch, step): path} of the files among `paths` that pass their checks (and were written by
        `world` processes, if given), refused paths); with `report` each refusal is said on stderr."""
        usable, refused = {}, []
        for path in paths:
            if not os.path.exists(path):
                continue
            try:
                head = checkpoint.header(path)
            except checkpoint.CheckpointError as error:
                if report:
                    print(f"smog train: {error}", file=sys.stderr, flush=True)
                refused.append(path)
                continue
            if world is None or head["world"] == world:
                usable.setdefault((head["epoch"], head["step"]), path)
        return usable, refused

    def _set_aside(self, usable: dict, refused: list[str], position: tuple) -> None:
        """Rename refused files and files newer than the resumed `position` (another timeline) to *.set-aside,
        so that the next saves cannot rotate them back in."""
        for path in refused + [p for pos, p in usable.items() if pos > position]:
            os.replace(path, path + ".set-aside")
            print(f"smog train: set aside {path} as {path}.set-aside", file=sys.stderr, flush=True)

    def resume(self, where: str) -> bool:
        """where: "" (fresh), "auto" (this run's newest usable checkpoint, if any) or a path. True if resumed.

        auto tries checkpoint.pt, then checkpoint.prev.pt, and resumes the newest position (epoch, step) that
        the checkpoint and every rank's own file (bank, RNG) hold; a refused file is reported and set aside.
        If no rank files match (they lag, or another number of processes wrote the checkpoint) the memory
        bank is refilled by the next fit() and the resume says why.
        """
        if not where:
            return False
        paths = [self.ckpt_path, checkpoint.previous_path(self.ckpt_path)] if where == "auto" else [where]
        if where == "auto" and not any(os.path.exists(p) for p in paths):
            return False
        if where != "auto":
            checkpoint.read(where)  # a file the user named: refused in one line unless a smog training checkpoint
        mains, refused = self._usable(paths, report=self.dist.main)
        if not mains:
            raise checkpoint.CheckpointError(f"no usable checkpoint to resume: {', '.join(refused)} refused "
                                             f"(see above); start afresh without --resume or pass another path")
        own_paths = [self._rank_state_path(), checkpoint.previous_path(self._rank_state_path())]
        owns, own_refused = self._usable(own_paths, self.dist.world) if self.dist.world > 1 else ({}, [])
        every = []
        if self.dist.world > 1:
            every = [None] * self.dist.world
            torch.distributed.all_gather_object(every, set(owns))
        common = set(mains).intersection(*every)
        position = max(common) if common else max(mains)
        state = checkpoint.load(mains[position], self.device)
        if state["world"] != self.dist.world and state["steps_per_epoch"] != self.steps_per_epoch:
            raise ConfigError(f"{mains[position]} was written by {state['world']} processes with "
                              f"{state['steps_per_epoch']} steps per epoch; this run has {self.dist.world} "
                              f"processes and {self.steps_per_epoch}: resume it with {state['world']} processes")
        self.load_state_dict(state)
        if self.dist.main:
            self._set_aside(mains, refused, position)
        if self.dist.world > 1:
            self._set_aside(owns, own_refused, position)
        if state["world"] != self.dist.world:
            self._say(f"{mains[position]} was written by {state['world']} processes, this run has "
                      f"{self.dist.world}: resuming at epoch {self.epoch}, step {self.step} with the memory bank "
                      f"refilled by the fill pass (not bit-identical to a run that kept {state['world']})")
        elif self.dist.world > 1 and position in owns:
            own = checkpoint.load(owns[position], self.device)
            self.bank.load_state_dict(own["bank"])
            checkpoint.set_rng_state(own["rng"])
        elif self.dist.world > 1:
            lag = [r for r, held in enumerate(every) if position not in held]
            self._say(f"{mains[position]} holds epoch {position[0]}, step {position[1]}, but the rank files of "
                      f"ranks {lag} hold {[sorted(every[r]) for r in lag]} (they lag or lead): resuming that step "
                      f"with the memory bank refilled by the fill pass")
            self.bank_ready = False
        if self.dist.main:
            self.log.truncate_after(self.step)
        return True

    def _say(self, text: str) -> None:
        if self.dist.main:
            print(f"smog train: {text}", file=sys.stderr, flush=True)

    def _barrier(self) -> None:
        if self.dist.world > 1:
            torch.distributed.barrier()

    # ----------------------------------------------------------------- phases
    def _batches(self, epoch: int, skip_steps: int):
        """The epoch's training batches (shuffled, full batches), minus the first `skip_steps` (a resume)."""
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        sampler = ResumableSampler(self.sampler, skip_steps * self.batch_size)
        return make_loader(self.dataset, self.batch_size, self.cfg.data, sampler, drop_last=True,
                           pin=self.device.type == "cuda")

    def _crops(self, batch: dict, step: int, large_q_only: bool = False) -> dict[str, list[torch.Tensor]]:
        """The batch's q (and k) crops on the device, in the model's memory format."""
        fmt = torch.channels_last if self.cfg.model.channels_last else torch.contiguous_format
        seed = crop_seed(self.cfg.train.seed, self.dist.rank, step)
        return batch_crops(batch, self.device_crops, seed, self.device, fmt, large_q_only)

    @torch.no_grad()
    def fill_bank(self) -> None:
        """The no-grad pass before the first epoch: online z of the update crops of this process's shard of
        the current epoch, in its training order (the bank positions the epoch's steps then overwrite)."""
        self.sampler.set_epoch(self.epoch)
        loader = make_loader(self.dataset, self.sub_batch, self.cfg.data, ResumableSampler(self.sampler),
                             drop_last=True, pin=self.device.type == "cuda")
        self.dataset.set_epoch(-1)
        self.dataset.large_q_only = True
        self.bank.position = 0
        batches = self.bank.size // self.sub_batch
        bar = tqdm(itertools.islice(loader, batches), desc="memory bank", total=batches,
                   disable=not (self.cfg.train.progress and self.dist.main))
        for i, batch in enumerate(bar):
            self.skipped.note(batch)
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                # negative steps: the fill pass's crops never repeat a training step's
                z, _ = self.model.online(self._crops(batch, -2 - i, large_q_only=True)["q"])
            self.bank.write(batch["index"], z[self.model.update_crops])
        self.dataset.large_q_only = False
        self.bank.position = self.step_in_epoch * self.batch_size
        self.bank_ready = True

    @torch.no_grad()
    def start_epoch(self, epoch: int) -> None:
        """Momentum network <- online weights; spherical k-means of every head on its bank view."""
        if self.cfg.method.reset_momentum_each_epoch:
            self.model.reset_momentum()
        every = self.cfg.method.recluster_every
        if every and epoch % every == 0:
            for h in range(self.cfg.method.heads):
                seed = self.cfg.train.seed * 7919 + epoch * self.cfg.method.heads + h
                self.model.groups[h] = kmeans(self.bank.rows(h % self.bank.views), self.cfg.method.groups,
                                              self.cfg.method.kmeans_iters, seed, self.cfg.method.backend, self.dist)

    def train_step(self, batch: dict) -> float:
        """One optimiser step on this process's share of the global batch, forwarded in train.accumulate
        sub-batches (one GroupCycle; gradients summed over the sub-batches of losses divided by A)."""
        lr = learning_rate(self.cfg.optim, self.step, self.steps_per_epoch, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        beta = group_momentum(self.cfg.method, self.step, self.total_steps)
        accumulate = self.cfg.train.accumulate
        cycle = GroupCycle(self.model, beta, self.reduce_stats) if accumulate > 1 else None
        parts = [batch] if accumulate == 1 else [part(batch, i, self.sub_batch) for i in range(accumulate)]
        losses, written = [], []
        for i, sub in enumerate(parts):
            crops = self._crops(sub, self.step * accumulate + i)
            q, k = swap_roles(crops["q"], crops["k"], self.step, self.cfg.method.swap)
            last = i == accumulate - 1
            with self._grad_sync(last):
                with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                    if cycle is None:
                        out = self.model.step(self.online, q, k, beta, self.reduce_stats)
                    else:
                        out = cycle.sub_batch(self.online, q, k, last)
                if i == 0:
                    self.optimizer.zero_grad(set_to_none=True)
                (out.loss / accumulate).backward()
            losses.append(out.loss.detach())
            written.append((sub["index"], out.bank_rows))
        loss = float(torch.stack(losses).mean())
        if not math.isfinite(loss):
            raise NonFiniteLoss(
                f"loss became {loss} at epoch {self.epoch}, step {self.step}: stopping. The last good checkpoint "
                f"is kept at {self.ckpt_path} (if one was written); lower optim.lr or check the data.")
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.online.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.model.ema_update(ema_rate(self.cfg.method, self.step, self.total_steps))
        self.model.groups.copy_(out.groups)
        for index, rows in written:
            self.bank.write(index, rows)
        self.meter["loss"] += loss
        self.meter["steps"] += 1
        self.meter["counts"] += out.counts.cpu()
        return loss

    def _grad_sync(self, last: bool):
        """DDP's gradient all-reduce only on the last sub-batch of a step (no_sync before it)."""
        no_sync = None if last else getattr(self.online, "no_sync", None)
        return no_sync() if no_sync is not None else contextlib.nullcontext()

    def end_epoch(self, seconds: float, knn: bool) -> dict:
        """The epoch's record (kNN top-1 in it when `knn`)."""
        heads = [usage(c) for c in self.meter["counts"]]
        record = {"kind": "epoch", "epoch": self.epoch, "step": self.step,
                  "loss": self.meter["loss"] / max(1, self.meter["steps"]), "seconds": seconds,
                  "nonempty": [n for n, _ in heads], "entropy": [e for _, e in heads],
                  "bad_images": self.skipped.end_epoch()}
        if knn:
            scores = self.knn()
            if self.dist.main:
                record["knn"] = scores
        self.meter = self._empty_meter()
        return record

    def knn(self) -> dict[str, float]:
        """kNN top-1 of the online backbone (every rank extracts its share of the images)."""
        shard = (self.dist.rank, self.dist.world) if self.dist.world > 1 else None
        return knn_scores(self.model.online.backbone, self.cfg, self.device, shard)

    # ----------------------------------------------------------------- run
    def fit(self, stop_after_steps: int | None = None, budget: Budget | None = None) -> dict:
        """Train to cfg.train.epochs (or stop after `stop_after_steps` more steps, checkpointing: an interruption).

        With a `budget` the run instead trains until the budget's training time is spent, stopping at any
        step: the bank fill, re-clustering and steps run on its clock, the schedules are laid out over it
        (Budget.total_steps), and kNN is taken when the budget says and at the end, into budget.points and
        metrics.jsonl, with the clock paused (as for logs, plots and checkpoints). eval.knn_every is unused.
        Returns the last epoch record ({} if stopped early).
        """
        cfg = self.cfg
        if budget is not None and self.dist.world > 1:
            raise ConfigError(f"a training-time budget needs one process (this run has {self.dist.world}): each "
                              f"would stop at another step")
        if budget is not None:
            budget.start()
        if self.dist.main:
            try:
                os.makedirs(self.run_dir, exist_ok=True)
                with open(os.path.join(self.run_dir, "config.yaml"), "w") as out:
                    yaml.safe_dump(to_dict(cfg), out, sort_keys=False)
            except OSError as error:
                raise ConfigError(f"train.out_dir={cfg.train.out_dir!r}: cannot write the run directory "
                                  f"{self.run_dir}: {error.strerror or error}") from error
        if not self.bank_ready:
            if self.dist.main and self.step == 0:  # a fresh run: an earlier run's records here are not its own
                self.log.restart()
            started = time.perf_counter()
            self.fill_bank()
            if self.dist.main:
                self.log.write({"kind": "bank_fill", "step": 0, "seconds": time.perf_counter() - started})
        record: dict = {}
        steps_done = 0
        show = cfg.train.progress and self.dist.main
        while self.epoch < cfg.train.epochs if budget is None else not budget.over():
            started = time.perf_counter()  # an epoch's time includes its re-clustering
            if self.step_in_epoch == 0:
                self.start_epoch(self.epoch)
            loader = self._batches(self.epoch, self.step_in_epoch)
            desc = f"epoch {self.epoch + 1}" + ("" if budget else f"/{cfg.train.epochs}")  # a budget ends by time
            bar = tqdm(loader, desc=desc, disable=not show, initial=self.step_in_epoch, total=self.steps_per_epoch)
            for batch in bar:
                self.skipped.note(batch)
                if budget is not None:
                    self.total_steps = budget.total_steps(self.step)
                loss = self.train_step(batch)
                self.step += 1
                self.step_in_epoch += 1
                steps_done += 1
                if show:
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.3g}",
                                    beta=f"{group_momentum(cfg.method, self.step, self.total_steps):.4f}",
                                    groups=int(self.meter["counts"][0].gt(0).sum()),
                                    img_s=f"{bar.format_dict['rate'] * cfg.train.batch_size if bar.format_dict['rate'] else 0:.0f}")
                every = cfg.train.checkpoint_every_steps
                interrupted = stop_after_steps is not None and steps_done >= stop_after_steps
                if (every and self.step % every == 0) or interrupted:
                    self.save()
                if interrupted:
                    bar.close()
                    return {}
                if budget is not None and budget.over():
                    break
                if budget is not None and budget.eval_due():
                    paused = time.perf_counter()
                    with budget.paused():
                        point = budget.record(self.step, self.knn())
                        if self.dist.main:
                            self.log.write({"kind": "knn", "epoch": self.epoch, **point})
                    started += time.perf_counter() - paused  # the epoch's time leaves the evaluation out
            bar.close()
            with budget.paused() if budget is not None else contextlib.nullcontext():
                record = self._close_epoch(time.perf_counter() - started, budget, show)
        return record

    def _close_epoch(self, seconds: float, budget: Budget | None, show: bool) -> dict:
        """Record, log and checkpoint the epoch just trained (with a budget: cut short when the budget is spent)."""
        every = self.cfg.eval.knn_every
        if budget is None:
            knn = self.epoch + 1 == self.cfg.train.epochs or bool(every and (self.epoch + 1) % every == 0)
        else:
            knn = budget.over()
        record = self.end_epoch(seconds, knn)
        if budget is not None and knn:
            record["minutes"] = budget.record(self.step, record.get("knn", {}))["minutes"]
        self.epoch += 1
        self.step_in_epoch = 0
        if self.dist.main:
            self.log.write(record)
            self.log.plot()
            if show:
                tqdm.write(f"epoch {record['epoch'] + 1}: loss {record['loss']:.4f}, groups in use "
                           f"{record['nonempty']}, {record['seconds']:.1f}s" +
                           (f", kNN {record['knn']}" if "knn" in record else ""))
        self.save()
        return record
