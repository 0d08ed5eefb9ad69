"""A trained backbone for use outside smog: its weights under the key names of the matching torchvision or timm
model, classifier left out, or under smog's own, and the Python lines that build that model and load them.

Formats each backbone (model.backbone) has:
- resnet18, resnet50: torchvision (torchvision.models.<name> with fc = Identity), timm
  (timm.create_model(<name>, num_classes=0)), smog; with model.small_stem or input that is not RGB the model's
  conv1 (and maxpool) are replaced as smog.backbones replaces them;
- swin_t, vit_b_16: torchvision (head, heads = Identity), smog; smog feeds them grey images as 3 equal channels;
- timm/<name>: timm (timm.create_model(<name>, num_classes=0, in_chans=C)), smog;
- small_cnn, resnet50w2: smog only (resnet50w2 doubles every width of ResNet-50; torchvision's and timm's
  wide_resnet50_2 double only the bottleneck's inner widths).
smog: the backbone's state dict as smog.backbones.build_backbone builds it from the run's config.
"""
from __future__ import annotations

import torch
from torch import nn

from smog.config import Config, ModelConfig
from smog.data import data_info

FORMATS = ("torchvision", "timm", "smog")
RESNETS = ("resnet18", "resnet50")
TRANSFORMERS = ("swin_t", "vit_b_16")
WRAPPED = "_checkpoint_wrapped_module."  # inserted into parameter names by model.checkpoint


class ExportError(ValueError):
    """A format the backbone has no counterpart in, or an export that cannot be written."""


def formats(model: ModelConfig) -> tuple[str, ...]:
    """The formats `model.backbone` can be exported to, its own library's first."""
    if model.backbone in RESNETS:
        return ("torchvision", "timm", "smog")
    if model.backbone in TRANSFORMERS:
        return ("torchvision", "smog")
    if model.backbone.startswith("timm/"):
        return ("timm", "smog")
    return ("smog",)


def check_format(model: ModelConfig, fmt: str) -> None:
    """ExportError naming the format when `model.backbone` has no counterpart in it."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt not in formats(model):
        raise ExportError(f"model.backbone={model.backbone} has no {fmt} counterpart: export it as "
                          f"{' or '.join(formats(model))}")


def backbone_state(backbone: nn.Module, model: ModelConfig, fmt: str) -> dict[str, torch.Tensor]:
    """The state dict of smog's `backbone` (built from `model`) under the key names of format `fmt`."""
    check_format(model, fmt)
    state = backbone.state_dict()
    if fmt == "smog":
        return dict(state)
    prefix = "net." if model.backbone in TRANSFORMERS else ""  # smog's grey-to-RGB wrapper
    return {key[len(prefix):].replace(WRAPPED, ""): value for key, value in state.items()}


def loading_code(cfg: Config, fmt: str, weights: str, recipe: str) -> str:
    """Python lines that build format `fmt`'s model of cfg.model.backbone as `model` and load the exported
    `weights` into it with strict=True; `recipe` is the JSON file holding the run's config (smog format)."""
    check_format(cfg.model, fmt)
    name, info = cfg.model.backbone, data_info(cfg.data)
    lines = ["import torch"]
    if fmt == "smog":
        lines += ["import json", "from smog.backbones import build_backbone", "from smog.config import config_from_dict",
                  "from smog.data import data_info",
                  f"cfg = config_from_dict(json.load(open({recipe!r}))['config'])",
                  "info = data_info(cfg.data)",
                  "model = build_backbone(cfg.model, info.channels, info.size)"]
    elif name.startswith("timm/"):
        lines += ["import timm",
                  (f"model = timm.create_model({name[len('timm/'):]!r}, pretrained=False, num_classes=0, "
                   f"in_chans={info.channels})")]
    elif name in RESNETS:
        if fmt == "torchvision":
            lines += ["import torchvision", f"model = torchvision.models.{name}(weights=None)",
                      "model.fc = torch.nn.Identity()  # no classifier: the model returns its pooled features"]
        else:
            lines += ["import timm", f"model = timm.create_model({name!r}, pretrained=False, num_classes=0)"]
        if cfg.model.small_stem:
            lines += [f"model.conv1 = torch.nn.Conv2d({info.channels}, 64, 3, stride=1, padding=1, bias=False)",
                      "model.maxpool = torch.nn.Identity()"]
        elif info.channels != 3:
            lines.append(f"model.conv1 = torch.nn.Conv2d({info.channels}, 64, 7, stride=2, padding=3, bias=False)")
    else:
        lines.append("import torchvision")
        if name == "swin_t":
            lines += ["model = torchvision.models.swin_t(weights=None)", "model.head = torch.nn.Identity()"]
        else:
            lines += [f"model = torchvision.models.vit_b_16(weights=None, image_size={info.size})",
                      "model.heads = torch.nn.Identity()"]
        if info.channels != 3:
            lines.append("# smog fed it the grey images as 3 equal channels: model(x.expand(-1, 3, -1, -1))")
    lines.append(f"model.load_state_dict(torch.load({weights!r}, weights_only=True))")
    return "\n".join(lines)
