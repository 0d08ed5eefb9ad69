"""Backend registry and the choice behind backend="auto".

A fused backend is a module exposing the internal op set below, called with validated arguments
(targets always [T, N]); "reference" is `smog_kernels.reference` itself.

    assign(x, centroids) -> (index int64 [N], score float32 [N])
    group_stats(x, index, num_groups) -> (sums float32 [K, D], counts int64 [K])
    momentum_update(centroids, sums, counts, beta) -> centroids' (dtype of centroids)
    loss_forward(p, centroids, targets, inv_temperature)
        -> (lse float32 [N], target_logits float32 [T, N], attention float32 [N, D])
        where attention[b] = sum_k softmax_k(<p_b, c_k> * inv_temperature) c_k
    loss_centroid_grad(p, centroids, lse, row_weight, inv_temperature)
        -> float32 [K, D] = inv_temperature * sum_b row_weight[b] softmax_bk p_b
    supports(device) -> bool

Optional: assign_and_stats(x, centroids, stats_from) -> (index, score, sums, counts), the
assignment of every row plus the statistics of rows x[stats_from:] in one pass; grouping_step
uses it when present.

"auto" on a GPU goes by measured figures where the op has them (`resolve_for`, table in
smog_kernels.backend_timings); otherwise, and on the CPU, by the fixed order AUTO_ORDER.
"""
from __future__ import annotations

import functools
import importlib
import math
import os
from types import ModuleType

import torch

from smog_kernels import backend_timings

NAMES = ("reference", "cpu", "triton", "cuda")

# Which fused backend "auto" tries first on each device type; the first that is available wins. On a GPU
# these are also the candidates among which resolve_for takes the one measured fastest.
AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}

_MODULES = {
    "reference": "smog_kernels.reference",
    "cpu": "smog_kernels.native",
    "cuda": "smog_kernels.native",
    "triton": "smog_kernels.triton",
}


@functools.cache
def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError:
        return None


@functools.cache
def _usable(name: str) -> bool:
    """Whether this install can run the backend (fixed for the process's life, hence cached)."""
    module = _load(name)
    if module is None:
        return False
    if name == "reference":
        return True
    if name == "cpu":
        return module.has_kernels("cpu")
    if name == "cuda":
        return torch.cuda.is_available() and module.has_kernels("cuda")
    # triton: a GPU, or CPU tensors under the interpreter
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def available_backends() -> list[str]:
    """The backends this install can run, reference first."""
    return [name for name in NAMES if _usable(name)]


@functools.cache
def resolve(backend: str, device: torch.device) -> tuple[str, ModuleType]:
    """The backend's name and module for tensors on `device`; "auto" picks the fastest present.

    Cached: it runs on every op call, and what is installed does not change while a process runs."""
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ()):
            if _usable(name) and _load(name).supports(device):
                return name, _load(name)
        return "reference", _load("reference")
    if backend not in NAMES:
        raise ValueError(f"backend must be 'auto' or one of {NAMES}, got {backend!r}")
    if not _usable(backend):
        raise ValueError(
            f"backend {backend!r} is not available in this install (available: {available_backends()})"
        )
    module = _load(backend)
    if backend != "reference" and not module.supports(device):
        raise ValueError(f"backend {backend!r} cannot run on tensors on {device}")
    if backend in ("cpu", "cuda") and device.type != backend:
        raise ValueError(f"backend {backend!r} cannot run on tensors on {device}")
    return backend, module


def resolve_for(op: str | tuple[str, ...], backend: str, rows: torch.Tensor, num_groups: int) -> tuple[str, ModuleType]:
    """resolve(backend, rows.device), except that "auto" on a GPU takes the fused backend measured
    fastest for `op` (a key of the timing table: "assign", "loss_fwd", "loss_fwdbwd", "step",
    "step_graphed", "step_graph"; or several in order of preference, the first with a figure for this
    dtype deciding) at the recorded shape nearest to rows [..., N, D] against num_groups groups;
    AUTO_ORDER where the table has no figure for these ops and dtype or no usable backend was measured."""
    if backend != "auto" or rows.device.type != "cuda":  # the figures are a GPU's
        return resolve(backend, rows.device)
    n, d = rows.shape[-2:]
    ops = (op,) if isinstance(op, str) else tuple(op)
    return _measured_choice(ops, rows.device, rows.dtype, _log2(n), _log2(num_groups), _log2(d))


def _log2(size: int) -> int:
    return round(math.log2(max(size, 1)))


@functools.cache
def _measured_choice(ops: tuple[str, ...], device: torch.device, dtype: torch.dtype, log_n: int, log_k: int,
                     log_d: int):
    """Cached per ops, device, dtype and sizes rounded to powers of two: it runs on every op call."""
    usable = [name for name in AUTO_ORDER[device.type] if _usable(name) and _load(name).supports(device)]
    shape = (2**log_n, 2**log_k, 2**log_d)
    for op in ops:
        name = backend_timings.fastest(op, str(dtype).removeprefix("torch."), shape, usable)
        if name:
            return name, _load(name)
    return resolve("auto", device)
