"""BatchNorm whose statistics pool several tensors and the processes of a group (docs/method.md, "Networks").

`batch_norm(bn, xs)` normalises tensors xs ([N_i, C, ...], spatial sizes may differ: one per crop size) with
the mean and variance of all of them together and, when bn is a SyncBatchNorm, of every process in its group:
what one BatchNorm over their concatenation on one process computes. Each direction is one fused pass per tensor
around one collective per layer:

- forward: per tensor its channel mean and variance (float32 whatever the input dtype; float64 for float64),
  one all_gather of them over the group, the exact combination (torch.batch_norm_gather_stats_with_counts on
  CUDA), which also moves the running statistics (unbiased variance), then one normalisation pass per tensor;
- backward: per tensor the channel sums of dy and dy * (x - mean), one all_reduce of their totals, then one
  pass per tensor for the input gradient. The weight and bias gradients stay local (DDP averages them).

CUDA uses the kernels of torch's SyncBatchNorm; the CPU has none of those, so it runs torch's native
BatchNorm kernels in their eval form with the pooled statistics (batch_norm_update_stats for the statistics,
native_batch_norm_backward for the sums). Every process must pass the same number of tensors.

`SyncBatchNorm` does what torch's SyncBatchNorm does (the statistics of every process in `process_group`, None:
all) on this Function, so on CPU (gloo) processes too; `batch_norm` pools the crop sizes of either class.
`synchronise(model, group_size)` converts a model's BatchNorm layers to it in groups of consecutive processes,
as the authors' apex.parallel.create_syncbn_process_group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function
from torch.nn.modules.batchnorm import _BatchNorm


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


def _gather(rows: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """[G, F] per process -> [P * G, F]: the rows of every process in the group (unchanged without one)."""
    if group is None:
        return rows
    world = dist.get_world_size(group)
    if dist.get_backend(group) == "gloo":  # gloo has no all_gather_into_tensor
        parts = [torch.empty_like(rows) for _ in range(world)]
        dist.all_gather(parts, rows.contiguous(), group=group)
        return torch.cat(parts)
    out = rows.new_empty(world * rows.shape[0], rows.shape[1])
    dist.all_gather_into_tensor(out, rows.contiguous(), group=group)
    return out


def _cuda_statistics(xs, running_mean, running_var, momentum, eps, group):
    """(mean, invstd, counts) of the pooled xs with torch's SyncBatchNorm kernels; moves the running statistics."""
    rows = []
    for x in xs:
        mean, invstd = torch.batch_norm_stats(x, eps)
        rows.append(torch.cat([mean, invstd, mean.new_full((1,), x.numel() // x.shape[1])]))
    means, invstds, counts = _gather(torch.stack(rows), group).split([xs[0].shape[1]] * 2 + [1], dim=1)
    counts = counts.reshape(-1)
    mean, invstd = torch.batch_norm_gather_stats_with_counts(
        xs[0], means, invstds, running_mean, running_var, momentum, eps,
        counts if running_mean is None else counts.to(running_mean.dtype))
    return mean, invstd, counts.to(torch.int32)


def _cpu_statistics(xs, running_mean, running_var, momentum, group):
    """(mean, biased variance, count) of the pooled xs with the native kernels; moves the running statistics."""
    channels = xs[0].shape[1]
    stat_dtype = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    # float32 buffers make the kernel accumulate and return float32 for low-precision x
    buffers = (None, None) if xs[0].dtype == stat_dtype else (
        torch.zeros(channels, dtype=stat_dtype), torch.ones(channels, dtype=stat_dtype))
    means, variances = (torch.stack(s) for s in zip(*(torch.ops.aten.batch_norm_update_stats(x, *buffers, 0.0)
                                                      for x in xs)))
    counts = torch.tensor([x.numel() // channels for x in xs], dtype=stat_dtype)
    if group is not None:
        rows = _gather(torch.cat([means, variances, counts[:, None]], dim=1), group)
        means, variances, counts = rows.split([channels, channels, 1], dim=1)
        counts = counts.reshape(-1)
    n = float(counts.sum())
    share = (counts / n)[:, None]  # no matrix product: autocast would run it in low precision
    mean = (share * means).sum(0)
    var = (share * (variances + (means - mean).square_())).sum(0)
    if running_mean is not None:  # a Function's forward runs without autograd
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_((var * (n / (n - 1))).to(running_var.dtype), momentum)
    return mean, var, n


class _PooledBatchNorm(Function):
    """forward(weight, bias, running_mean, running_var, momentum, eps, group, *xs) -> the normalised xs."""

    @staticmethod
    def forward(ctx, weight, bias, running_mean, running_var, momentum, eps, group, *xs):
        xs = tuple(x.contiguous(memory_format=_memory_format(x)) for x in xs)
        ctx.eps, ctx.group, ctx.cuda = eps, group, xs[0].is_cuda
        if ctx.cuda:
            mean, invstd, counts = _cuda_statistics(xs, running_mean, running_var, momentum, eps, group)
            ctx.save_for_backward(*xs, weight, mean, invstd, counts)
            return tuple(torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps) for x in xs)
        mean, var, ctx.count = _cpu_statistics(xs, running_mean, running_var, momentum, group)
        ctx.save_for_backward(*xs, weight, mean, var)
        return tuple(torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        *xs, weight, mean, second = saved[:-1] if ctx.cuda else saved
        dys = [g.contiguous(memory_format=_memory_format(x)) for g, x in zip(grads, xs)]
        input_grad = any(ctx.needs_input_grad[7:])
        weight_grad, bias_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.cuda:
            sums = [torch.batch_norm_backward_reduce(dy, x, mean, second, weight, input_grad, weight_grad, bias_grad)
                    for dy, x in zip(dys, xs)]
            sum_dy, sum_dy_xmu, grad_weight, grad_bias = (
                None if sums[0][i] is None else sum(s[i] for s in sums) for i in range(4))
        else:
            # the eval-form backward with the pooled statistics gives grad_weight = sum dy xhat, grad_bias = sum dy
            sums = [torch.ops.aten.native_batch_norm_backward(dy, x, None, mean, second, None, None, False, ctx.eps,
                                                              [False, True, True]) for dy, x in zip(dys, xs)]
            grad_weight, grad_bias = sum(s[1] for s in sums), sum(s[2] for s in sums)
            sum_dy, sum_dy_xmu = grad_bias, grad_weight  # sum dy, sum dy xhat
        grad_xs = [None] * len(xs)
        if input_grad:
            if ctx.group is not None:
                totals = torch.cat([sum_dy, sum_dy_xmu])
                dist.all_reduce(totals, group=ctx.group)
                sum_dy, sum_dy_xmu = totals.chunk(2)
            if ctx.cuda:
                w = weight if weight is None or weight.dtype == mean.dtype else weight.to(mean.dtype)
                grad_xs = [torch.batch_norm_backward_elemt(dy, x, mean, second, w, sum_dy, sum_dy_xmu, saved[-1])
                           for dy, x in zip(dys, xs)]
            else:  # dx = a dy + u xhat + v with a = weight invstd, u = -a mean(dy xhat), v = -a mean(dy)
                a = torch.rsqrt(second + ctx.eps)
                if weight is not None:
                    a = a * weight
                u, v = a * sum_dy_xmu * (-1 / ctx.count), a * sum_dy * (-1 / ctx.count)
                scale = a.view([1, -1] + [1] * (xs[0].dim() - 2)).to(xs[0].dtype)
                grad_xs = [torch.batch_norm(x, u, v, mean, second, False, 0.0, ctx.eps, False).addcmul_(dy, scale)
                           for dy, x in zip(dys, xs)]
        if weight is None:
            return (None, None, None, None, None, None, None, *grad_xs)
        grad_weight = grad_weight.to(weight.dtype) if weight_grad else None
        grad_bias = grad_bias.to(weight.dtype) if bias_grad else None
        return (grad_weight, grad_bias, None, None, None, None, None, *grad_xs)


def _sync_group(bn: _BatchNorm) -> dist.ProcessGroup | None:
    """The process group whose statistics bn pools: a SyncBatchNorm's (None: all processes) when it holds
    more than this process, else None."""
    if not isinstance(bn, (SyncBatchNorm, nn.SyncBatchNorm)) or not dist.is_available() or not dist.is_initialized():
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def batch_norm(bn: _BatchNorm, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """xs [N_i, C, ...] -> each normalised with the statistics of all of them (and of bn's process group).

    Outside training (with running statistics) every tensor uses the running statistics; one tensor
    without a group runs torch's own BatchNorm.
    """
    if not (bn.training or bn.running_mean is None):
        return [F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps) for x in xs]
    group = _sync_group(bn)
    if group is None and len(xs) == 1:
        return [_BatchNorm.forward(bn, xs[0])]
    rate = 0.0
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        rate = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    track = bn.training and bn.track_running_stats
    running_mean, running_var = (bn.running_mean, bn.running_var) if track else (None, None)
    return list(_PooledBatchNorm.apply(bn.weight, bn.bias, running_mean, running_var, rate, bn.eps, group, *xs))


class SyncBatchNorm(_BatchNorm):
    """BatchNorm with the statistics of every process in `process_group` (None: all), as torch's SyncBatchNorm,
    on CUDA (NCCL) and CPU (gloo) processes alike, for any input [N, C, ...]. Not a subclass of torch's, which
    DDP refuses on CPU modules."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: dist.ProcessGroup | None = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects an input [N, C, ...], got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        return batch_norm(self, [x])[0]


def _convert(module: nn.Module, group: dist.ProcessGroup | None) -> nn.Module:
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        sync = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats, group)
        if module.affine:
            sync.weight, sync.bias = module.weight, module.bias
        sync.running_mean, sync.running_var = module.running_mean, module.running_var
        sync.num_batches_tracked = module.num_batches_tracked
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        module.add_module(name, _convert(child, group))
    return module


def synchronise(model: nn.Module, group_size: int) -> nn.Module:
    """model with every BatchNorm synchronised over consecutive processes in groups of `group_size`
    (model.sync_bn_group; 0 = all processes); unchanged on one process or for group_size 1. Every process
    must call it (it creates the process groups); group_size must divide the number of processes."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    size = world if group_size == 0 else group_size
    if size == 1 or world == 1:
        return model
    if world % size:
        raise ValueError(f"group_size={group_size} must divide the {world} processes (0 = all of them)")
    group = None if size == world else dist.new_subgroups(size)[0]
    return _convert(model, group)
