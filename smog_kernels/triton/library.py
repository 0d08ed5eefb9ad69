"""The Triton launchers registered as PyTorch operators `smog_triton::*` (torch.library.custom_op, with
the fake kernels of smog_kernels.fakes), so that torch.compile traces them as opaque ops with known
output shapes instead of breaking the graph. The backend functions in smog_kernels.triton call these
while compiling and the plain launchers otherwise (the dispatcher adds host time to every call)."""
from __future__ import annotations

import torch

from smog_kernels import fakes
from smog_kernels.triton import ops

_NS = "smog_triton"


@torch.library.custom_op(f"{_NS}::assign", mutates_args=())
def assign(x: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ops.assign(x, groups)


@torch.library.custom_op(f"{_NS}::assign_and_stats", mutates_args=())
def assign_and_stats(
    x: torch.Tensor, groups: torch.Tensor, stats_from: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return ops.assign(x, groups, stats_from=stats_from)


@torch.library.custom_op(f"{_NS}::group_stats", mutates_args=())
def group_stats(x: torch.Tensor, index: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    return ops.group_stats(x, index, num_groups)


@torch.library.custom_op(f"{_NS}::momentum_update", mutates_args=())
def momentum_update(groups: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, beta: float) -> torch.Tensor:
    return ops.momentum_update(groups, sums, counts, beta)


@torch.library.custom_op(f"{_NS}::loss_forward", mutates_args=())
def loss_forward(
    p: torch.Tensor, groups: torch.Tensor, targets: torch.Tensor, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ops.loss_forward(p, groups, targets, inv_temperature)


@torch.library.custom_op(f"{_NS}::loss_group_grad", mutates_args=())
def loss_group_grad(
    p: torch.Tensor, groups: torch.Tensor, lse: torch.Tensor, row_weight: torch.Tensor, inv_temperature: float
) -> torch.Tensor:
    return ops.loss_group_grad(p, groups, lse, row_weight, inv_temperature)


fakes.register(_NS, fakes.FAKES)
