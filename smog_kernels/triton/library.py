"""The Triton launchers registered as PyTorch operators `smog_triton::*` (torch.library.custom_op
with fake kernels), so that torch.compile traces them as opaque ops with known output shapes instead
of breaking the graph. The backend functions in smog_kernels.triton call these while compiling and
the plain launchers otherwise (the dispatcher adds a few microseconds per call in eager mode)."""
from __future__ import annotations

import torch

from smog_kernels.triton import ops

_NS = "smog_triton"


@torch.library.custom_op(f"{_NS}::assign", mutates_args=())
def assign(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ops.assign(x, centroids)


@assign.register_fake
def _(x, centroids):
    n = x.shape[0]
    return x.new_empty(n, dtype=torch.int64), x.new_empty(n, dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::assign_and_stats", mutates_args=())
def assign_and_stats(
    x: torch.Tensor, centroids: torch.Tensor, stats_from: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return ops.assign(x, centroids, stats_from=stats_from)


@assign_and_stats.register_fake
def _(x, centroids, stats_from):
    n, d = x.shape
    k = centroids.shape[0]
    return (x.new_empty(n, dtype=torch.int64), x.new_empty(n, dtype=torch.float32),
            x.new_empty(k, d, dtype=torch.float32), x.new_empty(k, dtype=torch.int64))


@torch.library.custom_op(f"{_NS}::group_stats", mutates_args=())
def group_stats(x: torch.Tensor, index: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    return ops.group_stats(x, index, num_groups)


@group_stats.register_fake
def _(x, index, num_groups):
    return (x.new_empty(num_groups, x.shape[1], dtype=torch.float32),
            x.new_empty(num_groups, dtype=torch.int64))


@torch.library.custom_op(f"{_NS}::momentum_update", mutates_args=())
def momentum_update(centroids: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, beta: float) -> torch.Tensor:
    return ops.momentum_update(centroids, sums, counts, beta)


@momentum_update.register_fake
def _(centroids, sums, counts, beta):
    return centroids.new_empty(centroids.shape)


@torch.library.custom_op(f"{_NS}::loss_forward", mutates_args=())
def loss_forward(
    p: torch.Tensor, centroids: torch.Tensor, targets: torch.Tensor, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ops.loss_forward(p, centroids, targets, inv_temperature)


@loss_forward.register_fake
def _(p, centroids, targets, inv_temperature):
    n, d = p.shape
    return (p.new_empty(n, dtype=torch.float32), p.new_empty(targets.shape[0], n, dtype=torch.float32),
            p.new_empty(n, d, dtype=torch.float32))


@torch.library.custom_op(f"{_NS}::loss_centroid_grad", mutates_args=())
def loss_centroid_grad(
    p: torch.Tensor, centroids: torch.Tensor, lse: torch.Tensor, row_weight: torch.Tensor, inv_temperature: float
) -> torch.Tensor:
    return ops.loss_centroid_grad(p, centroids, lse, row_weight, inv_temperature)


@loss_centroid_grad.register_fake
def _(p, centroids, lse, row_weight, inv_temperature):
    return centroids.new_empty(centroids.shape, dtype=torch.float32)
