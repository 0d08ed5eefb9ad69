"""One set of BatchNorm statistics over crops of several sizes (docs/method.md, "Networks").

`pooled_forward(net, xs)` runs a backbone over a list of crop groups xs (one tensor [N_i, C, H_i, W_i]
per resolution) in lockstep, layer by layer, so that every BatchNorm layer normalises all groups with
the mean and variance of all their pixels together: exactly what one BatchNorm over a concatenation
of the groups would compute if they had one size. The per-group means and variances combine exactly
(mean = sum n_i m_i / n, var = sum n_i (v_i + (m_i - mean)^2) / n); the running statistics move once
per layer and forward, with the unbiased pooled variance, as torch's BatchNorm does. Under
SyncBatchNorm the sums are all-reduced over its process group (autograd-aware), so the statistics
pool every process's crops as well.

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

from smog.config import ConfigError

Groups = list[torch.Tensor]


def has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in net.modules())


def _reduce(values: torch.Tensor, bn: _BatchNorm) -> torch.Tensor:
    """Sums over SyncBatchNorm's process group (identity for a plain BatchNorm or one process)."""
    if not isinstance(bn, nn.SyncBatchNorm) or not torch.distributed.is_initialized():
        return values
    group = bn.process_group or torch.distributed.group.WORLD
    if torch.distributed.get_world_size(group) == 1:
        return values
    import torch.distributed.nn.functional as dist_fn

    return dist_fn.all_reduce(values, group=group)


def pooled_batchnorm(bn: _BatchNorm, xs: Groups) -> Groups:
    """xs: groups [N_i, C, ...] -> the groups normalised with statistics pooled over all of them.

    Outside training (or without batch statistics) every group uses the running statistics as usual.
    """
    use_batch = bn.training or bn.running_mean is None
    if not use_batch or (len(xs) == 1 and not isinstance(bn, nn.SyncBatchNorm)):
        return [bn(x) for x in xs]
    stat_dtype = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    dims = [0] + list(range(2, xs[0].dim()))
    counts, means, variances = [], [], []
    for x in xs:
        var, mean = torch.var_mean(x.to(stat_dtype), dim=dims, correction=0)
        counts.append(x.numel() // x.shape[1])
        means.append(mean)
        variances.append(var)
    n_local = torch.tensor(counts, dtype=stat_dtype, device=xs[0].device).view(-1, 1)
    means_t, vars_t = torch.stack(means), torch.stack(variances)  # [G, C]
    # first moment, then the centred second moment: sums over groups (and processes)
    totals = _reduce(torch.cat([n_local.sum().view(1), (n_local * means_t).sum(0)]), bn)
    n, mean = totals[0], totals[1:] / totals[0]
    m2 = _reduce((n_local * (vars_t + (means_t - mean) ** 2)).sum(0), bn)
    var = m2 / n
    if bn.training and bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            rate = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            unbiased = var.detach() * (n / (n - 1))
            bn.running_mean.mul_(1 - rate).add_(mean.detach().to(bn.running_mean.dtype), alpha=rate)
            bn.running_var.mul_(1 - rate).add_(unbiased.to(bn.running_var.dtype), alpha=rate)
    scale = torch.rsqrt(var + bn.eps)
    shift = -mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    shape = [1, -1] + [1] * (xs[0].dim() - 2)
    return [x * scale.to(x.dtype).view(shape) + shift.to(x.dtype).view(shape) for x in xs]


def _residual_block(block: nn.Module, xs: Groups) -> Groups:
    """torchvision BasicBlock / Bottleneck: conv-bn-relu (x2 or x3) + (downsampled) identity, relu."""
    convs = [name for name in ("conv1", "conv2", "conv3") if hasattr(block, name)]
    out = xs
    for i, name in enumerate(convs):
        out = pooled_forward(getattr(block, f"bn{i + 1}"), pooled_forward(getattr(block, name), out))
        if i + 1 < len(convs):
            out = pooled_forward(block.relu, out)
    identity = xs if block.downsample is None else pooled_forward(block.downsample, xs)
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
        return pooled_batchnorm(net, xs)
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
