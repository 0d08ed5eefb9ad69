"""smog.pooled_bn: one set of BatchNorm statistics over crop groups of several sizes.

Expected values come from definitions independent of the implementation:
- layer by layer (`layer_by_layer`): a copy of the network in eval mode, run per group; each BatchNorm's
  statistics are set, in execution order, to the mean and biased variance of torch.cat of its inputs
  from all groups (captured by a pre-hook) flattened to [C, -1]. The running statistics expected are
  torch's update rule applied to those values (unbiased variance, momentum 0.1).
- the authors' flattening (`flat_forward`): each BatchNorm layer runs on every group's pixels laid side
  by side as one [1, C, sum N*H*W, 1] batch -- torch's own BatchNorm, autograd included.
- gradcheck (finite differences) for the gradient through the pooled statistics.
"""
from __future__ import annotations

import copy
import os
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from smog.backbones import _resnet, small_cnn
from smog.config import ConfigError
from smog.pooled_bn import pooled_batchnorm, pooled_forward


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
    expected = {}
    for name in order:  # each BN's inputs depend only on the BNs that ran before it
        bn, seen = bns[name], []
        hook = bn.register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
        with torch.no_grad():
            for x in groups:
                ref(x)
        hook.remove()
        flat = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in seen], dim=1)
        mean, var = flat.mean(1), flat.var(1, correction=0)
        unbiased = flat.var(1, correction=1)
        expected[name] = (0.9 * bn.running_mean + 0.1 * mean, 0.9 * bn.running_var + 0.1 * unbiased)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    with torch.no_grad():
        return [ref(x) for x in groups], expected


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
    net = randomise_bn(backbone(name, channels=1).double().train(), seed=1)
    groups = crop_groups(2, channels=1, large=4, small=2, n=2)  # layer4 still sees 2 x 2 + 4 x 1 pixels
    expected_out, expected_stats = layer_by_layer(net, groups)
    out = pooled_forward(net, groups)
    for o, e in zip(out, expected_out):
        torch.testing.assert_close(o, e, rtol=1e-9, atol=1e-9)
    for layer_name, m in net.named_modules():
        if isinstance(m, _BatchNorm):
            torch.testing.assert_close(m.running_mean, expected_stats[layer_name][0], rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(m.running_var, expected_stats[layer_name][1], rtol=1e-9, atol=1e-9)
            assert int(m.num_batches_tracked) == 1, layer_name


@pytest.mark.parametrize("bn", [nn.BatchNorm2d(3), nn.BatchNorm2d(3, affine=False), nn.BatchNorm2d(3, momentum=None),
                                nn.BatchNorm1d(3)], ids=["affine", "no-affine", "cumulative", "1d"])
def test_one_layer_matches_flattened_batchnorm(bn):
    """Outputs, input and weight gradients, running statistics of one layer against torch's BatchNorm over
    the flattened groups (two forwards, so the cumulative average takes two values)."""
    bn = randomise_bn(bn.double(), seed=3) if bn.affine else bn.double()
    ref = copy.deepcopy(bn)
    g = torch.Generator().manual_seed(4)
    for _ in range(2):
        if isinstance(bn, nn.BatchNorm1d):
            xs = [torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64) + 1]
        else:
            xs = [t + i for i, t in enumerate(crop_groups(int(torch.randint(100, (1,), generator=g))))]
        xs = [x.requires_grad_() for x in xs]
        xs_ref = [x.detach().clone().requires_grad_() for x in xs]
        weights = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in xs]
        out = pooled_batchnorm(bn, xs)
        flat = torch.cat([x.transpose(0, 1).reshape(3, -1) for x in xs_ref], dim=1)
        out_ref = ref(flat.T if isinstance(bn, nn.BatchNorm1d) else flat[None, :, :, None])
        out_ref = out_ref.T if isinstance(bn, nn.BatchNorm1d) else out_ref[0, :, :, 0]
        out_ref = [o.reshape(x.shape[1], x.shape[0], *x.shape[2:]).transpose(0, 1)
                   for o, x in zip(out_ref.split([x.numel() // 3 for x in xs], dim=1), xs)]
        for o, e in zip(out, out_ref):
            torch.testing.assert_close(o, e, rtol=1e-10, atol=1e-10)
        sum((o * w).sum() for o, w in zip(out, weights)).backward()
        sum((o * w).sum() for o, w in zip(out_ref, weights)).backward()
        for x, x_ref in zip(xs, xs_ref):
            torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
        if bn.affine:
            torch.testing.assert_close(bn.weight.grad, ref.weight.grad, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(bn.bias.grad, ref.bias.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
        assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked)


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
    net = randomise_bn(backbone(name).double().train(), seed=9)
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
    groups = [g.float() for g in crop_groups(12, large=4, small=2, n=2)]
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


# ---- SyncBatchNorm over 2 real processes (gloo) vs one process holding the whole groups -----------

WORLD = 2


def _sync_rank(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=60))
        net = nn.SyncBatchNorm.convert_sync_batchnorm(randomise_bn(backbone("small_cnn").double().train(), 17))
        groups, weights = _sync_inputs()
        share = [g[rank::WORLD] for g in groups]
        out = pooled_forward(net, share)
        sum((o * w[rank::WORLD]).sum() for o, w in zip(out, weights)).backward()
        torch.save({"out": out, "grads": [p.grad for p in net.parameters()], "state": net.state_dict()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        code = 0
    except BaseException:  # noqa: BLE001 -- reported to the test through the file
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        code = 1
    os._exit(code)


def _sync_inputs() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    groups = crop_groups(18)
    g = torch.Generator().manual_seed(19)
    return groups, [torch.randn(4, 32, generator=g, dtype=torch.float64), torch.randn(6, 32, generator=g, dtype=torch.float64)]


def test_sync_batchnorm_pools_every_process(tmp_path):
    """2 gloo ranks, each with every other sample of each group, against one process with all of them:
    outputs, running statistics and the all-reduced parameter gradients agree."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_sync_rank, args=(r, str(tmp_path / "rendezvous"), str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    errors = [(tmp_path / f"rank{r}.err").read_text() for r in range(WORLD) if (tmp_path / f"rank{r}.err").exists()]
    assert not errors and all(p.exitcode == 0 for p in procs), errors
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    net = randomise_bn(backbone("small_cnn").double().train(), 17)
    groups, weights = _sync_inputs()
    out = flat_forward(net, groups)
    sum((o * w).sum() for o, w in zip(out, weights)).backward()
    for r, result in enumerate(ranks):
        for o, o_rank in zip(out, result["out"]):
            torch.testing.assert_close(o_rank, o[r::WORLD].detach(), rtol=1e-9, atol=1e-9)
        for key, value in net.state_dict().items():
            torch.testing.assert_close(result["state"][key], value, rtol=1e-10, atol=1e-10, msg=key)
    for p, *rank_grads in zip(net.parameters(), *(result["grads"] for result in ranks)):
        torch.testing.assert_close(sum(rank_grads), p.grad, rtol=1e-8, atol=1e-10)
