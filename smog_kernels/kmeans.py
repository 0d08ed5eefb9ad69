"""Spherical k-means (Lloyd's iterations on the unit sphere) over any backend's ops."""
from __future__ import annotations

from typing import Callable

import torch

from smog_kernels.backend import Backend

StatsReducer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def initial_groups(x: torch.Tensor, num_groups: int, seed: int) -> torch.Tensor:
    """K distinct rows of x (float32), drawn by a CPU generator seeded with `seed`: same rows on any device."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(x.shape[0], generator=generator)[:num_groups]
    return x[rows.to(x.device)].float()


def lloyd(
    ops: Backend,
    x: torch.Tensor,
    num_groups: int,
    iters: int,
    seed: int = 0,
    init: torch.Tensor | None = None,
    reduce_stats: StatsReducer | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`iters` rounds of E-step = ops.assign and M-step = normalised group mean (ops.momentum_update
    with beta = 0, so an empty group stays where it is). Groups are kept in float32 and rounded
    to x's dtype for each E-step. `reduce_stats(sums, counts)` (e.g. an all-reduce over processes)
    runs between the statistics and the update. Returns (groups in x's dtype, index of x's rows
    under those returned groups: a final E-step, as scikit-learn's labels_)."""
    groups = initial_groups(x, num_groups, seed) if init is None else init.float()
    for _ in range(iters):
        index, _ = ops.assign(x, groups.to(x.dtype))
        sums, counts = ops.group_stats(x, index, num_groups)
        if reduce_stats is not None:
            sums, counts = reduce_stats(sums, counts)
        groups = ops.momentum_update(groups, sums, counts, 0.0)
    groups = groups.to(x.dtype)
    index, _ = ops.assign(x, groups)
    return groups, index
