"""SMoG's two networks (smog.networks) against the same modules called by hand: crops of one size run
together, model.bn_crops pools the heads' and backbones' batch statistics over every crop or keeps them per
size, the online network gives unit z and p (p = predictor(z) before normalising), and the momentum network
is a frozen deep copy of the online backbone and projector that keeps its bn_crops."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smog.backbones import small_cnn
from smog.heads import projector
from smog.networks import MomentumNet, OnlineNet, _size_groups, encode

N, DIM = 6, 8


def crops(*sizes: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(N, 1, s, s, generator=gen) for s in sizes]


def without_batchnorm() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.out_features = 4
    return net


def online(bn_crops: str = "pooled", seed: int = 0) -> OnlineNet:
    torch.manual_seed(seed)
    return OnlineNet(small_cnn(1, 4), 16, 12, DIM, bn_crops)


def test_runs_of_equal_sizes_are_concatenated_in_order():
    x = crops(8, 8, 4, 4, 4, 8)
    groups = _size_groups(x)
    expected = [torch.cat(x[0:2]), torch.cat(x[2:5]), x[5]]
    assert [g.shape for g in groups] == [e.shape for e in expected]
    for g, e in zip(groups, expected):
        assert torch.equal(g, e)
    assert _size_groups([]) == []


def test_pooled_runs_the_head_once_over_every_crops_features():
    x = crops(8, 8, 4)
    backbone, head = without_batchnorm(), projector(4, 16, DIM)  # the head's BatchNorm sees every row at once
    out = encode(x, backbone, head, "pooled")
    expected = head(torch.cat([backbone(torch.cat(x[:2])), backbone(x[2])]))
    assert out.shape == (3, N, DIM)
    torch.testing.assert_close(out, expected.view(3, N, DIM), rtol=0, atol=0)


def test_pooled_batchnorm_of_one_size_is_one_forward_over_the_concatenation():
    x = crops(8, 8, 8)
    backbone, head = small_cnn(1, 4), projector(32, 16, DIM)
    out = encode(x, backbone, head, "pooled")
    expected = head(backbone(torch.cat(x)))
    torch.testing.assert_close(out, expected.view(3, N, DIM), rtol=1e-5, atol=1e-5)


def test_per_resolution_runs_backbone_and_head_once_per_size():
    x = crops(8, 8, 4)
    backbone, head = small_cnn(1, 4), projector(32, 16, DIM)
    out = encode(x, backbone, head, "per_resolution")
    expected = torch.cat([head(backbone(torch.cat(x[:2]))), head(backbone(x[2]))])
    torch.testing.assert_close(out, expected.view(3, N, DIM), rtol=0, atol=0)
    pooled = encode(x, backbone, head, "pooled")
    assert not torch.allclose(out, pooled, atol=1e-3)  # the two settings differ in training mode


@pytest.mark.parametrize("bn_crops", ["pooled", "per_resolution"])
def test_online_z_and_p_are_the_unit_projection_and_its_prediction(bn_crops):
    net = online(bn_crops)
    x = crops(8, 8, 8)
    z, p = net(x)
    by_hand = copy.deepcopy(net)
    z_raw = by_hand.projector(by_hand.backbone(torch.cat(x)))
    p_raw = by_hand.predictor(z_raw)
    assert z.shape == p.shape == (3, N, DIM) and z.dtype == p.dtype == torch.float32
    torch.testing.assert_close(z, F.normalize(z_raw, dim=1).view(3, N, DIM), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p, F.normalize(p_raw, dim=1).view(3, N, DIM), rtol=1e-5, atol=1e-5)


def test_online_default_pools_the_batch_statistics():
    torch.manual_seed(0)
    default = OnlineNet(small_cnn(1, 4), 16, 12, DIM)
    pooled = online("pooled")
    x = crops(8, 8, 4)
    for a, b in zip(default(x), pooled(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("bn_crops, sizes", [("pooled", (8, 8, 8)), ("per_resolution", (8, 8, 4))])
def test_the_momentum_network_is_a_frozen_copy_with_the_same_bn_crops(bn_crops, sizes):
    net = online(bn_crops)
    momentum = MomentumNet(net)
    assert all(p.requires_grad for p in net.parameters())  # the online network still learns
    assert not any(p.requires_grad for p in momentum.parameters())
    assert momentum.bn_crops == bn_crops
    x = crops(*sizes)
    by_hand = copy.deepcopy(net)
    z = momentum(x)
    runs = [torch.cat(x[:2]), x[2]] if bn_crops == "per_resolution" else [torch.cat(x)]
    z_raw = torch.cat([by_hand.projector(by_hand.backbone(r)) for r in runs])
    assert z.shape == (3, N, DIM) and z.dtype == torch.float32
    torch.testing.assert_close(z, F.normalize(z_raw, dim=1).view(3, N, DIM), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)  # the copy is deep: moving the online weights leaves it
    for a, b in zip(momentum.parameters(), by_hand.parameters()):  # backbone, then projector
        assert torch.equal(a, b)


def test_the_momentum_network_runs_without_drop_path():
    from torchvision.ops import StochasticDepth

    backbone = nn.Sequential(small_cnn(1, 4), StochasticDepth(0.5, "row"))
    backbone.out_features = 32
    net = OnlineNet(backbone, 16, 12, DIM)
    momentum = MomentumNet(net)
    assert net.backbone[1].p == 0.5 and momentum.backbone[1].p == 0.0
