"""Shared test setup: backends under test, their devices, and fresh random inputs.

Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter, which must be
switched on before triton is imported, hence here.
"""
from __future__ import annotations

import importlib.util
import os
import time
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from smog_kernels import available_backends  # noqa: E402

HAS_GPU = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None  # optional; smog_kernels.triton itself must import
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and not HAS_GPU


def fused_backends() -> list:
    if os.environ.get("SMOG_TEST_REFERENCE_AS_FUSED"):  # self-test of the grid: the reference must pass it
        return [pytest.param("reference", "cpu", "full", id="reference")]
    """(backend, device, size) for every fused backend; "small" = shapes the interpreter can afford.

    "cpu" is always listed: a missing extension is a failure, not a skip. GPU backends are listed
    with the gpu marker, skipped (with the reason shown) on a machine without one.
    """
    cases = [pytest.param("cpu", "cpu", "full", id="cpu")]
    gpu = pytest.mark.gpu
    no_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
    cases.append(pytest.param("cuda", "cuda", "full", id="cuda", marks=[gpu, no_gpu]))
    no_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
    if HAS_GPU:
        cases.append(pytest.param("triton", "cuda", "full", id="triton", marks=[gpu, no_triton]))
    else:
        interp = pytest.mark.skipif(not INTERPRETED, reason="needs a GPU or TRITON_INTERPRET=1")
        cases.append(pytest.param("triton", "cpu", "small", id="triton-interpreter", marks=[interp, no_triton]))
    return cases


def require(backend: str) -> None:
    """Fail (never skip) when a backend the machine should have is missing."""
    if backend not in available_backends():
        pytest.fail(f"backend {backend!r} is not available (available: {available_backends()}); "
                    "build the extension with `pip install --no-build-isolation -e .`")


def cpu_has(flag: str) -> bool:
    """Whether /proc/cpuinfo lists the instruction-set flag (False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


def unit_rows(n: int, d: int, dtype: torch.dtype, device: str, generator: torch.Generator,
              contiguous: bool = True) -> torch.Tensor:
    """n random unit vectors of dimension d; non-contiguous (a transposed view) when asked."""
    if contiguous:
        x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    else:
        x = torch.randn(d, n, generator=generator, dtype=torch.float64).T
    x = torch.nn.functional.normalize(x, dim=1)
    return x.to(device=device, dtype=dtype)


SESSION_SEED = int(os.environ.get("SMOG_TEST_SEED", time.time_ns() % (2**31)))


def pytest_report_header(config) -> str:
    return f"smog: random inputs seeded with SMOG_TEST_SEED={SESSION_SEED}; backends {available_backends()}"


@pytest.fixture
def generator(request) -> torch.Generator:
    """Fresh inputs every session (the seed is in the report header; SMOG_TEST_SEED replays it)."""
    return torch.Generator().manual_seed((SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31))
