"""The "cpu" and "cuda" backends: the smog:: operators compiled into smog_kernels._C, one backend per
device type (the extension holds CPU kernels always, CUDA kernels where it was built with nvcc)."""
from __future__ import annotations

import torch

from smog_kernels import fakes

try:
    from smog_kernels import _C  # noqa: F401  (loading it registers torch.ops.smog.*)

    _LOADED = True
except ImportError:
    _LOADED = False


def has_kernels(device_type: str) -> bool:
    """Whether the extension holds kernels for this device type ("cpu" or "cuda")."""
    if not _LOADED:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key("smog::assign", key)


class Native:
    """The compiled operators for tensors of one device type."""

    capabilities = frozenset()

    def __init__(self, device_type: str) -> None:
        self.name = self.device_type = device_type

    def available(self) -> bool:
        return has_kernels(self.device_type) and (self.device_type != "cuda" or torch.cuda.is_available())

    def supports(self, device: torch.device) -> bool:
        return device.type == self.device_type and has_kernels(self.device_type)

    def assign(self, x: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.smog.assign(x, groups)

    def group_stats(self, x: torch.Tensor, index: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.smog.group_stats(x, index, num_groups)

    def momentum_update(self, groups: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor,
                        beta: float) -> torch.Tensor:
        return torch.ops.smog.momentum_update(groups, sums, counts, beta)

    def loss_forward(self, p: torch.Tensor, groups: torch.Tensor, targets: torch.Tensor,
                     inv_temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.ops.smog.loss_forward(p, groups, targets, inv_temperature)

    def loss_group_grad(self, p: torch.Tensor, groups: torch.Tensor, lse: torch.Tensor, row_weight: torch.Tensor,
                        inv_temperature: float) -> torch.Tensor:
        return torch.ops.smog.loss_group_grad(p, groups, lse, row_weight, inv_temperature)


CPU = Native("cpu")
CUDA = Native("cuda")

if _LOADED:
    fakes.register("smog", ["assign", "group_stats", "momentum_update", "loss_forward", "loss_group_grad"])
