"""The SMoG method: online and momentum networks, H heads of K group features, one iteration's loss.

Per iteration and head h (docs/method.md, "One training iteration"), through smog_kernels.grouping_step
(in bfloat16 under bfloat16 autocast, against a float32 master copy of the groups):
targets = groups of the momentum z of the target k crops (method.target_crops) under G_h; the online z
of large q crop update_crops[h mod len] (method.update_crops) are assigned under G_h, their statistics
move G_h to G'_h; every q crop's prediction is scored against G'_h for every target. The loss is the mean
over heads. Both networks normalise all crop sizes with one set of BatchNorm statistics (model.bn_crops).

With gradient accumulation (train.accumulate = A > 1, the authors' multi_forward) `GroupCycle` runs the
step over A sub-batches under one G_h: see its docstring.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import smog_kernels
from smog.backbones import drop_paths
from smog.config import LARGE_CROPS, Config
from smog.networks import MomentumNet, OnlineNet

StatsReducer = smog_kernels.StatsReducer


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar: mean over heads, targets, q crops, samples
    groups: torch.Tensor  # [H, K, D]: the updated groups G'
    counts: torch.Tensor  # int64 [H, K]: members of each group in this step's update rows
    bank_rows: torch.Tensor  # [U, N, D]: online z of the update crops (detached), for the memory bank


class SMoG(nn.Module):
    """Online + momentum networks and the group features `groups` [H, K, D] (a buffer, unit rows)."""

    def __init__(self, backbone: nn.Module, cfg: Config):
        super().__init__()
        self.cfg = cfg.method
        self.small_crops = cfg.data.small_crops
        self.online = OnlineNet(backbone, cfg.model.proj_hidden, cfg.model.pred_hidden, cfg.model.dim,
                                cfg.model.bn_crops)
        self.momentum = MomentumNet(self.online)
        groups = F.normalize(torch.randn(cfg.method.heads, cfg.method.groups, cfg.model.dim), dim=2)
        self.register_buffer("groups", groups)
        # large q crops whose online z move the groups and fill the memory bank: head h takes view h mod len
        self.update_crops = list(cfg.method.update_crops)
        self._graphed: list[smog_kernels.GraphedGroupingStep] | None = None  # one per head (method.cuda_graphs)

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
        z_q, p_q = online(q)
        with torch.no_grad():  # targets: momentum z of the target crops; pooled with them, the small crops'
            # BatchNorm statistics shape the targets (per resolution they could not: not forwarded)
            momentum_in = [k[i] for i in self.cfg.target_crops]
            pooled = self.momentum.bn_crops == "pooled"
            z_k = self.momentum(momentum_in + (k[large:] if self.cfg.momentum_small and pooled else []))
            z_k = z_k[:len(momentum_in)]
        return z_k, self.update_rows(q[:large], z_q[:large]), p_q

    def step(self, online: nn.Module, q: list[torch.Tensor], k: list[torch.Tensor], beta: float,
             reduce_stats: StatsReducer | None = None) -> StepOutput:
        """One iteration's loss (crops as in `forward_crops`)."""
        z_k, z_q, p_q = self.forward_crops(online, q, k)
        dtype = self.step_dtype(z_q.device)  # the groups stay float32: a master copy under 16-bit rows
        rows_k, rows_q, rows_p = z_k.to(dtype), z_q.to(dtype), p_q.to(dtype)
        losses, groups, counts = [], [], []
        for h in range(self.cfg.heads):
            if self.cfg.cuda_graphs and reduce_stats is None:
                out = self._graphed_step(h)(self.groups[h], rows_k, rows_q[self.update_crop(h)], rows_p, beta)
            else:
                out = smog_kernels.grouping_step(
                    self.groups[h], rows_k, rows_q[self.update_crop(h)], rows_p, beta, self.cfg.temperature,
                    grad_groups=self.cfg.grad_into_groups, reduce_stats=reduce_stats, backend=self.cfg.backend)
            losses.append(out.loss)
            groups.append(out.groups.detach())
            counts.append(out.counts)
        return StepOutput(torch.stack(losses).mean(), torch.stack(groups), torch.stack(counts),
                          z_q[self.update_crops].detach())

    def update_crop(self, head: int) -> int:
        """The q crop whose online z move head `head`'s groups (bank view head mod len(update_crops))."""
        return self.update_crops[head % len(self.update_crops)]

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
        if self.cfg.step_dtype != "auto":
            return getattr(torch, self.cfg.step_dtype)
        kind = device.type
        autocast_bf16 = torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16
        return torch.bfloat16 if autocast_bf16 else torch.float32

    def _graphed_step(self, head: int) -> smog_kernels.GraphedGroupingStep:
        """Head `head`'s CUDA-graph step (made on first use). The stacking in `step` copies its outputs
        out of the graph buffers before the next call."""
        if self._graphed is None:
            make = smog_kernels.GraphedGroupingStep
            self._graphed = [make(self.cfg.temperature, self.cfg.grad_into_groups, self.cfg.backend)
                             for _ in range(self.cfg.heads)]
        return self._graphed[head]


class GroupCycle:
    """One cycle of gradient accumulation (the authors' multi_forward; docs/method.md): A sub-batches under
    the groups G [H, K, D] the cycle starts from (`model.groups`, unchanged until the caller copies G').

    Every sub-batch: targets of the momentum z and the assignment of the update rows under G; the update
    rows' statistics add up. Sub-batches before the last score their loss against G; the last one's
    statistics complete the cycle's: one reduction across processes (all heads in one call), one momentum
    update G -> G', and its loss is scored against G'. The caller backpropagates each sub-batch's loss.
    """

    def __init__(self, model: SMoG, beta: float, reduce_stats: StatsReducer | None = None):
        self.model, self.beta, self.reduce_stats = model, beta, reduce_stats
        heads, k, d = model.groups.shape
        self.sums = torch.zeros(heads, k, d, dtype=torch.float32, device=model.groups.device)
        self.counts = torch.zeros(heads, k, dtype=torch.int64, device=model.groups.device)

    def sub_batch(self, online: nn.Module, q: list[torch.Tensor], k: list[torch.Tensor], last: bool) -> StepOutput:
        """One sub-batch's loss (against G', else G) and bank rows; on the last one also G' [H, K, D] and
        the cycle's (global) counts [H, K], else G and the counts so far on this process."""
        model, cfg = self.model, self.model.cfg
        z_k, z_q, p_q = model.forward_crops(online, q, k)
        dtype = model.step_dtype(z_q.device)
        t, n, d = z_k.shape
        rows_k, rows_p = z_k.to(dtype).reshape(t * n, d), p_q.to(dtype)
        groups = model.groups.detach()
        targets = []
        for h in range(cfg.heads):
            products = groups[h].to(dtype)
            targets.append(smog_kernels.assign(rows_k, products, backend=cfg.backend)[0].view(t, n))
            update = z_q[model.update_crop(h)].detach().to(dtype)
            index = smog_kernels.assign(update, products, backend=cfg.backend)[0]
            sums, counts = smog_kernels.group_stats(update, index, groups.shape[1], backend=cfg.backend)
            self.sums[h] += sums
            self.counts[h] += counts
        if last:
            sums, counts = self.sums, self.counts
            if self.reduce_stats is not None:
                heads, num_groups = counts.shape
                flat = self.reduce_stats(sums.reshape(heads * num_groups, d), counts.reshape(-1))
                sums, counts = flat[0].view_as(self.sums), flat[1].view_as(self.counts)
            groups = torch.stack([smog_kernels.momentum_update(groups[h], sums[h], counts[h], self.beta,
                                                               backend=cfg.backend) for h in range(cfg.heads)])
            self.counts = counts
        v = rows_p.shape[0]
        predictions = rows_p.reshape(v * n, d)
        losses = [smog_kernels.group_contrastive_loss(predictions, groups[h].to(dtype), targets[h].repeat(1, v),
                                                      cfg.temperature, backend=cfg.backend)
                  for h in range(cfg.heads)]
        return StepOutput(torch.stack(losses).mean(), groups, self.counts, z_q[model.update_crops].detach())
