"""One SMoG grouping step for one head, in four phases (docs/method.md, "One training iteration").

1. first pass: the groups of the target rows and of the update rows under the groups G *before* the
   update, in one assignment pass over both (and, where the backend declares ASSIGN_AND_STATS, the
   statistics of the update rows in that same pass);
2. statistics: sums and counts of the update rows by group, reduced across processes by a reducer;
3. update: the momentum update of G by those statistics, giving G';
4. loss: every prediction scored against G', one loss pass whose backward reuses its outputs.

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


class GroupingStep(NamedTuple):
    loss: torch.Tensor  # scalar float32: mean over target sets, views and rows
    groups: torch.Tensor  # G' [K, D], the updated groups (detached unless grad_groups)
    targets: torch.Tensor  # int64 [T, N]: groups of the target rows under G
    index: torch.Tensor  # int64 [M]: groups of the update rows under G
    counts: torch.Tensor  # int64 [K]: members per group (global when a reducer is given)

    @property
    def centroids(self) -> torch.Tensor:
        """The former name of `groups`."""
        return self.groups


@runtime_checkable
class GatheringReducer(Protocol):
    """A reducer given the rows themselves (smog_kernels.distributed.GroupStatsSync), so that it can
    all-gather them where that moves fewer bytes than all-reducing the statistics."""

    def from_rows(self, x: torch.Tensor, index: torch.Tensor, num_groups: int,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]: ...


def _check_step(groups, target_rows, update_rows, predictions, beta, temperature) -> None:
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
    if not isinstance(beta, torch.Tensor):  # a device tensor (GraphedGroupingStep) is checked by its owner
        check.unit_interval("beta", beta)
    check.positive("temperature", temperature)


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
    *,
    grad_centroids: bool | None = None,
) -> GroupingStep:
    """SMoG steps 1-5 for one head.

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
    the (1 - beta) * mean term; reduce_stats must then be autograd-aware. grad_centroids is the
    former name of grad_groups.
    """
    if grad_centroids is not None:
        grad_groups = grad_centroids
    _check_step(groups, target_rows, update_rows, predictions, beta, temperature)
    chosen = resolve(backend, target_rows, groups.shape[0], "step")  # one backend for the whole step
    stats_backend = REFERENCE if grad_groups else chosen
    gathering = isinstance(reduce_stats, GatheringReducer)
    fused = ASSIGN_AND_STATS in chosen.capabilities and not (grad_groups or gathering)

    targets, index, first_pass_stats = _first_pass(chosen, groups, target_rows, update_rows, fused)
    members = update_rows if grad_groups else update_rows.detach()
    sums, counts = _statistics(stats_backend, members, index, groups.shape[0], first_pass_stats, reduce_stats)
    updated = _update(stats_backend, groups.detach(), sums, counts, beta)
    loss = _loss(chosen, predictions, updated, targets, temperature, grad_groups)
    return GroupingStep(loss, updated if grad_groups else updated.detach(), targets, index, counts)


def _first_pass(backend: Backend, groups: torch.Tensor, target_rows: torch.Tensor, update_rows: torch.Tensor,
                with_stats: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """-> (targets int64 [T, N], index int64 [M], the update rows' (sums, counts) when with_stats else None):
    one assignment pass over the target rows and the update rows together, against G in the rows' dtype."""
    t, n, d = target_rows.shape
    rows = torch.cat([target_rows.detach().reshape(t * n, d), update_rows.detach()])
    products = groups.detach().to(target_rows.dtype)  # no copy when the groups have the rows' dtype
    stats = None
    if with_stats:
        index_all, _, sums, counts = backend.assign_and_stats(rows, products, stats_from=t * n)
        stats = sums, counts
    else:
        index_all, _ = backend.assign(rows, products)
    return index_all[: t * n].view(t, n), index_all[t * n :], stats


def _statistics(backend: Backend, members: torch.Tensor, index: torch.Tensor, num_groups: int,
                first_pass_stats: tuple[torch.Tensor, torch.Tensor] | None,
                reduce_stats: StatsReducer | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums float32 [K, D], counts int64 [K]) of the update rows by group, across processes with a reducer."""
    if isinstance(reduce_stats, GatheringReducer):
        return reduce_stats.from_rows(members, index, num_groups, backend=backend.name)
    if first_pass_stats is None:
        first_pass_stats = backend.group_stats(members, index, num_groups)
    return first_pass_stats if reduce_stats is None else reduce_stats(*first_pass_stats)


def _update(backend: Backend, groups: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor,
            beta: float | torch.Tensor) -> torch.Tensor:
    """G' [K, D] in groups' dtype; a tensor beta (a captured graph's device scalar) takes the reference's
    elementwise ops, which read it on the device."""
    if isinstance(beta, torch.Tensor):
        return REFERENCE.momentum_update(groups, sums, counts, beta)
    return backend.momentum_update(groups, sums, counts, float(beta))


def _loss(backend: Backend, predictions: torch.Tensor, updated: torch.Tensor, targets: torch.Tensor,
          temperature: float, grad_groups: bool) -> torch.Tensor:
    """Mean loss of every prediction [V, N, D] against G' for each target set [T, N]."""
    v, n, d = predictions.shape
    loss_targets = targets.repeat(1, v)  # row v * N + b of the flattened predictions -> targets[:, b]
    scored = updated.to(predictions.dtype)  # differentiable cast (grad_groups) when the groups are float32
    return run_loss(backend, predictions.reshape(v * n, d), scored, loss_targets, temperature, "mean", grad_groups)
