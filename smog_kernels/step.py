"""One SMoG grouping step for one head, in four phases (docs/method.md, "One training iteration"), and
the same phases over the sub-batches of an accumulation cycle.

1. first pass: the groups of the target rows and of the update rows under the groups G *before* the
   update, in one assignment pass over both (and, where the backend declares ASSIGN_AND_STATS, the
   statistics of the update rows in that same pass);
2. statistics: sums and counts of the update rows by group, reduced across processes by a reducer;
3. update: the momentum update of G by those statistics, giving G';
4. loss: every prediction scored against G', one loss pass whose backward reuses its outputs.

`GroupingCycle` runs these phases over A sub-batches under the G the cycle starts from (the authors'
multi_forward): every sub-batch takes phase 1; its statistics add up; sub-batches before the last are
scored against G; the last one completes the statistics (one reduction across processes), moves G to
G' and is scored against G'. `grouping_step` is a cycle of one sub-batch.

With grad_groups (lightly's variant) phases 2 and 3 run on the reference backend, whose torch ops
let the gradient flow through G' into the update rows.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch

from smog_kernels import _validate as check
from smog_kernels.api import run_loss
from smog_kernels.backend import ASSIGN_AND_STATS, Backend
from smog_kernels.kmeans import StatsReducer
from smog_kernels.reference import REFERENCE
from smog_kernels.registry import resolve

Stats = tuple[torch.Tensor, torch.Tensor]  # (sums float32 [K, D], counts int64 [K])


class GroupingStep(NamedTuple):
    loss: torch.Tensor  # scalar float32: mean over target sets, views and rows
    groups: torch.Tensor  # G' [K, D], the updated groups (G before the last sub-batch of a cycle)
    targets: torch.Tensor  # int64 [T, N]: groups of the target rows under G
    index: torch.Tensor  # int64 [M]: groups of the update rows under G
    counts: torch.Tensor  # int64 [K]: members per group (the cycle's so far; global once reduced)


@runtime_checkable
class GatheringReducer(Protocol):
    """A reducer given the rows themselves (smog_kernels.distributed.GroupStatsSync), so that it can
    all-gather them where that moves fewer bytes than all-reducing the statistics."""

    def from_rows(self, x: torch.Tensor, index: torch.Tensor, num_groups: int, backend: str) -> Stats: ...


def check_step(groups: torch.Tensor, target_rows: torch.Tensor, update_rows: torch.Tensor,
               predictions: torch.Tensor, beta: float | torch.Tensor, temperature: float) -> None:
    """ValueError/TypeError naming the argument and shapes for arguments grouping_step cannot take."""
    check.features("groups", groups)
    check.features("target_rows", target_rows, rank=3)
    check.features("update_rows", update_rows)
    check.features("predictions", predictions, rank=3)
    named = dict(groups=groups, target_rows=target_rows, update_rows=update_rows, predictions=predictions)
    check.same_device(**named)
    for name, t in named.items():
        check.same_dim("groups", groups, name, t)
    check.same_dtype("target_rows", target_rows, "update_rows", update_rows)
    check.same_dtype("target_rows", target_rows, "predictions", predictions)
    if groups.dtype not in (target_rows.dtype, torch.float32):
        raise TypeError(f"groups ({groups.dtype}) must have the rows' dtype ({target_rows.dtype}) or be "
                        f"float32 (a float32 master copy with 16-bit rows)")
    if groups.shape[0] < 1:
        raise ValueError(f"groups must hold at least one group (K >= 1), got shape {tuple(groups.shape)}")
    if predictions.shape[1] != target_rows.shape[1]:
        raise ValueError(
            f"predictions [V, N, D] and target_rows [T, N, D] must have the same N, got predictions "
            f"{tuple(predictions.shape)} and target_rows {tuple(target_rows.shape)}"
        )
    for name, t in named.items():
        check.unit_rows(name, t)
    if not isinstance(beta, torch.Tensor):  # a device tensor (GraphedGroupingStep) is checked by its owner
        check.unit_interval("beta", beta)
    check.positive("temperature", temperature)


class FirstPass(NamedTuple):
    targets: torch.Tensor  # int64 [T, N]
    index: torch.Tensor  # int64 [M]
    stats: Stats | None  # the update rows' local statistics, when the pass computed them


def first_pass(backend: Backend, groups: torch.Tensor, target_rows: torch.Tensor, update_rows: torch.Tensor,
               with_stats: bool) -> FirstPass:
    """One assignment pass over the target rows [T, N, D] and the update rows [M, D] together, against G
    in the rows' dtype; with_stats (a backend declaring ASSIGN_AND_STATS) also sums the update rows."""
    t, n, d = target_rows.shape
    rows = torch.cat([target_rows.detach().reshape(t * n, d), update_rows.detach()])
    products = groups.detach().to(target_rows.dtype)  # no copy when the groups have the rows' dtype
    stats = None
    if with_stats:
        index_all, _, sums, counts = backend.assign_and_stats(rows, products, stats_from=t * n)
        stats = sums, counts
    else:
        index_all, _ = backend.assign(rows, products)
    return FirstPass(index_all[: t * n].view(t, n), index_all[t * n :], stats)


def update(backend: Backend, groups: torch.Tensor, stats: Stats, beta: float | torch.Tensor) -> torch.Tensor:
    """G' [K, D] in groups' dtype; a tensor beta (a captured graph's device scalar) takes the reference's
    elementwise ops, which read it on the device."""
    if isinstance(beta, torch.Tensor):
        return REFERENCE.momentum_update(groups, *stats, beta)
    return backend.momentum_update(groups, *stats, float(beta))


def score(backend: Backend, predictions: torch.Tensor, groups: torch.Tensor, targets: torch.Tensor,
          temperature: float, grad_groups: bool) -> torch.Tensor:
    """Mean loss of every prediction [V, N, D] against the groups [K, D] for each target set [T, N]."""
    v, n, d = predictions.shape
    loss_targets = targets.repeat(1, v)  # row v * N + b of the flattened predictions -> targets[:, b]
    scored = groups.to(predictions.dtype)  # differentiable cast (grad_groups) when the groups are float32
    return run_loss(backend, predictions.reshape(v * n, d), scored, loss_targets, temperature, "mean", grad_groups)


class GroupingCycle:
    """The grouping step over the sub-batches of one accumulation cycle, for one head.

    groups [K, D]: G, the groups the cycle starts from (not modified). Call `step` once per sub-batch,
    with last=True on the last one. reduce_stats: the cross-process reducer of the statistics (one
    reduction per cycle); a GatheringReducer is given the cycle's update rows. The backend is chosen at
    the first sub-batch and kept for the cycle (a backward reuses its forward's backend).
    """

    def __init__(self, groups: torch.Tensor, temperature: float, grad_groups: bool = False,
                 reduce_stats: StatsReducer | None = None, backend: str = "auto") -> None:
        self.groups, self.temperature, self.grad_groups = groups, temperature, grad_groups
        self.reduce_stats, self.backend_name = reduce_stats, backend
        self.gathering = isinstance(reduce_stats, GatheringReducer)
        self.backend: Backend | None = None
        self.pending_stats: Stats | None = None  # the earlier sub-batches' local statistics
        self.pending_rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # their (rows, index): gathering reducer
        self.done = False

    def step(self, target_rows: torch.Tensor, update_rows: torch.Tensor, predictions: torch.Tensor,
             beta: float | torch.Tensor, last: bool = True) -> GroupingStep:
        """One sub-batch: target_rows [T, N, D] (momentum z of the target crops), update_rows [M, D] (online z
        whose statistics move the groups), predictions [V, N, D] (online p; the gradient flows into them).
        The loss is the mean over t, v, b of -log softmax_k(<p_vb, g_k> / temperature)[targets[t, b]], against
        G' on the last sub-batch and against G before it."""
        check_step(self.groups, target_rows, update_rows, predictions, beta, self.temperature)
        if self.done:
            raise RuntimeError("this GroupingCycle has completed (its last sub-batch ran): start a new cycle")
        if self.grad_groups and not (last and self.pending_stats is None and not self.pending_rows):
            raise ValueError("grad_groups=True cannot accumulate sub-batches: the gradient through G' would "
                             "have to reach the earlier sub-batches' rows (run each step as one sub-batch)")
        if self.backend is None:  # one backend for the whole cycle, chosen at the groups' K
            self.backend = resolve(self.backend_name, target_rows, self.groups.shape[0], "step")
        backend = self.backend
        stats_backend = REFERENCE if self.grad_groups else backend
        fused = ASSIGN_AND_STATS in backend.capabilities and not (self.grad_groups or self.gathering)
        num_groups = self.groups.shape[0]

        assigned = first_pass(backend, self.groups, target_rows, update_rows, fused)
        members = update_rows if self.grad_groups else update_rows.detach()
        if self.gathering:
            self.pending_rows.append((members, assigned.index))
        else:
            local = assigned.stats if assigned.stats is not None else stats_backend.group_stats(
                members, assigned.index, num_groups)
            self.pending_stats = local if self.pending_stats is None else (
                self.pending_stats[0] + local[0], self.pending_stats[1] + local[1])
        if not last:
            loss = score(backend, predictions, self.groups.detach(), assigned.targets, self.temperature, False)
            counts = self.pending_stats[1] if self.pending_stats is not None else _counts(self.pending_rows, num_groups)
            return GroupingStep(loss, self.groups.detach(), assigned.targets, assigned.index, counts)

        self.done = True
        stats = self._reduced(stats_backend, num_groups)
        updated = update(stats_backend, self.groups.detach(), stats, beta)
        loss = score(backend, predictions, updated, assigned.targets, self.temperature, self.grad_groups)
        return GroupingStep(loss, updated if self.grad_groups else updated.detach(), assigned.targets,
                            assigned.index, stats[1])

    def _reduced(self, backend: Backend, num_groups: int) -> Stats:
        """The cycle's statistics, across processes when there is a reducer."""
        if self.gathering:
            rows, index = zip(*self.pending_rows)
            rows, index = (rows[0], index[0]) if len(rows) == 1 else (torch.cat(rows), torch.cat(index))
            return self.reduce_stats.from_rows(rows, index, num_groups, backend=backend.name)
        return self.pending_stats if self.reduce_stats is None else self.reduce_stats(*self.pending_stats)


def _counts(pending_rows: list[tuple[torch.Tensor, torch.Tensor]], num_groups: int) -> torch.Tensor:
    """Members per group [K] of the rows kept for a gathering reducer (this process's, so far)."""
    index = torch.cat([i for _, i in pending_rows])
    return torch.zeros(num_groups, dtype=torch.int64, device=index.device).index_add_(0, index, torch.ones_like(index))


def grouping_step(
    groups: torch.Tensor,
    target_rows: torch.Tensor,
    update_rows: torch.Tensor,
    predictions: torch.Tensor,
    beta: float | torch.Tensor,
    temperature: float,
    grad_groups: bool = False,
    reduce_stats: StatsReducer | None = None,
    backend: str = "auto",
) -> GroupingStep:
    """SMoG steps 1-5 for one head: a GroupingCycle of one sub-batch.

    groups [K, D]: the groups G before this step (not modified). target_rows [T, N, D]: momentum
    z of the T large k crops. update_rows [M, D]: online z whose statistics move the groups.
    predictions [V, N, D]: online p of every q crop; the gradient flows into them. The loss is the
    mean over t, v, b of -log softmax_k(<p_vb, g'_k> / temperature)[targets[t, b]].
    groups may be float32 with 16-bit rows (a float32 master copy, as under mixed precision): the
    products then use the groups rounded to the rows' dtype, while the momentum update and the
    returned G' stay float32.
    beta: a float, or a 0-dim float32 tensor on the rows' device (what a captured CUDA graph reads
    each replay; the update then runs as the reference's elementwise ops, and the value is not checked).
    With grad_groups (lightly's variant) the gradient also flows through G' into update_rows via
    the (1 - beta) * mean term; reduce_stats must then be autograd-aware.
    """
    cycle = GroupingCycle(groups, temperature, grad_groups, reduce_stats, backend)
    return cycle.step(target_rows, update_rows, predictions, beta)
