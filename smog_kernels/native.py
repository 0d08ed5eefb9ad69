"""The "cpu" and "cuda" backends: the smog:: operators compiled into smog_kernels._C.

Arguments arrive validated (see smog_kernels.api). Fake kernels registered here give output
shapes and dtypes so the ops trace under torch.compile without running.
"""
from __future__ import annotations

import torch

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


def supports(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda") and has_kernels(device.type)


def assign(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.smog.assign(x, centroids)


def group_stats(x: torch.Tensor, index: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.smog.group_stats(x, index, num_groups)


def momentum_update(centroids: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.ops.smog.momentum_update(centroids, sums, counts, beta)


def loss_forward(
    p: torch.Tensor, centroids: torch.Tensor, targets: torch.Tensor, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.ops.smog.loss_forward(p, centroids, targets, inv_temperature)


def loss_centroid_grad(
    p: torch.Tensor, centroids: torch.Tensor, lse: torch.Tensor, row_weight: torch.Tensor, inv_temperature: float
) -> torch.Tensor:
    return torch.ops.smog.loss_centroid_grad(p, centroids, lse, row_weight, inv_temperature)


if _LOADED:

    @torch.library.register_fake("smog::assign")
    def _(x, centroids):
        n = x.shape[0]
        return x.new_empty(n, dtype=torch.int64), x.new_empty(n, dtype=torch.float32)

    @torch.library.register_fake("smog::group_stats")
    def _(x, index, num_groups):
        return (
            x.new_empty(num_groups, x.shape[1], dtype=torch.float32),
            x.new_empty(num_groups, dtype=torch.int64),
        )

    @torch.library.register_fake("smog::momentum_update")
    def _(centroids, sums, counts, beta):
        return torch.empty_like(centroids)

    @torch.library.register_fake("smog::loss_forward")
    def _(p, centroids, targets, inv_temperature):
        n, d = p.shape
        return (
            p.new_empty(n, dtype=torch.float32),
            p.new_empty(targets.shape[0], n, dtype=torch.float32),
            p.new_empty(n, d, dtype=torch.float32),
        )

    @torch.library.register_fake("smog::loss_centroid_grad")
    def _(p, centroids, lse, row_weight, inv_temperature):
        return centroids.new_empty(centroids.shape, dtype=torch.float32)
