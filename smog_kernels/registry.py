"""The backends by name, and the one each call runs on.

NAMES lists every backend; `get` loads one on first use (the Triton backend imports triton, which
is slow or absent). `resolve` turns a user's backend="..." into a Backend for a call, "auto" by
smog_kernels.auto.
"""
from __future__ import annotations

import functools
import importlib
import math

import torch

from smog_kernels import auto
from smog_kernels.backend import Backend

NAMES = ("reference", "cpu", "triton", "cuda")
_OBJECTS = {  # name -> (module, attribute holding the backend)
    "reference": ("smog_kernels.reference", "REFERENCE"),
    "cpu": ("smog_kernels.native", "CPU"),
    "triton": ("smog_kernels.triton", "TRITON"),
    "cuda": ("smog_kernels.native", "CUDA"),
}


_LOADED: dict[str, Backend | None] = {}  # name -> its backend (None: its module cannot be imported here)


def get(name: str) -> Backend | None:
    """The backend called `name`, or None when its module cannot be imported here (loaded on first use)."""
    if name not in _LOADED:
        module, attribute = _OBJECTS[name]
        try:
            _LOADED[name] = getattr(importlib.import_module(module), attribute)
        except ImportError:
            _LOADED[name] = None
    return _LOADED[name]


@functools.cache
def usable(name: str) -> bool:
    """Whether this install can run the backend (fixed for the process's life, hence cached)."""
    backend = get(name)
    return backend is not None and backend.available()


def available_backends() -> list[str]:
    """The backends this install can run, reference first."""
    return [name for name in NAMES if usable(name)]


def _log2(size: int) -> int:
    return round(math.log2(max(size, 1)))


def resolve(backend: str, rows: torch.Tensor, num_groups: int | None = None, op: str | None = None) -> Backend:
    """The backend for a call on `rows` [..., N, D] (device, dtype and size) against num_groups groups.

    An explicit name is checked against this install and the rows' device; "auto" is auto.choose's
    pick for `op` (a key of the tuned table: "assign", "loss_fwd", "loss_fwdbwd", "step", "step_graph").
    Under torch.compile the choice is taken once, at tracing, as a constant of the graph.
    """
    shape = None
    if num_groups is not None and op is not None:
        n, d = rows.shape[-2:]
        shape = (_log2(n), _log2(num_groups), _log2(d))
    return _LOADED[_choice(backend, rows.device, rows.dtype, shape, op)]


@torch.compiler.assume_constant_result
def _choice(backend: str, device: torch.device, dtype: torch.dtype, log_shape: tuple[int, int, int] | None,
            op: str | None) -> str:
    """The name of the backend `resolve` returns (loaded)."""
    return (_named(backend, device) if backend != "auto" else _auto(op, device, dtype, log_shape)).name


@functools.cache
def _named(name: str, device: torch.device) -> Backend:
    if name not in NAMES:
        raise ValueError(f"backend must be 'auto' or one of {NAMES}, got {name!r}")
    if not usable(name):
        raise ValueError(f"backend {name!r} is not available in this install (available: {available_backends()})")
    backend = get(name)
    if not backend.supports(device):
        raise ValueError(f"backend {name!r} cannot run on tensors on {device}")
    return backend


@functools.cache
def _auto(op: str | None, device: torch.device, dtype: torch.dtype, log_shape: tuple[int, int, int] | None) -> Backend:
    """Cached per op, device, dtype and sizes rounded to powers of two: it runs on every op call."""
    candidates = tuple(name for name in auto.rule(device.type, dtype) if usable(name) and get(name).supports(device))
    shape = None if log_shape is None else tuple(2**e for e in log_shape)
    return get(auto.choose(op, device, dtype, shape, candidates))
