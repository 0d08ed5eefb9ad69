"""SMoG's two networks (docs/method.md, "Networks"): the online backbone -> projector -> predictor and its
momentum copy (backbone -> projector, EMA weights, no drop path), each run over a list of crops of one or
more sizes with the BatchNorm statistics pooled over the sizes or kept per size (model.bn_crops)."""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from smog.backbones import disable_drop_path
from smog.heads import predictor, projector
from smog.pooled_bn import has_batchnorm, pooled_forward


def _size_groups(crops: list[torch.Tensor]) -> list[torch.Tensor]:
    """Runs of equal-sized crops, each concatenated: V x [N, C, h, w] -> G x [n_g * N, C, h_g, w_g]."""
    groups: list[torch.Tensor] = []
    start = 0
    while start < len(crops):
        end = start
        while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
            end += 1
        groups.append(torch.cat(crops[start:end]))
        start = end
    return groups


def encode(crops: list[torch.Tensor], backbone: nn.Module, head: Callable[[torch.Tensor], torch.Tensor],
           bn_crops: str) -> torch.Tensor:
    """V x [N, C, h, w] -> [V, N, E]: backbone then head over all crops (model.bn_crops).

    pooled: one set of BatchNorm statistics over every crop (smog.pooled_bn; the shortcut BatchNorms of
    residual blocks per size, as the authors') and the head run once over all crops' features;
    per_resolution: backbone and head run once per crop size.
    """
    groups = _size_groups(crops)
    if bn_crops == "per_resolution":
        out = torch.cat([head(backbone(x)) for x in groups])
    else:
        features = pooled_forward(backbone, groups) if has_batchnorm(backbone) else [backbone(x) for x in groups]
        out = head(torch.cat(features))
    return out.view(len(crops), crops[0].shape[0], -1)


class OnlineNet(nn.Module):
    """backbone -> projector -> predictor. forward(crops: V x [N, C, h, w]) -> (z [V, N, D], p [V, N, D]), unit rows."""

    def __init__(self, backbone: nn.Module, proj_hidden: int, pred_hidden: int, dim: int,
                 bn_crops: str = "pooled"):
        super().__init__()
        self.backbone = backbone
        self.projector = projector(backbone.out_features, proj_hidden, dim)
        self.predictor = predictor(dim, pred_hidden)
        self.bn_crops = bn_crops

    def _head(self, features: torch.Tensor) -> torch.Tensor:
        z = self.projector(features)
        return torch.cat([z, self.predictor(z)], dim=1)

    def forward(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        z, p = encode(crops, self.backbone, self._head, self.bn_crops).float().chunk(2, dim=2)
        return F.normalize(z, dim=2), F.normalize(p, dim=2)


class MomentumNet(nn.Module):
    """EMA copy of backbone -> projector, without drop path. forward(crops: T x [N, C, h, w]) -> z [T, N, D],
    unit rows."""

    def __init__(self, online: OnlineNet):
        super().__init__()
        self.backbone = disable_drop_path(copy.deepcopy(online.backbone))
        self.projector = copy.deepcopy(online.projector)
        self.bn_crops = online.bn_crops
        for param in self.parameters():
            param.requires_grad_(False)

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        return F.normalize(encode(crops, self.backbone, self.projector, self.bn_crops).float(), dim=2)
