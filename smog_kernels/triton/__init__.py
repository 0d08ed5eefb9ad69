"""The "triton" backend: Triton kernels for the grouping step (GPU; CPU tensors under
TRITON_INTERPRET=1 for tests).

`TRITON` satisfies smog_kernels.backend.Backend and declares ASSIGN_AND_STATS: `assign_and_stats`
is the fused first launch of a training step (assignment of all rows + statistics of the update rows).

Statistics path: atomic float32 adds by default; the deterministic path (sort by group + segmented
sum, bitwise reproducible) is chosen by `smog_kernels.triton.ops.DETERMINISTIC = True`, by the
environment variable SMOG_TRITON_DETERMINISTIC=1, or by torch.use_deterministic_algorithms(True).

No function here synchronises with the host, so a step built from them can be captured in a CUDA
graph. Under torch.compile they dispatch to the registered operators `torch.ops.smog_triton.*`
(smog_kernels.triton.library); eagerly they call the launchers directly.
"""
from __future__ import annotations

import os

import torch

from smog_kernels.backend import ASSIGN_AND_STATS
from smog_kernels.triton import library, ops


def available() -> bool:
    """A GPU, or CPU tensors under the interpreter."""
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def supports(device: torch.device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def assign(x: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if _compiling():
        return library.assign(x, groups)
    return ops.assign(x, groups)


def assign_and_stats(
    x: torch.Tensor, groups: torch.Tensor, stats_from: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index, score) of every row of x, and (sums float32 [K, D], counts int64 [K]) of the rows
    x[stats_from:] by their assigned group, in one launch on the atomic path. Put the target rows
    first and the update rows last: one call per head assigns both and gathers the statistics."""
    if _compiling():
        return library.assign_and_stats(x, groups, int(stats_from))
    return ops.assign(x, groups, stats_from=int(stats_from))


def group_stats(x: torch.Tensor, index: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    if _compiling():
        return library.group_stats(x, index, num_groups)
    return ops.group_stats(x, index, num_groups)


def momentum_update(groups: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, beta: float) -> torch.Tensor:
    if _compiling():
        return library.momentum_update(groups, sums, counts, float(beta))
    return ops.momentum_update(groups, sums, counts, beta)


def loss_forward(p, groups, targets, inv_temperature):
    if _compiling():
        return library.loss_forward(p, groups, targets, float(inv_temperature))
    return ops.loss_forward(p, groups, targets, inv_temperature)


def loss_group_grad(p, groups, lse, row_weight, inv_temperature):
    if _compiling():
        return library.loss_group_grad(p, groups, lse, row_weight, float(inv_temperature))
    return ops.loss_group_grad(p, groups, lse, row_weight, inv_temperature)


class Triton:
    """The module's functions as a Backend object."""

    name = "triton"
    capabilities = frozenset({ASSIGN_AND_STATS})
    available = staticmethod(available)
    supports = staticmethod(supports)
    assign = staticmethod(assign)
    assign_and_stats = staticmethod(assign_and_stats)
    group_stats = staticmethod(group_stats)
    momentum_update = staticmethod(momentum_update)
    loss_forward = staticmethod(loss_forward)
    loss_group_grad = staticmethod(loss_group_grad)


TRITON = Triton()
