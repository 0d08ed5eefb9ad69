"""`smog export`: a checkpoint's online backbone loads with strict=True into the torchvision / timm model built
by hand without classifier (and into smog's own) and gives the features smog's backbone gives; bad input ends
with one line naming the file or the format."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch import nn

from smog import checkpoint, cli
from tests.training import make_trainer


def saved_run(tmp_path, *overrides: str) -> tuple[str, nn.Module]:
    """A digits run's checkpoint (the trainer's layout) whose online backbone is moved off its initial weights,
    so that it differs from the momentum network's; returns (run directory, that backbone in eval mode)."""
    trainer = make_trainer(tmp_path, "model.bn_crops=per_resolution", *overrides)
    backbone = trainer.method.online.backbone
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in backbone.state_dict().items():
            noise = torch.rand(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.mul_(0.5 + noise)
            elif tensor.is_floating_point():
                tensor.add_(0.2 * (noise - 0.5))
    trainer.progress.step = 7
    checkpoint.save(trainer.state_dict(), f"{trainer.run_dir}/checkpoint.pt")
    return trainer.run_dir, backbone.eval()


def by_hand(backbone: str, fmt: str, small_stem: bool) -> nn.Module:
    """The counterpart model for 1-channel 8 x 8 digits, written out from torchvision's and timm's APIs."""
    import torchvision

    if backbone.startswith("timm/"):
        import timm

        return timm.create_model(backbone[5:], pretrained=False, num_classes=0, in_chans=1)
    if backbone == "swin_t":
        net = torchvision.models.swin_t(weights=None)
        net.head = nn.Identity()
        return net
    if fmt == "torchvision":
        net = getattr(torchvision.models, backbone)(weights=None)
        net.fc = nn.Identity()
    else:
        import timm

        net = timm.create_model(backbone, pretrained=False, num_classes=0)
    if small_stem:
        net.conv1, net.maxpool = nn.Conv2d(1, 64, 3, 1, 1, bias=False), nn.Identity()
    else:
        net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return net


def grey_to_rgb(backbone: str, x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if backbone == "swin_t" else x


CASES = [("resnet18", "torchvision", True), ("resnet18", "torchvision", False), ("resnet50", "torchvision", True),
         ("resnet50", "timm", True), ("timm/test_resnet", "timm", False), ("swin_t", "torchvision", False)]


@pytest.mark.parametrize("backbone, fmt, small_stem", CASES)
def test_export_loads_strictly_and_gives_smogs_features(tmp_path, backbone, fmt, small_stem):
    if fmt == "timm" or backbone.startswith("timm/"):
        pytest.importorskip("timm", reason="the timm package is not installed")
    run_dir, smog_backbone = saved_run(tmp_path, f"model.backbone={backbone}", f"model.small_stem={small_stem}")
    out = tmp_path / "weights.pt"
    assert cli.main(["export", run_dir, "--format", fmt, "--out", str(out)]) == 0
    weights = torch.load(out, weights_only=True)
    net = by_hand(backbone, fmt, small_stem)
    net.load_state_dict(weights, strict=True)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = smog_backbone(x)
        torch.testing.assert_close(net.eval()(grey_to_rgb(backbone, x)), expected, rtol=1e-5, atol=1e-5)
    about = json.loads((tmp_path / "weights.json").read_text())
    namespace: dict = {}
    exec("\n".join(about["load"]), namespace)  # the lines the JSON gives users build and load the same model
    with torch.no_grad():
        torch.testing.assert_close(namespace["model"].eval()(grey_to_rgb(backbone, x)), expected, rtol=1e-5,
                                   atol=1e-5)
    head = checkpoint.header(f"{run_dir}/checkpoint.pt")
    assert about["checkpoint"]["step"] == 7 and about["checkpoint"]["sha256"] == head["sha256"]
    assert about["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert about["config"]["model"]["backbone"] == backbone and about["features"] == expected.shape[1]


def test_small_cnn_exports_in_smogs_format(tmp_path):
    run_dir, smog_backbone = saved_run(tmp_path, "model.grid=2")
    assert cli.main(["export", run_dir]) == 0  # the default format of small_cnn: smog
    about = json.loads((tmp_path / "digits" / "backbone_smog.json").read_text())
    from smog.backbones import small_cnn

    net = small_cnn(1, about["config"]["model"]["width"], grid=2)
    net.load_state_dict(torch.load(about["weights"], weights_only=True), strict=True)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), smog_backbone(x), rtol=1e-5, atol=1e-5)
    namespace: dict = {}
    exec("\n".join(about["load"]), namespace)
    with torch.no_grad():
        torch.testing.assert_close(namespace["model"].eval()(x), smog_backbone(x), rtol=1e-5, atol=1e-5)


def one_line_error(capsys, argv: list[str]) -> str:
    """Runs `smog export argv`, which must exit 2 with one line on stderr; returns that line."""
    assert cli.main(["export", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def test_bad_input_ends_with_one_line_naming_the_file_or_format(tmp_path, capsys):
    assert one_line_error(capsys, [str(tmp_path / "nowhere.pt")]) == f"smog export: error: no checkpoint at " \
                                                                      f"{tmp_path / 'nowhere.pt'}"
    assert str(tmp_path / "checkpoint.pt") in one_line_error(capsys, [str(tmp_path)])  # a folder without one
    run_dir, _ = saved_run(tmp_path / "run")
    line = one_line_error(capsys, [run_dir, "--format", "torchvision"])
    assert "model.backbone=small_cnn has no torchvision counterpart" in line
    cut = tmp_path / "cut.pt"
    cut.write_bytes((tmp_path / "run" / "digits" / "checkpoint.pt").read_bytes()[:-10])
    line = one_line_error(capsys, [str(cut)])
    assert str(cut) in line and "refused" in line
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    assert str(foreign) in one_line_error(capsys, [str(foreign)])
    with pytest.raises(SystemExit) as exit_:  # argparse: a format smog does not know
        cli.main(["export", run_dir, "--format", "onnx"])
    assert exit_.value.code == 2 and "'onnx'" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("backbone, fmt", [("timm/test_resnet", "torchvision"), ("resnet50w2", "torchvision"), ("resnet50w2", "timm"),
                                           ("swin_t", "timm"), ("small_cnn", "timm")])
def test_formats_a_backbone_has_no_counterpart_in_are_refused_by_name(backbone, fmt):
    from smog.config import load_config
    from smog.export import ExportError, backbone_state

    cfg = load_config("digits", [f"model.backbone={backbone}"])
    with pytest.raises(ExportError, match=f"model.backbone={backbone} has no {fmt} counterpart"):
        backbone_state(nn.Linear(1, 1), cfg.model, fmt)
