"""Backbones: ResNet-50w2 widths, activation checkpointing (same loss and gradients), Swin's drop path off in
the momentum network and in the rows that update the groups."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from smog.backbones import build_backbone, checkpoint_stages, drop_paths
from smog.config import ConfigError, ModelConfig, load_config
from smog.method import SMoG


@pytest.fixture(autouse=True)
def one_thread():
    """These small forwards run fastest on one thread (and do not fight the other tests for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_resnet50w2_doubles_every_width_of_resnet50():
    net = build_backbone(ModelConfig(backbone="resnet50w2"), 3, 32)
    # SwAV's resnet50w2: stem 2 x 64; stage s has bottleneck width 2 x 64 x 2^s and output 4 x that
    assert (net.conv1.out_channels, net.bn1.num_features) == (128, 128)
    for s, stage in enumerate((net.layer1, net.layer2, net.layer3, net.layer4)):
        width = 128 * 2 ** s
        assert [b.conv2.out_channels for b in stage] == [width] * len(stage)
        assert [b.conv3.out_channels for b in stage] == [4 * width] * len(stage)
    assert [len(s) for s in (net.layer1, net.layer2, net.layer3, net.layer4)] == [3, 4, 6, 3]
    assert net.out_features == 4096
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 4096)


def _model(backbone: str, checkpoint: bool, size: int) -> SMoG:
    cfg = load_config("digits", [f"model.backbone={backbone}", "model.small_stem=true",
                                 f"model.checkpoint={checkpoint}", f"data.large_size={size}",
                                 f"data.small_size={size // 2}", "data.small_crops=1"])
    torch.manual_seed(0)
    return SMoG(build_backbone(cfg.model, 3, size), cfg)


@pytest.fixture(scope="module")
def swin() -> SMoG:
    return _model("swin_t", False, SWIN_SIZE)


SWIN_SIZE = 28  # 7 x 7 patches: one attention window


def _iteration(model: SMoG, q: list[torch.Tensor], k: list[torch.Tensor], beta: float):
    """One iteration's (loss, update rows [U, N, D]) of `model` on the crop sets q and k."""
    z_k, z_q, p = model.forward_crops(model.online, q, k)
    return model.grouping(z_k, z_q[model.update_crops], p, beta), z_q[model.update_crops].detach()


def _crops(seed: int, size: int, n: int = 2) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(q, k) crop sets of random images, each 2 large [n, 3, size, size] + 1 small (data.small_crops=1)."""
    gen = torch.Generator().manual_seed(seed)

    def crops() -> list[torch.Tensor]:
        return [torch.randn(n, 3, s, s, generator=gen) for s in (size, size, size // 2)]

    return crops(), crops()


@pytest.mark.parametrize("backbone", ["resnet18", "swin_t"])
def test_checkpointed_backbone_gives_the_same_loss_and_gradients(backbone, swin):
    if backbone == "swin_t":  # the module's Swin, checkpointed in a copy (one Swin build per test module)
        size, plain, ckpt = SWIN_SIZE, copy.deepcopy(swin), copy.deepcopy(swin)
        checkpoint_stages(ckpt.online.backbone)
    else:  # through the config key
        size, plain, ckpt = 8, _model(backbone, False, 8), _model(backbone, True, 8)
    assert plain.state_dict().keys() == ckpt.state_dict().keys()
    ckpt.load_state_dict(plain.state_dict())
    q, k = _crops(1, size)
    outs = []
    for model in (plain, ckpt):
        torch.manual_seed(2)  # the same drop-path draws
        loss, _ = _iteration(model, q, k, beta=0.9)
        loss.backward()
        outs.append((loss.detach(), {n.replace("._checkpoint_wrapped_module", ""): p.grad
                                         for n, p in model.online.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = outs
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and all(g is not None for g in grads_b.values())
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)
    stage = ckpt.online.backbone.layer1 if backbone == "resnet18" else ckpt.online.backbone.net.features[1]
    assert type(stage).__name__ == "CheckpointWrapper"


def test_checkpoint_of_a_backbone_without_stages_is_refused():
    with pytest.raises(ConfigError, match="model.checkpoint"):
        load_config("digits", ["model.checkpoint=true"])


def test_swin_momentum_network_runs_without_drop_path_and_the_online_one_with_it(swin):
    model = copy.deepcopy(swin)
    model.train()
    # 12 blocks at rates 0.2 * i / 11, i = 0..11: eleven non-zero
    assert len(drop_paths(model.online.backbone)) == 11 and drop_paths(model.momentum.backbone) == []
    x = [torch.randn(2, 3, SWIN_SIZE, SWIN_SIZE)]
    with torch.no_grad():
        torch.testing.assert_close(model.momentum(x), model.momentum(x), rtol=0, atol=0)
        assert not torch.allclose(model.online(x)[0], model.online(x)[0], atol=1e-3)


def test_swin_update_rows_come_from_a_forward_without_drop_path(swin):
    model = copy.deepcopy(swin)
    model.train()
    q, k = _crops(3, SWIN_SIZE)
    _, update_rows = _iteration(model, q, k, beta=0.9)
    # the online network with every drop-path rate 0, on the two large q crops: an independent forward
    for m in drop_paths(model.online.backbone):
        m.p = 0.0
    with torch.no_grad():
        z = F.normalize(model.online.projector(model.online.backbone(torch.cat(q[:2]))).float(), dim=1)
    torch.testing.assert_close(update_rows, torch.stack(z.chunk(2)), rtol=1e-5, atol=1e-5)
    assert model.online.training and all(m.training for m in model.online.modules())


@pytest.mark.parametrize("size, cells", [(28, 4), (16, 2)])
def test_small_cnn_grid_keeps_the_mean_of_each_cell(size, cells):
    """model.grid=2: the last feature map [B, 8w, cells, cells] averaged over each of its 2 x 2 quarters,
    channel-major; computed here by slicing the map."""
    torch.manual_seed(0)
    net = build_backbone(ModelConfig(width=4, grid=2), 1, size).eval()
    x = torch.randn(3, 1, size, size)
    with torch.no_grad():
        trunk = net[:-2](x)
        out = net(x)
    assert trunk.shape == (3, 32, cells, cells)
    half = cells // 2
    quarters = [[trunk[:, :, i * half:(i + 1) * half, j * half:(j + 1) * half].mean((2, 3)) for j in range(2)]
                for i in range(2)]
    expected = torch.stack([torch.stack(row, -1) for row in quarters], -2).flatten(1)
    assert net.out_features == 32 * 4 == out.shape[1]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_grid_is_refused_for_backbones_that_pool_their_own_features():
    with pytest.raises(ConfigError, match="model.grid=2"):
        load_config("digits", ["model.backbone=resnet18", "model.grid=2"])
