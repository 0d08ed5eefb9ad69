"""What backend="auto" picks: fixed rules, refined on a GPU by a table tuned on that GPU.

RULES lists, per device type and dtype, the fused backends in order of preference; the first one
usable wins, the reference when none is. They follow the benchmark of docs/kernels.md ("auto").

`smog bench tune` times the candidates on the user's own GPU and writes a table under the cache
folder (`cache_dir()`), keyed by the device's name and a hash of the kernel sources. On a GPU, a
table is consulted only when both keys match this device and these kernels; it then picks, for an
op (a key below) and dtype, the candidate measured fastest at the recorded (N, K, D) nearest to the
call's. Tensors on the CPU go by RULES alone: no table is read.

Table format (JSON): {"format": 1, "device": str, "kernel_hash": str, "measured_utc": str,
"ops": {op: {dtype: [{"shape": [N, K, D], "order": [fastest first], "ms": {backend: ms}}]}}}, ops
"assign", "loss_fwd" (loss forward), "loss_fwdbwd" (forward + backward to p), "step" (grouping_step)
and "step_graph" (GraphedGroupingStep's replay).
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import math
import os
import re

import torch

FORMAT = 1
OPS = ("assign", "loss_fwd", "loss_fwdbwd", "step", "step_graph")
SIXTEEN_BIT = "16-bit"

# (device type, float32 or SIXTEEN_BIT) -> fused backends, preferred first
RULES = {
    ("cpu", "float32"): ("cpu",),
    ("cpu", SIXTEEN_BIT): ("cpu",),
    ("cuda", "float32"): ("cuda", "triton"),  # IEEE float32: the CUDA kernels' FMA tiles beat Triton's
    ("cuda", SIXTEEN_BIT): ("triton", "cuda"),  # tensor-core tiles
}

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def rule(device_type: str, dtype: torch.dtype) -> tuple[str, ...]:
    """The fixed preference order for tensors of this device type and dtype (empty for other devices)."""
    width = "float32" if dtype in (torch.float32, torch.float64) else SIXTEEN_BIT
    return RULES.get((device_type, width), ())


def cache_dir() -> str:
    """$SMOG_CACHE_DIR, else $XDG_CACHE_HOME/smog, else ~/.cache/smog."""
    explicit = os.environ.get("SMOG_CACHE_DIR")
    if explicit:
        return explicit
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "smog")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({os.uname().machine})"


def table_path(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return os.path.join(cache_dir(), f"auto_{slug}.json")


@functools.cache
def kernel_hash() -> str:
    """sha256 (first 16 hex digits) of what a timing depends on: this package's Python sources
    (launchers, Triton kernels, the step) and the compiled extension."""
    digest = hashlib.sha256()
    files = sorted(glob.glob(os.path.join(_PACKAGE, "**", "*.py"), recursive=True)
                   + glob.glob(os.path.join(_PACKAGE, "_C*")))
    for path in files:
        digest.update(os.path.relpath(path, _PACKAGE).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


@functools.cache
def tuned_table(name: str) -> dict | None:
    """The table `smog bench tune` wrote for the device called `name`, if it was measured on that
    device with these kernels; None otherwise."""
    try:
        with open(table_path(name)) as f:
            table = json.load(f)
    except (OSError, ValueError):
        return None
    if table.get("format") != FORMAT or table.get("device") != name or table.get("kernel_hash") != kernel_hash():
        return None
    return table


def fastest(table: dict, op: str, dtype: torch.dtype, shape: tuple[int, int, int],
            candidates: tuple[str, ...]) -> str | None:
    """The candidate measured fastest for `op` and `dtype` at the recorded (N, K, D) nearest to
    `shape` (sum of |log2| ratios), among entries where a candidate was measured; None if none was."""
    dtype_name = str(dtype).removeprefix("torch.")
    entries = [e for e in table["ops"].get(op, {}).get(dtype_name, []) if any(c in e["ms"] for c in candidates)]
    if not entries:
        return None
    nearest = min(entries, key=lambda e: sum(abs(math.log2(max(a, 1) / max(b, 1))) for a, b in zip(e["shape"], shape)))
    return next(name for name in nearest["order"] if name in candidates)


def choose(op: str | None, device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int] | None,
           candidates: tuple[str, ...]) -> str:
    """auto's pick among `candidates` (the usable backends of rule(), in its order): the tuned table's
    fastest on a GPU where one matches, else the first candidate, else "reference"."""
    if device.type == "cuda" and op is not None and shape is not None and candidates:
        table = tuned_table(device_name(device))
        if table is not None:
            measured = fastest(table, op, dtype, shape, candidates)
            if measured is not None:
                return measured
    return candidates[0] if candidates else "reference"
