"""Backbones: image [B, C, H, W] -> features [B, F] (no classifier).

small_cnn (sized for CPU runs), torchvision ResNet-18/50 and ResNet-50w2 (optionally with a small-image
stem: 3x3 stride-1 conv, no max-pool), Transformers (torchvision swin_t, vit_b_16) and any timm model by
name (model.backbone=timm/<name>, timm installed). model.checkpoint recomputes each stage's activations
in the backward pass (torch.utils.checkpoint) instead of storing them.
"""
from __future__ import annotations

import torch
from torch import nn

from smog.config import ConfigError, ModelConfig


def small_cnn(channels: int, width: int, grid: int = 1) -> nn.Module:
    """Four 3x3 conv-BN-ReLU blocks (widths w, 2w, 4w, 8w; the last three stride 2), then an average pool to a
    grid x grid map, flattened: features [B, 8w * grid**2] (grid 1 = global average pool).

    >>> small_cnn(1, 16, grid=2)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 512])
    """
    layers: list[nn.Module] = []
    c_in = channels
    for i, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                   nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(grid), nn.Flatten()]
    net = nn.Sequential(*layers)
    net.out_features = c_in * grid * grid
    return net


def resnet50w2() -> nn.Module:
    """ResNet-50 with every width doubled (SwAV's and SMoG's resnet50w2): a 128-channel stem, bottleneck
    widths 128..1024, block outputs 512..4096; torchvision's ResNet and Bottleneck otherwise."""
    from torchvision.models.resnet import Bottleneck, ResNet

    class ResNetW2(ResNet):
        def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
            if planes == 64:  # the first stage: its input is the widened stem
                self.inplanes = 2 * 64
            return super()._make_layer(block, 2 * planes, blocks, stride, dilate)

    net = ResNetW2(Bottleneck, [3, 4, 6, 3])
    net.conv1, net.bn1 = nn.Conv2d(3, 2 * 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(2 * 64)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision inits it
    net.fc = nn.Linear(net.layer4[-1].conv3.out_channels, 1000)
    return net


def _resnet(name: str, channels: int, small_stem: bool) -> nn.Module:
    import torchvision

    net = resnet50w2() if name == "resnet50w2" else getattr(torchvision.models, name)(weights=None)
    stem = net.conv1.out_channels
    if small_stem:
        net.conv1 = nn.Conv2d(channels, stem, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif channels != 3:
        net.conv1 = nn.Conv2d(channels, stem, 7, stride=2, padding=3, bias=False)
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
        net = torchvision.models.swin_t(weights=None)  # stochastic depth 0.2, the authors' drop path rate
        out = net.head.in_features
        net.head = nn.Identity()
    else:
        net = torchvision.models.vit_b_16(weights=None, image_size=image_size)
        out = net.heads.head.in_features
        net.heads = nn.Identity()
    net.out_features = out
    return _GreyToRGB(net)


def _stages(net: nn.Module) -> list[nn.Module]:
    """The modules model.checkpoint recomputes: ResNet stages, Swin stages and patch mergings, ViT blocks."""
    import torchvision

    inner = net.net if isinstance(net, _GreyToRGB) else net
    if isinstance(inner, torchvision.models.ResNet):
        return [inner.layer1, inner.layer2, inner.layer3, inner.layer4]
    if isinstance(inner, torchvision.models.SwinTransformer):
        return list(inner.features)[1:]
    if isinstance(inner, torchvision.models.VisionTransformer):
        return list(inner.encoder.layers)
    raise ValueError(f"model.checkpoint: no stages known for {type(inner).__name__}")


def checkpoint_stages(net: nn.Module) -> nn.Module:
    """Wrap each stage of `net` (in place) in torch's non-reentrant activation checkpoint; state dicts are
    unchanged (parameter names gain `_checkpoint_wrapped_module.`). BatchNorm layers inside a stage run
    twice per step (their running statistics move twice), as under the authors' --checkpoint_model."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (apply_activation_checkpointing,
                                                                             checkpoint_wrapper)

    stages = {id(m) for m in _stages(net)}
    apply_activation_checkpointing(net, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: id(m) in stages)
    return net


def drop_paths(net: nn.Module) -> list[nn.Module]:
    """The stochastic-depth (drop path) modules of `net` with a non-zero rate: torchvision's StochasticDepth
    and timm's DropPath."""
    from torchvision.ops import StochasticDepth

    found = []
    for m in net.modules():
        if isinstance(m, StochasticDepth) and m.p > 0:
            found.append(m)
        elif type(m).__name__ == "DropPath" and getattr(m, "drop_prob", 0.0) > 0:
            found.append(m)
    return found


def disable_drop_path(net: nn.Module) -> nn.Module:
    """Set every drop-path rate of `net` to 0 (in place): the momentum network runs without drop path."""
    for m in drop_paths(net):
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
        else:
            m.p = 0.0
    return net


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
    """A backbone with an `out_features` attribute (stages checkpointed when model.checkpoint)."""
    if cfg.backbone == "small_cnn":
        return small_cnn(channels, cfg.width, cfg.grid)
    if cfg.backbone in ("resnet18", "resnet50", "resnet50w2"):
        net = _resnet(cfg.backbone, channels, cfg.small_stem)
    elif cfg.backbone in ("swin_t", "vit_b_16"):
        net = _transformer(cfg.backbone, image_size)
    elif cfg.backbone.startswith("timm/"):
        net = _timm(cfg.backbone[len("timm/"):], channels)
    else:
        raise ValueError(f"model.backbone must be small_cnn, resnet18, resnet50, resnet50w2, swin_t, vit_b_16 "
                         f"or timm/<name>, got {cfg.backbone!r}")
    return checkpoint_stages(net) if cfg.checkpoint else net
