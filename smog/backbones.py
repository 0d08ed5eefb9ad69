"""Backbones: image [B, C, H, W] -> features [B, F] (no classifier).

small_cnn (sized for CPU runs), torchvision ResNet-18/50 (optionally with a small-image stem: 3x3
stride-1 conv, no max-pool), Transformers (torchvision swin_t, vit_b_16) and any timm model by name
(model.backbone=timm/<name>, timm installed).
"""
from __future__ import annotations

import torch
from torch import nn

from smog.config import ConfigError, ModelConfig


def small_cnn(channels: int, width: int) -> nn.Module:
    """Four 3x3 conv-BN-ReLU blocks (widths w, 2w, 4w, 8w; the last three stride 2) + global average pool."""
    layers: list[nn.Module] = []
    c_in = channels
    for i, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                   nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    net = nn.Sequential(*layers)
    net.out_features = c_in
    return net


def _resnet(name: str, channels: int, small_stem: bool) -> nn.Module:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if small_stem:
        net.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif channels != 3:
        net.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
    out = net.fc.in_features
    net.fc = nn.Identity()
    net.out_features = out
    return net


class _GreyToRGB(nn.Module):
    """Repeats a single channel three times for backbones that need RGB input."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.out_features = net, net.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)


def _transformer(name: str, image_size: int) -> nn.Module:
    import torchvision

    if name == "swin_t":
        net = torchvision.models.swin_t(weights=None)
        out = net.head.in_features
        net.head = nn.Identity()
    else:
        net = torchvision.models.vit_b_16(weights=None, image_size=image_size)
        out = net.heads.head.in_features
        net.heads = nn.Identity()
    net.out_features = out
    return _GreyToRGB(net)


def _timm(name: str, channels: int) -> nn.Module:
    """timm's `name` at random init without classifier; out_features = the width of its pooled features."""
    try:
        import timm
    except ImportError:
        raise ConfigError(f"model.backbone=timm/{name} needs the timm package: pip install timm") from None
    try:
        net = timm.create_model(name, pretrained=False, num_classes=0, in_chans=channels)
    except RuntimeError as error:  # timm: "Unknown model (...)"
        raise ConfigError(f"model.backbone=timm/{name}: {error}") from None
    net.out_features = getattr(net, "head_hidden_size", None) or net.num_features
    return net


def build_backbone(cfg: ModelConfig, channels: int, image_size: int) -> nn.Module:
    """A backbone with an `out_features` attribute."""
    if cfg.backbone == "small_cnn":
        return small_cnn(channels, cfg.width)
    if cfg.backbone in ("resnet18", "resnet50"):
        return _resnet(cfg.backbone, channels, cfg.small_stem)
    if cfg.backbone in ("swin_t", "vit_b_16"):
        return _transformer(cfg.backbone, image_size)
    if cfg.backbone.startswith("timm/"):
        return _timm(cfg.backbone[len("timm/"):], channels)
    raise ValueError(f"model.backbone must be small_cnn, resnet18, resnet50, swin_t, vit_b_16 or timm/<name>, got {cfg.backbone!r}")
