"""The SMoG training loop: memory-bank fill, per-epoch momentum reset and re-clustering, iterations,
kNN evaluation, metrics, plots and exact-resume checkpoints (rank 0 writes, every rank loads)."""
from __future__ import annotations

import math
import os
import time

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from smog import checkpoint
from smog.backbones import build_backbone
from smog.config import LARGE_CROPS, Config, ConfigError, to_dict
from smog.data import ResumableSampler, batch_crops, crop_seed, data_info, device_crops, make_loader, train_set
from smog.dist import DistInfo, init_from_env, kmeans, stats_reducer
from smog.evaluation import knn_scores
from smog.memory_bank import MemoryBank
from smog.method import SMoG
from smog.optim import build_optimizer
from smog.runlog import RunLog, usage
from smog.schedules import ema_rate, group_momentum, learning_rate


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
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.run_dir = os.path.join(cfg.train.out_dir, cfg.train.run_name or cfg.name)
        self.ckpt_path = os.path.join(self.run_dir, "checkpoint.pt")

        self.dataset = train_set(cfg)
        self.device_crops = device_crops(cfg)
        if cfg.method.groups > len(self.dataset) // self.dist.world:
            raise ConfigError(f"method.groups={cfg.method.groups} exceeds the {len(self.dataset) // self.dist.world} "
                              f"training images per process: k-means cannot seed that many groups")
        self.sampler = DistributedSampler(self.dataset, num_replicas=self.dist.world, rank=self.dist.rank,
                                          shuffle=True, seed=cfg.train.seed, drop_last=True)
        if cfg.train.batch_size % self.dist.world:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} (the global batch) must divide evenly over "
                              f"{self.dist.world} processes")
        self.batch_size = cfg.train.batch_size // self.dist.world
        self.steps_per_epoch = len(self.sampler) // self.batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} exceeds the {len(self.sampler)} images per "
                              f"process: no full batch per epoch")
        self.total_steps = self.steps_per_epoch * cfg.train.epochs

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
        self.bank = MemoryBank(len(self.dataset), cfg.model.dim, self.device, views=len(cfg.method.update_crops))
        self.reduce_stats = stats_reducer(self.dist)
        self.autocast = cfg.train.bf16 and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.epoch, self.step, self.step_in_epoch, self.bank_ready = 0, 0, 0, False
        self.meter = self._empty_meter()
        self.log = RunLog(self.run_dir)

    # ----------------------------------------------------------------- state
    def _empty_meter(self) -> dict:
        return {"loss": 0.0, "steps": 0, "counts": torch.zeros(self.cfg.method.heads, self.cfg.method.groups,
                                                                dtype=torch.int64)}

    def state_dict(self) -> dict:
        return {"config": to_dict(self.cfg), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "bank": self.bank.state_dict(),
                "epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch,
                "bank_ready": self.bank_ready, "meter": self.meter, "rng": checkpoint.rng_state(),
                "world": self.dist.world}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.bank.load_state_dict(state["bank"])
        self.epoch, self.step, self.step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
        self.bank_ready, self.meter = state["bank_ready"], state["meter"]
        checkpoint.set_rng_state(state["rng"])

    def _rank_state_path(self) -> str:
        return os.path.join(self.run_dir, f"rank{self.dist.rank}.pt")

    def save(self) -> None:
        """Rank 0 writes checkpoint.pt; with several processes every rank also writes its own memory
        bank and RNG state (rank{r}.pt), first, so that a rank file never lags the checkpoint."""
        if self.dist.world > 1:
            own = {"step": self.step, "world": self.dist.world, "bank": self.bank.state_dict(),
                   "rng": checkpoint.rng_state()}
            checkpoint.save_atomic(own, self._rank_state_path())
            self._barrier()
        if self.dist.main:
            checkpoint.save_atomic(self.state_dict(), self.ckpt_path)
        self._barrier()

    def _load_rank_state(self) -> None:
        """This rank's own bank and RNG state; a missing or mismatched file (another world size, a
        crash between the writes) leaves the bank to be refilled by the next fit()."""
        path = self._rank_state_path()
        own = checkpoint.load(path, self.device) if os.path.isfile(path) else None
        if own is None or own["step"] != self.step or own["world"] != self.dist.world:
            self.bank_ready = False
            return
        self.bank.load_state_dict(own["bank"])
        checkpoint.set_rng_state(own["rng"])

    def resume(self, where: str) -> bool:
        """where: "" (fresh), "auto" (this run's checkpoint if there is one) or a path. True if resumed."""
        if not where:
            return False
        path = self.ckpt_path if where == "auto" else where
        if where == "auto" and not os.path.isfile(path):
            return False
        self.load_state_dict(checkpoint.load(path, self.device))
        if self.dist.world > 1:
            self._load_rank_state()
        if self.dist.main:
            self.log.truncate_after(self.step)
        return True

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
        """The no-grad pass before the first epoch: online z of the update crops of every sample of this process."""
        # no drop_last anywhere: every sample of this process's shard (padded to equal shards) gets a row
        sampler = DistributedSampler(self.dataset, num_replicas=self.dist.world, rank=self.dist.rank, shuffle=False)
        loader = make_loader(self.dataset, self.batch_size, self.cfg.data, sampler, pin=self.device.type == "cuda")
        self.dataset.set_epoch(-1)
        self.dataset.large_q_only = True
        bar = tqdm(loader, desc="memory bank", disable=not (self.cfg.train.progress and self.dist.main))
        for i, batch in enumerate(bar):
            if len(batch["index"]) < 2:  # BatchNorm needs two rows; that one sample joins the bank when trained on
                continue
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                # negative steps: the fill pass's crops never repeat a training step's
                z, _ = self.model.online(self._crops(batch, -2 - i, large_q_only=True)["q"])
            self.bank.write(batch["index"], z[list(self.cfg.method.update_crops)])
        self.dataset.large_q_only = False
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
                view = h % len(self.cfg.method.update_crops)  # bank view i holds update crop i
                self.model.groups[h] = kmeans(self.bank.rows(view), self.cfg.method.groups,
                                              self.cfg.method.kmeans_iters, seed, self.cfg.method.backend, self.dist)

    def train_step(self, batch: dict) -> float:
        crops = self._crops(batch, self.step)
        q, k = swap_roles(crops["q"], crops["k"], self.step, self.cfg.method.swap)
        lr = learning_rate(self.cfg.optim, self.step, self.steps_per_epoch, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        beta = group_momentum(self.cfg.method, self.step, self.total_steps)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            out = self.model.step(self.online, q, k, beta, self.reduce_stats)
        loss = float(out.loss.detach())
        if not math.isfinite(loss):
            raise NonFiniteLoss(
                f"loss became {loss} at epoch {self.epoch}, step {self.step}: stopping. The last good checkpoint "
                f"is kept at {self.ckpt_path} (if one was written); lower optim.lr or check the data.")
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.online.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.model.ema_update(ema_rate(self.cfg.method, self.step, self.total_steps))
        self.model.groups.copy_(out.groups)
        self.bank.write(batch["index"], out.bank_rows)
        self.meter["loss"] += loss
        self.meter["steps"] += 1
        self.meter["counts"] += out.counts.cpu()
        return loss

    def end_epoch(self, seconds: float) -> dict:
        heads = [usage(c) for c in self.meter["counts"]]
        record = {"kind": "epoch", "epoch": self.epoch, "step": self.step,
                  "loss": self.meter["loss"] / max(1, self.meter["steps"]), "seconds": seconds,
                  "nonempty": [n for n, _ in heads], "entropy": [e for _, e in heads]}
        every = self.cfg.eval.knn_every
        last = self.epoch + 1 == self.cfg.train.epochs
        if last or (every and (self.epoch + 1) % every == 0):  # every rank extracts its share of the images
            shard = (self.dist.rank, self.dist.world) if self.dist.world > 1 else None
            knn = knn_scores(self.model.online.backbone, self.cfg, self.device, shard)
            if self.dist.main:
                record["knn"] = knn
        self.meter = self._empty_meter()
        return record

    # ----------------------------------------------------------------- run
    def fit(self, stop_after_steps: int | None = None) -> dict:
        """Train to cfg.train.epochs (or stop after `stop_after_steps` more steps, checkpointing: an interruption).

        Returns the last epoch record ({} if stopped early).
        """
        cfg = self.cfg
        if self.dist.main:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.yaml"), "w") as out:
                yaml.safe_dump(to_dict(cfg), out, sort_keys=False)
        if not self.bank_ready:  # a fresh run: an earlier run's records in this directory are not this run's
            if self.dist.main:
                self.log.restart()
            started = time.perf_counter()
            self.fill_bank()
            if self.dist.main:
                self.log.write({"kind": "bank_fill", "step": 0, "seconds": time.perf_counter() - started})
        record: dict = {}
        steps_done = 0
        show = cfg.train.progress and self.dist.main
        while self.epoch < cfg.train.epochs:
            started = time.perf_counter()  # an epoch's time includes its re-clustering
            if self.step_in_epoch == 0:
                self.start_epoch(self.epoch)
            loader = self._batches(self.epoch, self.step_in_epoch)
            bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}", disable=not show,
                       initial=self.step_in_epoch, total=self.steps_per_epoch)
            for batch in bar:
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
            bar.close()
            record = self.end_epoch(time.perf_counter() - started)
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
