"""LARC (apex semantics) and the BN/bias exemption, against updates computed by hand."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from smog.config import OptimConfig
from smog.optim import build_optimizer, param_groups


def _bn(weight: list[float]) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(len(weight))
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(weight))
    return bn


def _cfg(exclude: bool) -> OptimConfig:
    return OptimConfig(name="lars", lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.01,
                       exclude_bn_bias=exclude)


@pytest.mark.parametrize("exclude, expected", [
    # LARC: d = g + wd * w = [0.9, 1.2]; trust * ||w|| / (||g|| + wd * ||w||) = 0.01 * 5 / (1 + 0.5) = 1/30;
    # w - lr * d / 30 = [3 - 0.5 * 0.03, 4 - 0.5 * 0.04]
    (False, [2.985, 3.98]),
    # exempt: plain SGD, no weight decay: w - lr * g = [3 - 0.3, 4 - 0.4]
    (True, [2.7, 3.6]),
])
def test_larc_scaling_of_a_batchnorm_weight(exclude, expected):
    bn = _bn([3.0, 4.0])
    opt = build_optimizer(bn, _cfg(exclude))
    bn.weight.grad = torch.tensor([0.6, 0.8])
    bn.bias.grad = torch.zeros(2)
    opt.step()
    assert bn.weight.detach().tolist() == pytest.approx(expected, abs=1e-6)


def _larc_sgd(w: list[float], grads: list[list[float]], lr: float, momentum: float, wd: float,
              trust: float, lars: bool) -> list[float]:
    """apex LARC over torch SGD, on plain floats: d = g + wd w, scaled by the trust ratio when lars and both
    norms are non-zero; buf = momentum * buf + d (buf = d at the first step); w -= lr * buf."""
    buf = None
    for g in grads:
        d = [gi + wd * wi for gi, wi in zip(g, w)]
        w_norm, g_norm = math.sqrt(sum(x * x for x in w)), math.sqrt(sum(x * x for x in g))
        if lars and w_norm > 0 and g_norm > 0:
            d = [di * trust * w_norm / (g_norm + wd * w_norm) for di in d]
        buf = d if buf is None else [momentum * b + di for b, di in zip(buf, d)]
        w = [wi - lr * b for wi, b in zip(w, buf)]
    return w


@pytest.mark.parametrize("exclude", [False, True])
def test_two_steps_match_sgd_momentum_at_literal_rates(exclude):
    model = nn.Sequential(nn.Linear(2, 2, bias=True), _bn([3.0, 4.0]))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0], [-2.0, 0.5]]))
        model[0].bias.zero_()  # a zero-norm tensor: LARC leaves its step unscaled
    start = {name: p.detach().flatten().tolist() for name, p in model.named_parameters()}
    grads = {"0.weight": [[0.2, -0.4, 0.1, 0.3], [0.5, 0.1, -0.2, 0.0]], "0.bias": [[0.3, -0.1], [0.2, 0.2]],
             "1.weight": [[0.6, 0.8], [-0.1, 0.4]], "1.bias": [[0.05, -0.02], [0.01, 0.03]]}
    opt = build_optimizer(model, _cfg(exclude))
    for step in range(2):
        for name, p in model.named_parameters():
            p.grad = torch.tensor(grads[name][step]).view_as(p)
        opt.step()
    for name, p in model.named_parameters():
        lars = not (exclude and p.ndim <= 1)
        wd = 0.1 if lars else 0.0
        want = _larc_sgd(start[name], grads[name], 0.5, 0.9, wd, 0.01, lars)
        assert p.detach().flatten().tolist() == pytest.approx(want, abs=1e-6), name


def test_exemption_groups_norms_biases_and_position_tables():
    model = nn.Module()
    model.proj = nn.Linear(3, 4)
    model.norm = nn.LayerNorm(4)
    model.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))
    groups = param_groups(model, 0.05, exclude_bn_bias=True)
    decay, plain = ({id(p) for p in g["params"]} for g in groups)
    assert decay == {id(model.proj.weight)}
    assert plain == {id(model.proj.bias), id(model.norm.weight), id(model.norm.bias),
                     id(model.relative_position_bias_table)}
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    (only,) = param_groups(model, 0.05, exclude_bn_bias=False)
    assert len(only["params"]) == 5 and only["weight_decay"] == 0.05


def test_adamw_keeps_weight_decay_off_the_exempt_group():
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05))
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
