"""One SMoG grouping step for one head, as few passes as the backend allows.

The method's order (docs/method.md, "One training iteration"): targets and the grouping assignment are
taken against the groups *before* the update, the statistics of the assigned rows (reduced across
processes when a reducer is given) move the groups, and the loss scores every prediction against the
*updated* groups. Launches: one assignment pass over the target and update rows together, the
statistics, the (reduction and) momentum update, and one loss pass whose backward reuses its output.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from smog_kernels import _validate as check
from smog_kernels import reference
from smog_kernels._backends import resolve_for
from smog_kernels.api import run_loss
from smog_kernels.kmeans import StatsReducer


class GroupingStep(NamedTuple):
    loss: torch.Tensor  # scalar float32: mean over target sets, views and rows
    centroids: torch.Tensor  # G' [K, D], the updated groups (detached unless grad_centroids)
    targets: torch.Tensor  # int64 [T, N]: groups of the target rows under G
    index: torch.Tensor  # int64 [M]: groups of the update rows under G
    counts: torch.Tensor  # int64 [K]: members per group (global when a reducer is given)


def _check_step(centroids, target_rows, update_rows, predictions, beta, temperature) -> None:
    check.features("centroids", centroids)
    check.features("target_rows", target_rows, rank=3)
    check.features("update_rows", update_rows)
    check.features("predictions", predictions, rank=3)
    named = dict(centroids=centroids, target_rows=target_rows, update_rows=update_rows, predictions=predictions)
    check.same_device(**named)
    for name, t in named.items():
        check.same_dim("centroids", centroids, name, t)
    check.same_dtype("target_rows", target_rows, "update_rows", update_rows)
    check.same_dtype("target_rows", target_rows, "predictions", predictions)
    if centroids.dtype not in (target_rows.dtype, torch.float32):
        raise TypeError(f"centroids ({centroids.dtype}) must have the rows' dtype ({target_rows.dtype}) or be "
                        f"float32 (a float32 master copy of the groups with 16-bit rows)")
    if centroids.shape[0] < 1:
        raise ValueError(f"centroids must hold at least one group (K >= 1), got shape {tuple(centroids.shape)}")
    if predictions.shape[1] != target_rows.shape[1]:
        raise ValueError(
            f"predictions [V, N, D] and target_rows [T, N, D] must have the same N, got predictions "
            f"{tuple(predictions.shape)} and target_rows {tuple(target_rows.shape)}"
        )
    if not isinstance(beta, torch.Tensor):  # a device tensor (GraphedGroupingStep) is checked by its owner
        check.unit_interval("beta", beta)
    check.positive("temperature", temperature)


def grouping_step(
    centroids: torch.Tensor,
    target_rows: torch.Tensor,
    update_rows: torch.Tensor,
    predictions: torch.Tensor,
    beta: float | torch.Tensor,
    temperature: float,
    grad_centroids: bool = False,
    reduce_stats: StatsReducer | None = None,
    backend: str = "auto",
) -> GroupingStep:
    """SMoG steps 1-5 for one head.

    centroids [K, D]: the groups G before this step (not modified). target_rows [T, N, D]: momentum
    z of the T large k crops. update_rows [M, D]: online z whose statistics move the groups.
    predictions [V, N, D]: online p of every q crop; the gradient flows into them. The loss is the
    mean over t, v, b of -log softmax_k(<p_vb, g'_k> / temperature)[targets[t, b]].
    centroids may be float32 with 16-bit rows (a float32 master copy of the groups, as under mixed
    precision): the products then use the groups rounded to the rows' dtype, while the momentum update
    and the returned G' stay float32.
    beta: a float, or a 0-dim float32 tensor on the rows' device (what a captured CUDA graph reads
    each replay; the update then runs as the reference's elementwise ops, and the value is not checked).
    With grad_centroids (lightly's variant) the gradient also flows through G' into update_rows via
    the (1 - beta) * mean term; reduce_stats must then be autograd-aware. A reducer with a
    `from_rows(x, index, num_groups, backend)` method (smog_kernels.distributed.GroupStatsSync) is
    given the rows themselves, so that it can all-gather them where that moves fewer bytes.
    """
    _check_step(centroids, target_rows, update_rows, predictions, beta, temperature)
    resolved = resolve_for("step", backend, target_rows, centroids.shape[0])  # one backend for the whole step
    ops = resolved[1]
    t, n, d = target_rows.shape
    k = centroids.shape[0]
    groups = centroids.detach()
    products = groups.to(target_rows.dtype)  # the groups in the rows' dtype (no copy when it is theirs)
    rows = torch.cat([target_rows.detach().reshape(t * n, d), update_rows.detach()])
    from_rows = getattr(reduce_stats, "from_rows", None)  # a reducer that can gather rows instead
    fused_first_pass = None if grad_centroids or from_rows else getattr(ops, "assign_and_stats", None)
    if fused_first_pass is not None:
        index_all, _, sums, counts = fused_first_pass(rows, products, stats_from=t * n)
    else:
        index_all, _ = ops.assign(rows, products)
    targets, index = index_all[: t * n].view(t, n), index_all[t * n :]

    # the grad-into-groups variant needs differentiable statistics: the reference's
    stats_name, stats_ops = ("reference", reference) if grad_centroids else resolved
    members = update_rows if grad_centroids else update_rows.detach()
    if from_rows is not None:
        sums, counts = from_rows(members, index, k, backend=stats_name)
    else:
        if fused_first_pass is None:
            sums, counts = stats_ops.group_stats(members, index, k)
        if reduce_stats is not None:
            sums, counts = reduce_stats(sums, counts)
    if isinstance(beta, torch.Tensor):
        updated = reference.momentum_update(groups, sums, counts, beta)
    else:
        updated = stats_ops.momentum_update(groups, sums, counts, float(beta))

    v = predictions.shape[0]
    loss_targets = targets.repeat(1, v)  # row v * N + b of the flattened predictions -> targets[:, b]
    scored = updated.to(predictions.dtype)  # differentiable cast (grad_centroids) when the groups are float32
    loss = run_loss(resolved, predictions.reshape(v * n, d), scored, loss_targets, temperature, "mean", grad_centroids)
    return GroupingStep(loss, updated if grad_centroids else updated.detach(), targets, index, counts)
