"""The "triton" backend: Triton kernels for the grouping step (GPU; CPU tensors under
TRITON_INTERPRET=1 for tests).

Implements the internal backend protocol of smog_kernels._backends (assign, group_stats,
momentum_update, loss_forward, loss_centroid_grad, supports) plus `assign_and_stats`, the fused
first launch of a training step (assignment of all rows + statistics of the update rows).

Statistics path: atomic float32 adds by default; the deterministic path (sort by group + segmented
sum) is chosen by `smog_kernels.triton.ops.DETERMINISTIC = True`, by the environment variable
SMOG_TRITON_DETERMINISTIC=1, or by torch.use_deterministic_algorithms(True).
"""
from __future__ import annotations

import os

import torch

from smog_kernels.triton import ops


def supports(device: torch.device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def assign(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ops.assign(x, centroids)


def assign_and_stats(
    x: torch.Tensor, centroids: torch.Tensor, stats_from: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index, score) of every row of x, and (sums, counts) of the rows x[stats_from:] by their
    assigned group: put the target rows first and the update rows last, one call per head."""
    return ops.assign(x, centroids, stats_from=int(stats_from))


def group_stats(x: torch.Tensor, index: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    return ops.group_stats(x, index, num_groups)


def momentum_update(centroids: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, beta: float) -> torch.Tensor:
    return ops.momentum_update(centroids, sums, counts, beta)


def loss_forward(p, centroids, targets, inv_temperature):
    return ops.loss_forward(p, centroids, targets, inv_temperature)


def loss_centroid_grad(p, centroids, lse, row_weight, inv_temperature):
    return ops.loss_centroid_grad(p, centroids, lse, row_weight, inv_temperature)
