"""Autograd for the fused group contrastive loss, shared by every fused backend.

The forward pass of a backend streams over the groups once and returns, per row b, the
log-sum-exp of the logits, the target logits and the attention output a_b = sum_k softmax_bk g_k.
With upstream weights w[t, b] on the per-target losses and W_b = sum_t w[t, b]:

    dL/dp_b = sum_t w[t, b] (a_b - g_{y_tb}) / tau
    dL/dg_k = (sum_b W_b softmax_bk p_b - sum_{t,b: y_tb = k} w[t, b] p_b) / tau

so backward for p is O(N T D) from saved tensors; only the gradient to the groups needs a second
streaming pass (the backend's loss_group_grad).
"""
from __future__ import annotations

import torch

from smog_kernels.backend import Backend
from smog_kernels.reference import reduce_per_target


class FusedGroupLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, groups, targets, temperature, reduction, grad_groups, backend: Backend):
        targets_2d = targets.unsqueeze(0) if targets.dim() == 1 else targets
        inv_t = 1.0 / temperature
        lse, target_logits, attention = backend.loss_forward(p, groups, targets_2d, inv_t)
        per_target = lse.unsqueeze(0) - target_logits  # [T, N]
        ctx.save_for_backward(p, groups, targets_2d, lse, attention)
        ctx.inv_t, ctx.reduction, ctx.backend = inv_t, reduction, backend
        ctx.grad_groups, ctx.target_shape = grad_groups, targets.shape
        return reduce_per_target(per_target, reduction, targets.shape)

    @staticmethod
    def backward(ctx, grad_out):
        p, groups, targets_2d, lse, attention = ctx.saved_tensors
        t, n = targets_2d.shape
        if ctx.reduction == "none":
            weight = grad_out.float().reshape(t, n)
        else:  # every loss term has the same upstream weight: a 0-dim tensor (no host read)
            weight = grad_out.float() / (t * n) if ctx.reduction == "mean" else grad_out.float()
        grad_p = grad_c = None
        if ctx.needs_input_grad[0]:
            if weight.dim() == 0:
                # w (t a_b - sum_t g_{y_tb}) / tau, in as few launches as the host allows
                pulled = groups[targets_2d].sum(0, dtype=torch.float32)  # [N, D]
                grad_p = torch.add(pulled, attention, alpha=-t).mul_(weight * -ctx.inv_t).to(p.dtype)
            else:
                # sum_t w[t, b] (a_b - g_{y_tb}): exactly zero where the softmax is one-hot on the target
                pull = attention.unsqueeze(0) - groups[targets_2d].float()  # [T, N, D]
                grad_p = ((weight.unsqueeze(-1) * pull).sum(0) * ctx.inv_t).to(p.dtype)
        if ctx.grad_groups and ctx.needs_input_grad[1]:
            weight = weight.expand(t, n)
            grad_c = ctx.backend.loss_group_grad(p, groups, lse, weight.sum(0), ctx.inv_t)
            weighted_p = (weight.unsqueeze(-1) * p.float().unsqueeze(0)).reshape(t * n, -1)
            grad_c = grad_c.index_add(0, targets_2d.reshape(-1), weighted_p, alpha=-ctx.inv_t)
            grad_c = grad_c.to(groups.dtype)
        return grad_p, grad_c, None, None, None, None, None
