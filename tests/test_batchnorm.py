"""smog.batchnorm: one BatchNorm over tensors of several sizes and over a group of processes.

Expected values come from torch's own BatchNorm (native kernels, autograd included) over every tensor's
pixels laid side by side as one [1, C, L, 1] batch, the authors' formulation (`flat_batch_norm`); across
processes, from one process holding every process's tensors. Multi-process cases run real gloo processes.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from smog.batchnorm import SyncBatchNorm, batch_norm, synchronise
from tests.test_distributed import launch

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]
# (rtol, atol) of outputs and gradients against torch's BatchNorm on the same dtype
TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 5e-2)}


def flat_batch_norm(bn: _BatchNorm, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """torch's BatchNorm over the tensors' pixels side by side as one [1, C, L, 1] batch (float32 statistics
    for low-precision inputs, as torch's mixed-precision BatchNorm keeps them)."""
    channels = xs[0].shape[1]
    flat = torch.cat([x.transpose(0, 1).reshape(channels, -1) for x in xs], dim=1)[None, :, :, None]
    if flat.dtype in (torch.bfloat16, torch.float16):
        flat = flat.float()
    rate = 0.0
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        rate = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    out = nn.functional.batch_norm(flat, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                   bn.training or bn.running_mean is None, rate, bn.eps)[0, :, :, 0]
    return [o.reshape(x.shape[1], x.shape[0], *x.shape[2:]).transpose(0, 1).to(x.dtype)
            for o, x in zip(out.split([x.numel() // channels for x in xs], dim=1), xs)]


def randomise(bn: _BatchNorm, seed: int) -> _BatchNorm:
    """Random affine weights and running statistics, so that every term of the update shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if bn.affine:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=g, dtype=bn.weight.dtype) + 0.5)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g, dtype=bn.bias.dtype))
        if bn.track_running_stats:
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g, dtype=bn.running_mean.dtype))
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g, dtype=bn.running_var.dtype) + 0.5)
    return bn


def tensors(seed: int, shapes: list[tuple[int, ...]], dtype: torch.dtype, layout: str) -> list[torch.Tensor]:
    """One tensor per shape, each with its own mean and scale (so that the pooled statistics differ from
    every tensor's own)."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=g, dtype=torch.float64) * (1 + i) + 2 * i - 1 for i, shape in enumerate(shapes)]
    if layout == "channels_last":
        xs = [x.to(memory_format=torch.channels_last) for x in xs]
    return [x.to(dtype) for x in xs]


SHAPES = {  # name -> shapes of the tensors that pool
    "4d-two-sizes": [(4, 3, 6, 6), (6, 3, 3, 3)],
    "4d-three-sizes": [(3, 5, 7, 7), (5, 5, 4, 4), (2, 5, 1, 2)],
    "4d-one": [(4, 3, 5, 5)],
    "2d-two": [(5, 7), (9, 7)],
    "3d-two": [(4, 3, 10), (2, 3, 6)],
}
LAYERS = {  # name -> BatchNorm layer factory (channels)
    "affine": lambda c: nn.BatchNorm2d(c),
    "no-affine": lambda c: nn.BatchNorm2d(c, affine=False),
    "cumulative": lambda c: nn.BatchNorm2d(c, momentum=None),
    "no-running": lambda c: nn.BatchNorm2d(c, track_running_stats=False),
}


def _check_against_flat(bn, xs, device, dtype, forwards=2, sync=False):
    """Outputs, input / weight / bias gradients and running statistics of `forwards` training forwards of
    batch_norm (or of a SyncBatchNorm's forward) against flat_batch_norm on a copy of the layer."""
    rtol, atol = TOLERANCE[dtype]
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    bn = bn.to(device, param_dtype)
    ref = copy.deepcopy(bn)
    for step in range(forwards):
        ins = [(x + step).to(device).requires_grad_() for x in xs]
        ins_ref = [x.detach().clone().requires_grad_() for x in ins]
        g = torch.Generator().manual_seed(100 + step)
        weights = [torch.randn(x.shape, generator=g, dtype=torch.float64).to(device, dtype) for x in xs]
        out = [bn(ins[0])] if sync else batch_norm(bn, ins)
        out_ref = flat_batch_norm(ref, ins_ref)
        for o, e, x in zip(out, out_ref, ins):
            assert o.dtype == x.dtype and o.shape == x.shape
            torch.testing.assert_close(o, e, rtol=rtol, atol=atol)
        sum((o.float() * w.float()).sum() for o, w in zip(out, weights)).backward()
        sum((o.float() * w.float()).sum() for o, w in zip(out_ref, weights)).backward()
        scale = max(float(x.grad.abs().max()) for x in ins_ref)
        for x, x_ref in zip(ins, ins_ref):
            assert x.grad.dtype == x.dtype
            torch.testing.assert_close(x.grad, x_ref.grad, rtol=rtol, atol=atol * scale)
        if bn.affine:
            for p, p_ref in ((bn.weight, ref.weight), (bn.bias, ref.bias)):
                assert p.grad.dtype == p.dtype
                torch.testing.assert_close(p.grad, p_ref.grad, rtol=rtol, atol=atol * float(p_ref.grad.abs().max()))
        if bn.track_running_stats:
            stat_tol = (1e-12, 1e-12) if dtype == torch.float64 else (1e-5, 1e-6)
            torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=stat_tol[0], atol=stat_tol[1])
            torch.testing.assert_close(bn.running_var, ref.running_var, rtol=stat_tol[0], atol=stat_tol[1])
            assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shapes", list(SHAPES), ids=str)
@pytest.mark.parametrize("layer", list(LAYERS), ids=str)
def test_pooled_equals_torch_batchnorm_over_the_flattened_tensors(device, dtype, shapes, layer):
    channels = SHAPES[shapes][0][1]
    bn = randomise(LAYERS[layer](channels), seed=1)
    _check_against_flat(bn, tensors(2, SHAPES[shapes], dtype, "contiguous"), device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_channels_last_inputs(device, dtype):
    """NHWC tensors give the same values and keep their layout in the outputs and gradients."""
    xs = tensors(3, SHAPES["4d-two-sizes"], dtype, "channels_last")
    _check_against_flat(randomise(nn.BatchNorm2d(3), seed=4), xs, device, dtype)
    out = batch_norm(nn.BatchNorm2d(3).to(device), [x.to(device).float() for x in xs])
    assert all(o.is_contiguous(memory_format=torch.channels_last) for o in out)


def test_statistics_are_float32_for_low_precision_inputs():
    """bfloat16 tensors whose variance is tiny next to their mean: statistics in bfloat16 would lose the
    variance entirely; the running statistics must match float32 statistics of the same values."""
    g = torch.Generator().manual_seed(5)
    xs = [(64 + torch.randn(8, 2, 4, 4, generator=g) * 0.5).bfloat16() for _ in range(2)]
    bn, ref = nn.BatchNorm2d(2), nn.BatchNorm2d(2)
    batch_norm(bn, xs)
    flat_batch_norm(ref, [x.float() for x in xs])
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-6, atol=1e-6)


def test_gradient_by_finite_differences():
    bn = randomise(nn.BatchNorm2d(2).double(), seed=6)
    xs = [x.requires_grad_() for x in tensors(7, [(2, 2, 3, 3), (3, 2, 2, 1)], torch.float64, "contiguous")]
    assert torch.autograd.gradcheck(lambda a, b, w, c: tuple(
        batch_norm(_with(bn, w, c), [a, b])), (*xs, bn.weight.detach().clone().requires_grad_(),
                                               bn.bias.detach().clone().requires_grad_()), eps=1e-6, atol=1e-6)


def _with(bn: _BatchNorm, weight: torch.Tensor, bias: torch.Tensor) -> _BatchNorm:
    """bn with its affine parameters replaced by the given tensors (for gradcheck)."""
    layer = copy.deepcopy(bn)
    del layer.weight, layer.bias
    layer.weight, layer.bias = weight, bias
    return layer


def test_eval_mode_uses_the_running_statistics():
    bn = randomise(nn.BatchNorm2d(3).double().eval(), seed=8)
    xs = tensors(9, SHAPES["4d-two-sizes"], torch.float64, "contiguous")
    for o, x in zip(batch_norm(bn, xs), xs):
        torch.testing.assert_close(o, bn(x), rtol=0, atol=0)
    assert int(bn.num_batches_tracked) == 0


def test_sync_batchnorm_alone_is_torch_batchnorm():
    """Without an initialised process group a SyncBatchNorm is a BatchNorm of any input rank."""
    for shape in [(6, 4), (3, 4, 5), (2, 4, 3, 3)]:
        _check_against_flat(randomise(SyncBatchNorm(4), seed=10), tensors(11, [shape], torch.float64, "contiguous"),
                            "cpu", torch.float64, sync=True)


def test_synchronise_on_one_process_changes_nothing():
    net = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3))
    assert synchronise(net, 0) is net and isinstance(net[1], nn.BatchNorm2d)
    assert not isinstance(net[1], SyncBatchNorm)


# ---- groups of real processes (gloo) ---------------------------------------------------------------

ROWS = 8  # samples of the global batch: rank r of a world of W holds rows r::W


def _model(seed: int) -> nn.ModuleDict:
    """A backbone whose residual blocks have shortcut BatchNorms (run per size under bn_crops=pooled) and
    a head with a BatchNorm1d, at random BatchNorm weights and statistics."""
    from tests.test_pooled_bn import backbone

    torch.manual_seed(seed)
    net = nn.ModuleDict({"backbone": backbone("resnet18", channels=1),
                         "head": nn.Sequential(nn.Linear(512, 6, bias=False), nn.BatchNorm1d(6))}).double().train()
    for m in net.modules():
        if isinstance(m, _BatchNorm):
            randomise(m, seed + m.num_features)
    return net


def _inputs() -> tuple[list[torch.Tensor], torch.Tensor]:
    """(crops: 2 of 4 px and 2 of 2 px, each [ROWS, 1, h, w]; loss weights [4, ROWS, 6])."""
    g = torch.Generator().manual_seed(12)
    crops = [torch.randn(ROWS, 1, s, s, generator=g, dtype=torch.float64) * (1 + i) + i
             for i, s in enumerate((4, 4, 2, 2))]
    return crops, torch.randn(4, ROWS, 6, generator=g, dtype=torch.float64)


def _run(net: nn.ModuleDict, rows: list[int], bn_crops: str) -> dict:
    """One training forward and backward of encode over the given rows; the outputs, gradients and state."""
    from smog.networks import encode

    crops, weights = _inputs()
    out = encode([c[rows] for c in crops], net["backbone"], net["head"], bn_crops)
    (out * weights[:, rows]).sum().backward()
    return {"out": out.detach(), "grads": {n: p.grad.clone() for n, p in net.named_parameters()},
            "state": {k: v.clone() for k, v in net.state_dict().items()}}


def sync_world(rank: int, world: int, seed: int) -> dict:
    """One rank's results: with 2 processes, two independent runs of both (rows (0, 1) mod 4, then rows
    (2, 3) mod 4); with 4, sync groups of 2 and of 4; then the error of a group size that does not divide."""
    results = {}
    for bn_crops in ("pooled", "per_resolution"):
        if world == 2:
            for half in (0, 1):
                net = synchronise(_model(seed), 0)
                results[bn_crops, "half", half] = _run(net, list(range(2 * half + rank, ROWS, 4)), bn_crops)
        else:
            for size in (2, 4):
                net = synchronise(_model(seed), size)
                assert all(isinstance(m, SyncBatchNorm) for m in net.modules() if isinstance(m, _BatchNorm))
                results[bn_crops, "group", size] = _run(net, list(range(rank, ROWS, world)), bn_crops)
    try:
        synchronise(_model(seed), 3)
    except ValueError as error:
        results["error"] = str(error)
    return results


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[int, list[dict]]:
    """Results of a world of 2 gloo processes and of a world of 4."""
    root = tmp_path_factory.mktemp("sync")
    worlds = {}
    for world in (2, 4):
        results, codes = launch(world, "tests.test_batchnorm:sync_world", 13, root / str(world), timeout_s=60.0)
        assert codes == [0] * world, codes
        worlds[world] = results
    return worlds


def _close(a: dict, b: dict, what: str, rtol: float = 1e-10, atol: float = 1e-10) -> None:
    for key, expected in b.items():
        torch.testing.assert_close(a[key], expected, rtol=rtol, atol=atol, msg=lambda m, key=key: f"{what} {key}: {m}")


@pytest.mark.parametrize("bn_crops", ["pooled", "per_resolution"])
def test_groups_of_two_equal_independent_runs_of_two(worlds, bn_crops):
    """4 processes in 2 groups of 2: each group's outputs, gradients and BatchNorm statistics are those of a
    run of its 2 processes alone; the two groups' statistics differ."""
    for rank, result in enumerate(worlds[4]):
        alone = worlds[2][rank % 2][bn_crops, "half", rank // 2]
        mine = result[bn_crops, "group", 2]
        torch.testing.assert_close(mine["out"], alone["out"], rtol=1e-10, atol=1e-10)
        _close(mine["grads"], alone["grads"], f"rank {rank} gradient")
        _close(mine["state"], alone["state"], f"rank {rank} state")
    first, second = (worlds[4][r][bn_crops, "group", 2]["state"] for r in (0, 2))
    assert not torch.allclose(first["backbone.bn1.running_mean"], second["backbone.bn1.running_mean"])


@pytest.mark.parametrize("bn_crops", ["pooled", "per_resolution"])
def test_one_group_of_four_equals_one_process_with_the_whole_batch(worlds, bn_crops):
    """Outputs (each rank's rows), the sum of the ranks' gradients and every rank's BatchNorm statistics
    against one process holding all rows with plain BatchNorm."""
    whole = _run(_model(13), list(range(ROWS)), bn_crops)
    ranks = [result[bn_crops, "group", 4] for result in worlds[4]]
    for rank, mine in enumerate(ranks):
        torch.testing.assert_close(mine["out"], whole["out"][:, rank::4], rtol=1e-9, atol=1e-10)
        _close(mine["state"], whole["state"], f"rank {rank} state", rtol=1e-9, atol=1e-12)
    summed = {name: sum(r["grads"][name] for r in ranks) for name in whole["grads"]}
    _close(summed, whole["grads"], "summed gradient", rtol=1e-8, atol=1e-10)


def test_group_size_must_divide_the_processes(worlds):
    for result in worlds[4]:
        assert "group_size=3 must divide the 4 processes" in result["error"]
