"""Argument checks shared by every backend; they run before any kernel launches.

Each check raises ValueError (bad shape or value) or TypeError (bad dtype) naming the argument and
its shape, so a user sees what was wrong without reading a kernel's traceback.
"""
from __future__ import annotations

import torch

FEATURE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def features(name: str, t: object, rank: int = 2) -> torch.Tensor:
    """A float32/bfloat16/float16 tensor of the given rank."""
    t = _tensor(name, t)
    if t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got {_describe(t)}")
    if t.dtype not in FEATURE_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {_describe(t)}")
    return t


def same_device(**tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{n} on {t.device}" for n, t in tensors.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def same_dim(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"{a_name} and {b_name} must have the same feature dimension D, got {a_name} "
            f"{tuple(a.shape)} and {b_name} {tuple(b.shape)}"
        )


def same_dtype(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{a_name} ({a.dtype}) and {b_name} ({b.dtype}) must have the same dtype")


def num_groups_at_least_one(name: str, k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"{name} must be >= 1, got {k}")
    return k


def group_index(name: str, t: object, shape: tuple[int, ...], num_groups: int) -> torch.Tensor:
    """An int64 tensor of the given shape with every value in [0, num_groups)."""
    t = _tensor(name, t)
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {_describe(t)}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {_describe(t)}")
    if t.numel() > 0:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= num_groups:
            raise ValueError(
                f"{name} values must lie in [0, {num_groups}), got values in [{lo}, {hi}] ({_describe(t)})"
            )
    return t


def unit_rows(name: str, t: torch.Tensor) -> None:
    """Rows of L2 norm 1 within the dtype's rounding. Checked on CPU tensors outside torch.compile only:
    elsewhere reading the check's result back would wait for the device or break the graph."""
    if t.device.type != "cpu" or t.numel() == 0 or torch.compiler.is_compiling():
        return
    tolerance = 1e-3 if t.dtype == torch.float32 else 2e-2
    norms = t.detach().float().norm(dim=-1).flatten()
    worst = int((norms - 1).abs().argmax())
    if abs(float(norms[worst]) - 1) > tolerance:
        raise ValueError(f"{name} must hold L2-normalised rows (norm 1 within {tolerance:g}), got a row of norm "
                         f"{float(norms[worst]):.4g} ({_describe(t)}); normalise with F.normalize(x, dim=-1)")


def unit_interval(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


# ---- one check per public op -------------------------------------------------------------------


def check_assign(x: torch.Tensor, groups: torch.Tensor) -> None:
    features("x", x)
    features("groups", groups)
    same_device(x=x, groups=groups)
    same_dim("x", x, "groups", groups)
    same_dtype("x", x, "groups", groups)
    if groups.shape[0] < 1:
        raise ValueError(f"groups must hold at least one group (K >= 1), got {_describe(groups)}")


def check_group_stats(x: torch.Tensor, index: torch.Tensor, num_groups: int) -> None:
    features("x", x)
    num_groups_at_least_one("num_groups", num_groups)
    group_index("index", index, (x.shape[0],), num_groups)
    same_device(x=x, index=index)


def check_momentum_update(
    groups: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, beta: float
) -> None:
    features("groups", groups)
    if groups.shape[0] < 1:
        raise ValueError(f"groups must hold at least one group (K >= 1), got {_describe(groups)}")
    _tensor("sums", sums)
    _tensor("counts", counts)
    if sums.dtype != torch.float32:
        raise TypeError(f"sums must be float32, got {_describe(sums)}")
    if tuple(sums.shape) != tuple(groups.shape):
        raise ValueError(f"sums must have the shape of groups {tuple(groups.shape)}, got {_describe(sums)}")
    if counts.dtype != torch.int64:
        raise TypeError(f"counts must be int64, got {_describe(counts)}")
    if tuple(counts.shape) != (groups.shape[0],):
        raise ValueError(f"counts must have shape ({groups.shape[0]},), got {_describe(counts)}")
    same_device(groups=groups, sums=sums, counts=counts)
    unit_interval("beta", beta)


REDUCTIONS = ("mean", "sum", "none")


def check_loss(
    p: torch.Tensor, groups: torch.Tensor, targets: torch.Tensor, temperature: float, reduction: str
) -> None:
    """Validates the loss inputs."""
    features("p", p)
    features("groups", groups)
    same_device(p=p, groups=groups, targets=_tensor("targets", targets))
    same_dim("p", p, "groups", groups)
    same_dtype("p", p, "groups", groups)
    if groups.shape[0] < 1:
        raise ValueError(f"groups must hold at least one group (K >= 1), got {_describe(groups)}")
    if targets.dim() not in (1, 2):
        raise ValueError(f"targets must have shape [N] or [T, N], got {_describe(targets)}")
    if targets.dim() == 2 and targets.shape[0] < 1:
        raise ValueError(f"targets must hold at least one target set (T >= 1), got {_describe(targets)}")
    expected = (p.shape[0],) if targets.dim() == 1 else (targets.shape[0], p.shape[0])
    group_index("targets", targets, expected, groups.shape[0])
    positive("temperature", temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_kmeans(x: torch.Tensor, num_groups: int, iters: int, init: torch.Tensor | None) -> None:
    features("x", x)
    num_groups_at_least_one("num_groups", num_groups)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    if init is None:
        if x.shape[0] < num_groups:
            raise ValueError(
                f"x must hold at least num_groups={num_groups} rows to draw the initial groups, "
                f"got {_describe(x)}"
            )
        return
    features("init", init)
    if tuple(init.shape) != (num_groups, x.shape[1]):
        raise ValueError(f"init must have shape ({num_groups}, {x.shape[1]}), got {_describe(init)}")
    same_device(x=x, init=init)
