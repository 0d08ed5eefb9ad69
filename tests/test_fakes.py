"""The one set of fake kernels (smog_kernels.fakes) gives every registered operator's real output
shapes and dtypes, for the compiled smog:: operators and the Triton smog_triton:: ones alike."""
from __future__ import annotations

import inspect

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from smog_kernels import fakes
from smog_kernels.backend import Backend
from tests.conftest import INTERPRETED, unit_rows

N, K, D, T = 37, 11, 16, 2


def _arguments(generator) -> dict:
    x, g = unit_rows(N, D, torch.float32, "cpu", generator), unit_rows(K, D, torch.float32, "cpu", generator)
    index = torch.randint(0, K, (N,), generator=generator)
    sums = torch.zeros(K, D).index_add_(0, index, x)
    counts = torch.bincount(index, minlength=K)
    targets = torch.randint(0, K, (T, N), generator=generator)
    lse = torch.logsumexp(x @ g.T * 10.0, dim=1)
    return {
        "assign": (x, g), "assign_and_stats": (x, g, 5), "group_stats": (x, index, K),
        "momentum_update": (g, sums, counts, 0.9), "loss_forward": (x, g, targets, 10.0),
        "loss_group_grad": (x, g, lse, torch.full((N,), 1.0 / N), 10.0),
    }


def _meta(out) -> list[tuple]:
    return [(tuple(t.shape), t.dtype) for t in (out if isinstance(out, tuple) else (out,))]


def _namespaces() -> list:
    interp = pytest.mark.skipif(not INTERPRETED, reason="the Triton operators run on CPU tensors only interpreted")
    return [pytest.param("smog", id="smog"), pytest.param("smog_triton", id="smog_triton", marks=[interp])]


def _register(namespace: str) -> None:
    if namespace == "smog":
        from smog_kernels import native  # noqa: F401  (registers smog::)
    else:
        from smog_kernels.triton import library  # noqa: F401  (registers smog_triton::)


@pytest.mark.parametrize("namespace", _namespaces())
def test_fakes_match_the_real_operators(namespace, generator):
    _register(namespace)
    arguments = _arguments(generator)
    checked = 0
    for op in fakes.FAKES:
        if not hasattr(getattr(torch.ops, namespace), op):
            continue
        operator = getattr(getattr(torch.ops, namespace), op)
        real = operator(*arguments[op])
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in arguments[op]]
            fake = operator(*fake_args)
        assert _meta(fake) == _meta(real), (namespace, op)
        checked += 1
    assert checked == (5 if namespace == "smog" else 6)


@pytest.mark.parametrize("namespace", _namespaces())
def test_operators_take_the_python_names(namespace):
    """Every registered operator's schema names its arguments as the fake (and the Backend protocol) does."""
    _register(namespace)
    checked = 0
    for op, fake in fakes.FAKES.items():
        if not hasattr(getattr(torch.ops, namespace), op):
            continue
        schema = getattr(getattr(torch.ops, namespace), op).default._schema
        names = list(inspect.signature(fake).parameters)
        assert [a.name for a in schema.arguments] == names, (namespace, op)
        if hasattr(Backend, op):
            assert list(inspect.signature(getattr(Backend, op)).parameters)[1:] == names, op
        checked += 1
    assert checked == (5 if namespace == "smog" else 6)
