"""Optimisers: SGD under LARS/LARC (trust coefficient) and AdamW, with an optional exemption of BN
weights, biases and position tables from weight decay (and from LARS)."""
from __future__ import annotations

import torch
from torch import nn

from smog.config import OptimConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step for each weight tensor is scaled by LARC's trust ratio
    trust * ||w|| / (||g|| + wd * ||w||) after adding wd * w to the gradient (apex's LARC, no clipping).
    Groups with `lars=False` get plain SGD with their own weight decay."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = torch.enable_grad()(closure)() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                grad = grad.add(p, alpha=group["weight_decay"])
                if group["lars"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                    ratio = group["trust_coefficient"] * w_norm / (g_norm + group["weight_decay"] * w_norm)
                    grad = grad * torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


# Parameters kept out of weight decay by name (2-D or larger): Swin's relative position tables (the
# authors' no-decay keywords), ViT's position embedding and class token.
NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed", "pos_embedding", "class_token")


def exempt(name: str, param: torch.Tensor) -> bool:
    """BN/LayerNorm weights and biases (ndim <= 1) and position tables."""
    return param.ndim <= 1 or any(key in name for key in NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float, exclude_bn_bias: bool) -> list[dict]:
    """exclude_bn_bias: exempt parameters (see `exempt`) get neither weight decay nor LARS; otherwise every
    parameter gets both (the authors' LARC over all of the online network)."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not exclude_bn_bias:
        return [dict(params=[p for _, p in params], weight_decay=weight_decay, lars=True)]
    return [dict(params=[p for n, p in params if not exempt(n, p)], weight_decay=weight_decay, lars=True),
            dict(params=[p for n, p in params if exempt(n, p)], weight_decay=0.0, lars=False)]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.exclude_bn_bias)
    if cfg.name == "lars":
        return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)
    for group in groups:
        group.pop("lars")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    raise ValueError(f"optim.name must be lars, sgd or adamw, got {cfg.name!r}")
