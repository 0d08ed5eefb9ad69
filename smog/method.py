"""The SMoG method (docs/method.md): everything SMoG-specific, behind the hooks the training loop calls.

`SMoG` holds the online and momentum networks (smog.networks), the H heads of K group features with
their grouping step (smog_kernels.Grouping) and this process's memory bank (smog_kernels.MemoryBank):

- on_fit_start: the memory-bank fill pass, when the bank holds no rows yet;
- on_epoch_start: the momentum network reset to the online weights, and re-clustering of every head
  from the bank;
- training_step: the q and k crop sets (swapped on odd steps), both networks' forwards, the grouping
  step of every head under method.step_dtype, one backward per sub-batch (train.accumulate);
- after_optimizer_step: the momentum network's EMA, the bank writes and the group meters.

The loop owns the optimiser, the schedules' clock (`trainer.progress`), the data and the processes; the
hooks read them from the trainer they are given.
"""
from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from smog.backbones import build_backbone, drop_paths
from smog.config import LARGE_CROPS, Config
from smog.data import data_info
from smog.health import CollapseWatch, group_health
from smog.networks import MomentumNet, OnlineNet
from smog.profile import phase
from smog.schedules import ema_rate, group_momentum
from smog_kernels import Grouping, MemoryBank

if TYPE_CHECKING:
    from smog.loop import Trainer


def build_model(cfg: Config) -> "SMoG":
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


def split(batch: dict, parts: int) -> list[dict]:
    """A loader batch cut into `parts` equal sub-batches (index, and crops or images)."""
    size = len(batch["index"]) // parts

    def cut(value, i: int):
        return [cut(v, i) for v in value] if isinstance(value, list) else value[i * size:(i + 1) * size]

    return [{key: cut(value, i) for key, value in batch.items()} for i in range(parts)]


class SMoG(nn.Module):
    """The online and momentum networks and the grouping heads (the model's state_dict), the memory bank
    and the group meters (this process's state), and the hooks of the training loop."""

    def __init__(self, backbone: nn.Module, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.small_crops = cfg.data.small_crops
        self.online = OnlineNet(backbone, cfg.model.proj_hidden, cfg.model.pred_hidden, cfg.model.dim,
                                cfg.model.bn_crops)
        self.momentum = MomentumNet(self.online)
        m = cfg.method
        self.grouping = Grouping(m.heads, m.groups, cfg.model.dim, m.temperature, m.grad_into_groups, m.backend,
                                 cuda_graphs=m.cuda_graphs)
        # large q crops whose online z move the groups and fill the memory bank: head h takes view h mod len
        self.update_crops = list(m.update_crops)
        self.bank: MemoryBank | None = None
        self.bank_ready = False
        self.counts = torch.zeros(m.heads, m.groups, dtype=torch.int64)  # group members over the epoch's steps
        self.watch = CollapseWatch(m.collapse_fraction, m.collapse_steps)
        self._written: list[tuple[torch.Tensor, torch.Tensor]] = []  # (dataset index, rows) for the bank

    # ----------------------------------------------------------------- hooks
    def setup(self, trainer: "Trainer") -> None:
        """The memory bank of this process: one epoch's shard of update-crop rows."""
        rows = trainer.progress.steps_per_epoch * trainer.batch_size
        self.bank = MemoryBank(rows, self.cfg.model.dim, len(self.update_crops), trainer.device)

    @torch.no_grad()
    def on_fit_start(self, trainer: "Trainer") -> dict | None:
        """The no-grad pass before the first epoch: online z of the update crops of this process's shard of
        the current epoch, in its training order (the bank positions the epoch's steps then overwrite).
        Returns its record for the log (None when the bank was restored)."""
        if self.bank_ready:
            return None
        started = time.perf_counter()
        size = trainer.sub_batch
        batches = self.bank.size // size
        self.bank.position = 0
        loader = trainer.data.batches(trainer.progress.epoch, size, crop_epoch=-1, large_q_only=True)
        for i, batch in enumerate(trainer.bar(itertools.islice(loader, batches), "memory bank", batches)):
            with trainer.autocast():
                # negative steps: the fill pass's crops never repeat a training step's
                z, _ = self.online(trainer.data.crops(batch, -2 - i, large_q_only=True)["q"])
            self.bank.write(batch["index"], z[self.update_crops])
        self.bank.position = trainer.progress.step_in_epoch * trainer.batch_size
        self.bank_ready = True
        return {"kind": "bank_fill", "step": trainer.progress.step, "seconds": time.perf_counter() - started}

    @torch.no_grad()
    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> dict | None:
        """Momentum network <- online weights; spherical k-means of every head on its bank view. Returns the
        re-clustering's record (group health over the bank) for the log, None without one."""
        if self.cfg.method.reset_momentum_each_epoch:
            self.reset_momentum()
        every = self.cfg.method.recluster_every
        if not (every and epoch % every == 0):
            return None
        m = self.cfg.method
        views = [self.bank.rows(v) for v in range(self.bank.views)]
        index = self.grouping.recluster(views, m.kmeans_iters, seed=self.cfg.train.seed * 7919 + epoch * m.heads)
        counts = torch.stack([torch.bincount(i, minlength=m.groups) for i in index])
        if trainer.dist.world > 1:
            dist.all_reduce(counts)
        return {"kind": "recluster", "epoch": epoch, "step": trainer.progress.step, **group_health(counts)}

    def training_step(self, trainer: "Trainer", batch: dict) -> torch.Tensor:
        """One optimiser step's forward and backward on this process's share of the global batch, in
        train.accumulate sub-batches (gradients summed over the sub-batches of losses divided by A).
        Returns the loss (mean over sub-batches, detached)."""
        accumulate, step = self.cfg.train.accumulate, trainer.progress.step
        beta = group_momentum(self.cfg.method, step, trainer.progress.total_steps)
        losses = []
        self._written = []
        for i, sub in enumerate([batch] if accumulate == 1 else split(batch, accumulate)):
            with phase("crops"):
                crops = trainer.data.crops(sub, step * accumulate + i)
            q, k = swap_roles(crops["q"], crops["k"], step, self.cfg.method.swap)
            last = i == accumulate - 1
            with trainer.grad_sync(last):
                with trainer.autocast():
                    z_k, z_q, p_q = self.forward_crops(trainer.online, q, k)
                    dtype = self.step_dtype(z_q.device)  # the groups stay float32: a master copy
                    with phase("grouping step"):
                        loss = self.grouping(z_k.to(dtype), z_q[self.update_crops].to(dtype), p_q.to(dtype), beta,
                                             last=last)
                with phase("backward"):
                    (loss / accumulate).backward()
            losses.append(loss.detach())
            self._written.append((sub["index"], z_q[self.update_crops].detach()))
        return torch.stack(losses).mean()

    @torch.no_grad()
    def after_optimizer_step(self, trainer: "Trainer") -> None:
        """EMA of the momentum network; the step's update-crop rows into the bank; group meters."""
        self.ema_update(ema_rate(self.cfg.method, trainer.progress.step, trainer.progress.total_steps))
        for index, rows in self._written:
            self.bank.write(index, rows)
        self._written = []
        counts = self.grouping.result.counts.cpu()
        self.counts += counts
        health = group_health(counts)
        self.watch.update(health["in_use"], min(self.cfg.method.groups, self.cfg.train.batch_size), trainer.say)

    # ----------------------------------------------------------------- records
    def step_metrics(self, trainer: "Trainer") -> dict:
        """The last step's figures for the log: group momentum and every head's group health."""
        beta = group_momentum(self.cfg.method, trainer.progress.step - 1, trainer.progress.total_steps)
        return {"beta": beta, **group_health(self.grouping.result.counts.cpu())}

    def progress_fields(self, trainer: "Trainer") -> dict:
        """Short figures for the progress bar."""
        return {"beta": f"{group_momentum(self.cfg.method, trainer.progress.step, trainer.progress.total_steps):.4f}",
                "groups": int(self.counts[0].gt(0).sum())}

    def epoch_metrics(self) -> dict:
        """Groups in use and normalised assignment entropy of every head over the epoch's steps; resets them."""
        health = group_health(self.counts)
        self.counts.zero_()
        return {"nonempty": health["in_use"], "entropy": health["entropy"]}

    def encoder(self) -> nn.Module:
        """The network whose features are evaluated (kNN, linear): the online backbone."""
        return self.online.backbone

    # ----------------------------------------------------------------- state
    def method_state(self) -> dict:
        """State shared by every process, beside the model's: the epoch's group meters."""
        return {"counts": self.counts.clone()}

    def load_method_state(self, state: dict) -> None:
        self.counts.copy_(state["counts"])

    def rank_state(self) -> dict:
        """This process's own state: its memory bank."""
        return {"bank": self.bank.state_dict()}

    def load_rank_state(self, state: dict | None) -> None:
        """This process's bank; None (no state for this position) leaves the bank to the fill pass."""
        self.bank_ready = state is not None
        if state is not None:
            self.bank.load_state_dict(state["bank"])

    # ----------------------------------------------------------------- networks
    @torch.no_grad()
    def reset_momentum(self) -> None:
        """theta_k <- theta_q (start of every epoch)."""
        self.momentum.backbone.load_state_dict(self.online.backbone.state_dict())
        self.momentum.projector.load_state_dict(self.online.projector.state_dict())

    @torch.no_grad()
    def ema_update(self, rate: float) -> None:
        """theta_k <- rate * theta_k + (1 - rate) * theta_q; buffers (BN statistics) are copied."""
        pairs = [(self.momentum.backbone, self.online.backbone), (self.momentum.projector, self.online.projector)]
        for target, source in pairs:
            k_params, q_params = list(target.parameters()), list(source.parameters())
            torch._foreach_mul_(k_params, rate)
            torch._foreach_add_(k_params, q_params, alpha=1.0 - rate)
            for k_buf, q_buf in zip(target.buffers(), source.buffers()):
                k_buf.copy_(q_buf)

    def forward_crops(self, online: nn.Module, q: list[torch.Tensor], k: list[torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both networks over one iteration's crops. online: self.online or its DDP wrapper; q, k: the q and
        k crop sets, each L large crops first, then data.small_crops small ones.
        Returns (z_k [T, N, D] of the target crops, z [L, N, D] of the large q crops, p [V, N, D] of every
        q crop)."""
        large = len(q) - self.small_crops
        if len(k) != len(q) or large < LARGE_CROPS:
            raise ValueError(f"q and k must each hold {LARGE_CROPS} large + data.small_crops={self.small_crops} "
                             f"small crops, got {len(q)} q and {len(k)} k crops")
        with phase("online forward"):
            z_q, p_q = online(q)
            z_update = self.update_rows(q[:large], z_q[:large])
        with phase("momentum forward"), torch.no_grad():
            # targets: momentum z of the target crops; pooled with them, the small crops' BatchNorm
            # statistics shape the targets (per resolution they could not: not forwarded)
            momentum_in = [k[i] for i in self.cfg.method.target_crops]
            pooled = self.momentum.bn_crops == "pooled"
            z_k = self.momentum(momentum_in + (k[large:] if self.cfg.method.momentum_small and pooled else []))
            z_k = z_k[:len(momentum_in)]
        return z_k, z_update, p_q

    def update_rows(self, large: list[torch.Tensor], z_large: torch.Tensor) -> torch.Tensor:
        """The online z [L, N, D] of the large q crops (update_crops index them), given their crops and z from
        the training forward. With drop path in the online backbone (training) they come from a second,
        no-grad forward with drop path off, as the authors recompute them for Swin (then no gradient flows
        through them, whatever method.grad_into_groups); otherwise they are z_large."""
        paths = drop_paths(self.online.backbone)
        if not (paths and self.online.training):
            return z_large
        for m in paths:
            m.train(False)
        try:
            with torch.no_grad():
                z, _ = self.online(large)
        finally:
            for m in paths:
                m.train(True)
        return z

    def step_dtype(self, device: torch.device) -> torch.dtype:
        """dtype of the grouping step's rows (method.step_dtype): "auto" follows a bfloat16 autocast
        region (the fused kernels' tensor-core path), else float32."""
        if self.cfg.method.step_dtype != "auto":
            return getattr(torch, self.cfg.method.step_dtype)
        kind = device.type
        autocast_bf16 = torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16
        return torch.bfloat16 if autocast_bf16 else torch.float32
