"""smog.pooled_bn: one set of BatchNorm statistics over crop groups of several sizes, except in the
residual blocks' shortcut (downsample) BatchNorms, which keep one set per size as the authors' code runs them.

Expected values come from definitions independent of the implementation:
- layer by layer (`layer_by_layer`), in float64: a copy of the network in eval mode, run per group; each
  BatchNorm's statistics are set, in execution order, to the mean and biased variance of its inputs
  (captured by a pre-hook) flattened to [C, -1]: of all groups together for a pooled layer, of the group
  itself for a shortcut layer (`POOLS` says which). The running statistics expected are torch's update rule
  applied to those values (unbiased variance, momentum 0.1): once per forward for a pooled layer, once per
  group, in group order, for a shortcut layer.
- the authors' flattening (`flat_forward`): each BatchNorm layer runs on every group's pixels laid side
  by side as one [1, C, sum N*H*W, 1] batch -- torch's own BatchNorm, autograd included.
- gradcheck (finite differences) for the gradient through the pooled statistics.
smog.batchnorm's own tests (tests/test_batchnorm.py) cover one layer and the process groups.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from smog.backbones import _resnet, small_cnn
from smog.config import ConfigError
from smog.pooled_bn import pooled_forward


def randomise_bn(net: nn.Module, seed: int) -> nn.Module:
    """Random affine weights and running statistics, so that every term of the update shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, _BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=m.running_mean.dtype))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=m.running_var.dtype) + 0.5)
    return net


def POOLS(name: str) -> bool:
    """Whether the BatchNorm layer of this name pools its statistics over the crop sizes (the authors'
    list_bn_forward) rather than running once per size (their list_input_forward of a block's downsample)."""
    return "downsample" not in name


def _stats(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[C, L] -> (mean, biased variance, unbiased variance)."""
    return flat.mean(1), flat.var(1, correction=0), flat.var(1, correction=1)


def layer_by_layer(net: nn.Module, groups: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
    """(outputs per group, {bn name: (expected running_mean, expected running_var)})."""
    ref = copy.deepcopy(net).eval()
    bns = {name: m for name, m in ref.named_modules() if isinstance(m, _BatchNorm)}
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda m, inp, name=name: order.append(name)) for name, m in bns.items()]
    with torch.no_grad():
        ref(groups[0])
    for h in hooks:
        h.remove()
    stats: dict[str, list] = {}  # name -> per group (mean, biased variance) used to normalise it
    current = [0]  # the group running now

    def normalise(m, inp, out, name):
        mean, var = stats[name][current[0]]
        return nn.functional.batch_norm(inp[0], mean, var, m.weight, m.bias, False, 0.0, m.eps)

    expected = {}
    for name in order:  # each BN's inputs depend only on the BNs that ran before it
        bn, seen = bns[name], []
        hook = bn.register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
        with torch.no_grad():
            for i, x in enumerate(groups):
                current[0] = i
                ref(x)
        hook.remove()
        flats = [x.transpose(0, 1).reshape(x.shape[1], -1) for x in seen]
        mean, var = bn.running_mean.clone(), bn.running_var.clone()
        if POOLS(name):
            m, v, unbiased = _stats(torch.cat(flats, dim=1))
            stats[name] = [(m, v)] * len(groups)
            mean, var = 0.9 * mean + 0.1 * m, 0.9 * var + 0.1 * unbiased
        else:
            stats[name] = []
            for flat in flats:
                m, v, unbiased = _stats(flat)
                stats[name].append((m, v))
                mean, var = 0.9 * mean + 0.1 * m, 0.9 * var + 0.1 * unbiased
        expected[name] = (mean, var, 1 if POOLS(name) else len(groups))
        bn.register_forward_hook(lambda m, inp, out, name=name: normalise(m, inp, out, name))
    with torch.no_grad():
        outputs = []
        for i, x in enumerate(groups):
            current[0] = i
            outputs.append(ref(x))
    return outputs, expected


def flat_forward(net: nn.Sequential, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """A Sequential over groups, each BatchNorm layer on all groups' pixels as one flattened batch."""
    for layer in net:
        if isinstance(layer, _BatchNorm):
            flat = torch.cat([x.transpose(0, 1).flatten(1) for x in xs], dim=1)
            out = layer(flat[None, :, :, None])[0, :, :, 0]
            sizes = [x.numel() // x.shape[1] for x in xs]
            xs = [o.reshape(x.shape[1], x.shape[0], *x.shape[2:]).transpose(0, 1)
                  for o, x in zip(out.split(sizes, dim=1), xs)]
        else:
            xs = [layer(x.contiguous()) for x in xs]
    return xs


def backbone(name: str, channels: int = 3) -> nn.Module:
    """small_cnn, torchvision resnet18 / resnet50 (small stem), or "bottleneck": resnet50's blocks, one
    per stage (the quadratic layer-by-layer reference over all of resnet50 takes minutes on 2 cores)."""
    torch.manual_seed(0)
    if name == "small_cnn":
        return small_cnn(channels, 4)
    if name == "bottleneck":
        from torchvision.models.resnet import Bottleneck, ResNet

        net = ResNet(Bottleneck, [1, 1, 1, 1])
        net.conv1, net.maxpool = nn.Conv2d(channels, 64, 3, padding=1, bias=False), nn.Identity()
        net.fc = nn.Identity()
        return net
    return _resnet(name, channels, small_stem=True)


def crop_groups(seed: int, channels: int = 3, large: int = 8, small: int = 4, n: int = 4) -> list[torch.Tensor]:
    """Two crop groups: n crops of `large` px, n + 2 crops of `small` px."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, channels, large, large, generator=g, dtype=torch.float64) * 2 + 0.5,
            torch.randn(n + 2, channels, small, small, generator=g, dtype=torch.float64)]


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "bottleneck"])
def test_pooled_equals_layer_by_layer_reference(name):
    """Stem and block BatchNorms pool the sizes, the shortcut BatchNorms run per size (`POOLS`)."""
    net = randomise_bn(backbone(name, channels=1).double().train(), seed=1)
    groups = crop_groups(2, channels=1, large=4, small=2, n=2)  # layer4 still sees 2 x 2 + 4 x 1 pixels
    expected_out, expected_stats = layer_by_layer(net, groups)
    out = pooled_forward(net, groups)
    for o, e in zip(out, expected_out):
        torch.testing.assert_close(o, e, rtol=1e-9, atol=1e-9)
    shortcuts = 0
    for layer_name, m in net.named_modules():
        if isinstance(m, _BatchNorm):
            mean, var, forwards = expected_stats[layer_name]
            torch.testing.assert_close(m.running_mean, mean, rtol=1e-9, atol=1e-9, msg=layer_name)
            torch.testing.assert_close(m.running_var, var, rtol=1e-9, atol=1e-9, msg=layer_name)
            assert int(m.num_batches_tracked) == forwards, layer_name
            shortcuts += not POOLS(layer_name)
    assert shortcuts == {"small_cnn": 0, "resnet18": 3, "bottleneck": 4}[name]


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_gradient_through_pooled_statistics(name):
    """Finite differences: the gradient reaches every group through the statistics of all of them."""
    net = randomise_bn(backbone(name, channels=1).double().train(), seed=5)
    groups = [g[:2, :1].clone().requires_grad_() for g in crop_groups(6, channels=1, large=6, small=3)]
    assert torch.autograd.gradcheck(lambda a, b: tuple(pooled_forward(net, [a, b])), groups, eps=1e-6, atol=1e-5,
                                    fast_mode=True)


def test_sequential_gradients_match_flattened_reference():
    """small_cnn: outputs and every parameter's gradient against the authors' flattened batch."""
    net = randomise_bn(backbone("small_cnn").double().train(), seed=7)
    ref = copy.deepcopy(net)
    groups = crop_groups(8)
    weights = [torch.randn(4, 32, dtype=torch.float64), torch.randn(6, 32, dtype=torch.float64)]
    out, out_ref = pooled_forward(net, groups), flat_forward(ref, groups)
    for o, e in zip(out, out_ref):
        torch.testing.assert_close(o, e, rtol=1e-9, atol=1e-9)
    sum((o * w).sum() for o, w in zip(out, weights)).backward()
    sum((o * w).sum() for o, w in zip(out_ref, weights)).backward()
    for (name, p), p_ref in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "resnet50"])
def test_equal_sizes_equal_one_forward_over_the_concatenation(name):
    """Groups of one size: the pooled BatchNorms see what one forward over the concatenation sees. The shortcut
    BatchNorms, which run per size, are frozen (eval mode) in both copies."""
    net = randomise_bn(backbone(name).double().train(), seed=9)
    for layer_name, m in net.named_modules():
        if isinstance(m, _BatchNorm) and not POOLS(layer_name):
            m.eval()
    ref = copy.deepcopy(net)
    a, b = crop_groups(10, large=4, small=4, n=2)
    a, b = a.requires_grad_(), b.requires_grad_()
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    out = torch.cat(pooled_forward(net, [a, b]))
    expected = ref(torch.cat([a_ref, b_ref]))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(a.grad, a_ref.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(b.grad, b_ref.grad, rtol=1e-8, atol=1e-10)
    for (key, value), ref_value in zip(net.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-10, msg=key)


def test_channels_last_and_autocast():
    """NHWC inputs and weights give the same result (float32) and keep their layout; under bfloat16
    autocast the outputs stay close to float32's."""
    net = randomise_bn(backbone("resnet18").train(), seed=11)
    # 4 and 6 crops: the shortcut BatchNorms of layer4 normalise each size over 4 and 6 values per channel
    groups = [g.float() for g in crop_groups(12, large=8, small=4, n=4)]
    expected = pooled_forward(copy.deepcopy(net), groups)
    nhwc = copy.deepcopy(net).to(memory_format=torch.channels_last)
    out = pooled_forward(nhwc, [g.to(memory_format=torch.channels_last) for g in groups])
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e, rtol=1e-4, atol=1e-4)
    stem = nn.Sequential(nhwc.conv1, nhwc.bn1, nhwc.relu, nhwc.layer1)  # feature maps before the pooling
    mid = pooled_forward(stem, [g.to(memory_format=torch.channels_last) for g in groups])
    assert all(m.is_contiguous(memory_format=torch.channels_last) for m in mid)
    with torch.autocast("cpu", torch.bfloat16):
        low = pooled_forward(copy.deepcopy(net), groups)
    for o, e in zip(low, expected):
        assert o.dtype == torch.bfloat16
        assert float((o.float() - e).norm() / e.norm()) < 0.1  # bfloat16 convolutions, float32 statistics


def test_eval_mode_uses_running_statistics():
    net = randomise_bn(backbone("resnet18").double().eval(), seed=13)
    groups = crop_groups(14, large=4, small=2, n=2)
    for o, x in zip(pooled_forward(net, groups), groups):
        torch.testing.assert_close(o, net(x), rtol=0, atol=0)


def test_unknown_structure_with_batchnorm_is_refused():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(x)

    with pytest.raises(ConfigError, match="model.bn_crops"):
        pooled_forward(Custom(), crop_groups(15))
    # without BatchNorm inside, any module runs per group
    conv = nn.Conv2d(3, 2, 3)
    out = pooled_forward(conv.double(), crop_groups(16))
    assert [tuple(o.shape[-2:]) for o in out] == [(6, 6), (2, 2)]
