"""Group health: whether the groups are being used, and a warning when they collapse.

Clustering methods can fail quietly: the loss still falls while a few groups take every sample. From the
members per group (a step's update rows, or the memory bank after re-clustering) this reports, per head,
the groups in use, the largest group's share of the members and the assignment entropy normalised by
log K (1 = every group equally full, 0 = one group takes all).
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def group_health(counts: torch.Tensor) -> dict[str, list]:
    """counts int64 [H, K] (members per group of each head) -> {"in_use": [H] ints, "largest_share": [H],
    "entropy": [H]} (shares and entropies as floats in [0, 1]; 0 for a head without members)."""
    counts = counts.double()
    totals = counts.sum(dim=1, keepdim=True)
    share = counts / totals.clamp(min=1)
    plogp = torch.where(share > 0, share * share.log(), torch.zeros_like(share))
    k = counts.shape[1]
    entropy = -plogp.sum(dim=1) / math.log(k) if k > 1 else torch.zeros(counts.shape[0], dtype=torch.float64)
    return {"in_use": [int(n) for n in (counts > 0).sum(dim=1)],
            "largest_share": [float(s) for s in share.max(dim=1).values],
            "entropy": [float(e) for e in entropy]}


class CollapseWatch:
    """Warns once when some head's groups in use stay below `fraction` of the groups a step can fill
    (min(K, rows per step)) for `records` steps in a row (method.collapse_fraction, method.collapse_steps)."""

    def __init__(self, fraction: float, steps: int):
        self.fraction, self.steps = fraction, steps
        self.run, self.warned = 0, False

    def update(self, in_use: list[int], fillable: int, say: Callable[[str], None]) -> None:
        low = min(in_use) < self.fraction * fillable
        self.run = self.run + 1 if low else 0
        if low and self.run >= self.steps and not self.warned:
            self.warned = True
            say(f"warning: groups are collapsing: for {self.run} steps in a row a head used {min(in_use)} groups, "
                f"under method.collapse_fraction={self.fraction:g} of the {fillable} a step can fill (groups in use "
                f"per step: {in_use}). Lower optim.lr, raise method.temperature or method.beta_start, or set "
                f"method.collapse_fraction=0 to silence this.")
