"""Fake (meta) kernels: output shapes and dtypes of every registered operator, so that torch.compile
traces the ops without running them. One set, registered for each operator namespace that has the op
(`smog::` of the compiled extension, `smog_triton::` of the Triton launchers)."""
from __future__ import annotations

from collections.abc import Iterable

import torch


def assign(x, groups):
    n = x.shape[0]
    return x.new_empty(n, dtype=torch.int64), x.new_empty(n, dtype=torch.float32)


def assign_and_stats(x, groups, stats_from):
    n, d = x.shape
    k = groups.shape[0]
    return (x.new_empty(n, dtype=torch.int64), x.new_empty(n, dtype=torch.float32),
            x.new_empty(k, d, dtype=torch.float32), x.new_empty(k, dtype=torch.int64))


def group_stats(x, index, num_groups):
    return (x.new_empty(num_groups, x.shape[1], dtype=torch.float32),
            x.new_empty(num_groups, dtype=torch.int64))


def momentum_update(groups, sums, counts, beta):
    return torch.empty_like(groups)


def loss_forward(p, groups, targets, inv_temperature):
    n, d = p.shape
    return (p.new_empty(n, dtype=torch.float32), p.new_empty(targets.shape[0], n, dtype=torch.float32),
            p.new_empty(n, d, dtype=torch.float32))


def loss_group_grad(p, groups, lse, row_weight, inv_temperature):
    return groups.new_empty(groups.shape, dtype=torch.float32)


FAKES = {f.__name__: f for f in (assign, assign_and_stats, group_stats, momentum_update, loss_forward, loss_group_grad)}


def register(namespace: str, ops: Iterable[str]) -> None:
    """Register the fake of each op named in `ops` for the operator of that name in `namespace`."""
    for op in ops:
        torch.library.register_fake(f"{namespace}::{op}")(FAKES[op])
