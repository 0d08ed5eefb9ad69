"""One set of BatchNorm statistics over crops of several sizes (docs/method.md, "Details of the authors' code").

`pooled_forward(net, xs)` runs a backbone over a list of crop groups xs (one tensor [N_i, C, H_i, W_i]
per resolution) in lockstep, layer by layer, so that every BatchNorm layer normalises all groups with
the mean and variance of all their pixels together (smog.batchnorm.batch_norm): exactly what one BatchNorm
over a concatenation of the groups would compute if they had one size, its running statistics moved once
per forward. As in the authors' ResNet, the shortcut (downsample) of a residual block runs once per group,
so its BatchNorm keeps per-size statistics (and moves its running statistics once per group). A
SyncBatchNorm pools the crops of every process in its group as well.

The lockstep covers the module types smog's backbones are built from: nn.Sequential, torchvision's
ResNet and its residual blocks (BasicBlock, Bottleneck), stages wrapped by model.checkpoint (the lockstep
recomputed in the backward pass), BatchNorm layers, and any module without BatchNorm inside (conv, ReLU,
pooling, Flatten, Identity), which runs per group. A module holding
BatchNorm layers in any other structure raises ConfigError.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from smog.batchnorm import batch_norm
from smog.config import ConfigError

Groups = list[torch.Tensor]


def has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in net.modules())


def _residual_block(block: nn.Module, xs: Groups) -> Groups:
    """torchvision BasicBlock / Bottleneck: conv-bn-relu (x2 or x3) + (downsampled, per group) identity, relu."""
    convs = [name for name in ("conv1", "conv2", "conv3") if hasattr(block, name)]
    out = xs
    for i, name in enumerate(convs):
        out = pooled_forward(getattr(block, f"bn{i + 1}"), pooled_forward(getattr(block, name), out))
        if i + 1 < len(convs):
            out = pooled_forward(block.relu, out)
    identity = xs if block.downsample is None else [block.downsample(x) for x in xs]  # per size, as the authors'
    return [F.relu(o + i) for o, i in zip(out, identity)]


def _resnet(net: nn.Module, xs: Groups) -> Groups:
    """torchvision ResNet's forward (stem, four stages, pooling, fc) over groups."""
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"):
        xs = pooled_forward(getattr(net, name), xs)
    return pooled_forward(net.fc, [torch.flatten(x, 1) for x in xs])


def pooled_forward(net: nn.Module, xs: Groups) -> Groups:
    """Run `net` over the groups xs with BatchNorm statistics pooled over all of them; returns one
    output per group. Raises ConfigError for a BatchNorm-holding module of another structure."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.utils.checkpoint import checkpoint
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    if isinstance(net, _BatchNorm):
        return batch_norm(net, xs)
    if not has_batchnorm(net):
        return [net(x) for x in xs]
    if isinstance(net, nn.Sequential):
        for layer in net:
            xs = pooled_forward(layer, xs)
        return xs
    if isinstance(net, (BasicBlock, Bottleneck)):
        return _residual_block(net, xs)
    if isinstance(net, ResNet):
        return _resnet(net, xs)
    if isinstance(net, CheckpointWrapper):  # model.checkpoint: the lockstep forward of the stage, recomputed
        inner = net._checkpoint_wrapped_module
        return list(checkpoint(lambda *groups: tuple(pooled_forward(inner, list(groups))), *xs, use_reentrant=False))
    raise ConfigError(f"model.bn_crops=pooled cannot pool the BatchNorm statistics of a {type(net).__name__} "
                      f"(it runs nn.Sequential, torchvision ResNets and their blocks, checkpointed stages and "
                      f"modules without BatchNorm): set model.bn_crops=per_resolution")
