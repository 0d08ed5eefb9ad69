"""SMoG's projector and predictor MLPs (docs/method.md, "Networks")."""
from __future__ import annotations

from torch import nn


def projector(in_dim: int, hidden: int, dim: int) -> nn.Sequential:
    """[B, in_dim] -> [B, dim]: Linear, BN, ReLU, Linear, BN without affine."""
    return nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim, bias=False), nn.BatchNorm1d(dim, affine=False))


def predictor(dim: int, hidden: int) -> nn.Sequential:
    """[B, dim] -> [B, dim]: Linear, BN, ReLU, Linear."""
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim))
