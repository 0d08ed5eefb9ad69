"""Bad arguments raise ValueError/TypeError naming the argument (and its shape) before any kernel runs.

Run against "reference" and "auto" (the fastest backend present): the checks sit in front of both.
"""
from __future__ import annotations

import pytest
import torch

import smog_kernels as sk

BACKENDS = ["reference", "auto"]


def rows(n, d, dtype=torch.float32):
    return torch.nn.functional.normalize(torch.randn(n, d), dim=1).to(dtype)


X, C = rows(6, 4), rows(3, 4)
IDX = torch.tensor([0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "args,error,words",
    [
        ((X[0], C), ValueError, ["x", "2 dimensions", "(4,)"]),
        ((X, C[0]), ValueError, ["groups", "2 dimensions"]),
        ((X, rows(3, 5)), ValueError, ["feature dimension", "(6, 4)", "(3, 5)"]),
        ((X.double(), C), TypeError, ["x", "float64"]),
        ((X.long(), C), TypeError, ["x", "int64"]),
        ((X, C.half()), TypeError, ["x", "groups", "same dtype"]),
        ((X, C[:0]), ValueError, ["groups", "K >= 1", "(0, 4)"]),
        (("not a tensor", C), TypeError, ["x", "torch.Tensor"]),
    ],
)
def test_assign_rejects(backend, args, error, words):
    with pytest.raises(error) as info:
        sk.assign(*args, backend=backend)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "args,error,words",
    [
        ((X, IDX, 0), ValueError, ["num_groups", ">= 1"]),
        ((X, IDX, 2), ValueError, ["index", "[0, 2)", "[0, 2]"]),
        ((X, IDX - 1, 3), ValueError, ["index", "[-1, 1]"]),
        ((X, IDX[:5], 3), ValueError, ["index", "(6,)", "(5,)"]),
        ((X, IDX.int(), 3), TypeError, ["index", "int64", "int32"]),
        ((X, IDX, 3.0), TypeError, ["num_groups", "int"]),
    ],
)
def test_group_stats_rejects(backend, args, error, words):
    with pytest.raises(error) as info:
        sk.group_stats(*args, backend=backend)
    for word in words:
        assert word in str(info.value)


SUMS, COUNTS = torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "args,error,words",
    [
        ((C, SUMS, COUNTS, 1.5), ValueError, ["beta", "[0, 1]", "1.5"]),
        ((C, SUMS, COUNTS, -0.1), ValueError, ["beta", "[0, 1]"]),
        ((C, SUMS[:2], COUNTS, 0.9), ValueError, ["sums", "(3, 4)", "(2, 4)"]),
        ((C, SUMS.half(), COUNTS, 0.9), TypeError, ["sums", "float32"]),
        ((C, SUMS, COUNTS[:2], 0.9), ValueError, ["counts", "(3,)"]),
        ((C, SUMS, COUNTS.float(), 0.9), TypeError, ["counts", "int64"]),
    ],
)
def test_momentum_update_rejects(backend, args, error, words):
    with pytest.raises(error) as info:
        sk.momentum_update(*args, backend=backend)
    for word in words:
        assert word in str(info.value)


TARGETS = torch.tensor([0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "args,kwargs,error,words",
    [
        ((X, C, TARGETS, 0.0), {}, ValueError, ["temperature", "> 0"]),
        ((X, C, TARGETS, -1.0), {}, ValueError, ["temperature"]),
        ((X, C, TARGETS + 1, 0.1), {}, ValueError, ["targets", "[0, 3)", "[1, 3]"]),
        ((X, C, TARGETS[:4], 0.1), {}, ValueError, ["targets", "(6,)", "(4,)"]),
        ((X, C, TARGETS.view(1, 1, 6), 0.1), {}, ValueError, ["targets", "[T, N]", "(1, 1, 6)"]),
        ((X, C, TARGETS.float(), 0.1), {}, TypeError, ["targets", "int64"]),
        ((X, rows(3, 5), TARGETS, 0.1), {}, ValueError, ["p", "groups", "feature dimension"]),
        ((X.double(), C, TARGETS, 0.1), {}, TypeError, ["p", "float64"]),
        ((X, C, TARGETS, 0.1), {"reduction": "max"}, ValueError, ["reduction", "'max'"]),
    ],
)
def test_loss_rejects(backend, args, kwargs, error, words):
    with pytest.raises(error) as info:
        sk.group_contrastive_loss(*args, backend=backend, **kwargs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "args,kwargs,error,words",
    [
        ((X, 0), {}, ValueError, ["num_groups", ">= 1"]),
        ((X, 7), {}, ValueError, ["num_groups=7", "(6, 4)"]),
        ((X, 3), {"iters": 0}, ValueError, ["iters", ">= 1"]),
        ((X, 3), {"init": rows(2, 4)}, ValueError, ["init", "(3, 4)", "(2, 4)"]),
        ((X.long(), 3), {}, TypeError, ["x", "int64"]),
    ],
)
def test_kmeans_rejects(backend, args, kwargs, error, words):
    with pytest.raises(error) as info:
        sk.spherical_kmeans(*args, backend=backend, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_unknown_or_unavailable_backend():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        sk.assign(X, C, backend="tpu")
    with pytest.raises(ValueError, match="'cuda'"):
        sk.assign(X, C, backend="cuda")  # CPU tensors: never runnable by the CUDA backend


def test_grouping_step_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="same N"):
        sk.grouping_step(C, rows(6, 4).view(2, 3, 4), X, rows(8, 4).view(2, 4, 4), 0.99, 0.1)


def test_grouping_step_dtype_rules():
    """The rows share one dtype; the groups have it too or are a float32 master copy."""
    t16, z16, p16 = rows(6, 4, torch.bfloat16).view(2, 3, 4), rows(3, 4, torch.bfloat16), rows(3, 4, torch.bfloat16)
    with pytest.raises(TypeError, match="target_rows.*update_rows.*same dtype"):
        sk.grouping_step(C, t16, rows(3, 4), p16.view(1, 3, 4), 0.99, 0.1)
    with pytest.raises(TypeError, match="groups.*float32 master"):
        sk.grouping_step(C.half(), t16, z16, p16.view(1, 3, 4), 0.99, 0.1)
    out = sk.grouping_step(C, t16, z16, p16.view(1, 3, 4), 0.99, 0.1)  # float32 groups, bfloat16 rows
    assert out.groups.dtype == torch.float32


T3, Z3, P3 = rows(6, 4).view(2, 3, 4), rows(3, 4), rows(6, 4).view(2, 3, 4)  # T=2, N=3, M=3, V=2, D=4


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "args,error,words",
    [
        ((C[0], T3, Z3, P3, 0.9, 0.1), ValueError, ["groups must have 2 dimensions", "(4,)"]),
        ((C, Z3, Z3, P3, 0.9, 0.1), ValueError, ["target_rows must have 3 dimensions", "(3, 4)"]),
        ((C, T3, T3, P3, 0.9, 0.1), ValueError, ["update_rows must have 2 dimensions", "(2, 3, 4)"]),
        ((C, T3, Z3, Z3, 0.9, 0.1), ValueError, ["predictions must have 3 dimensions", "(3, 4)"]),
        ((C.double(), T3, Z3, P3, 0.9, 0.1), TypeError, ["groups must be float32, bfloat16 or float16", "float64"]),
        ((_meta(C), T3, Z3, P3, 0.9, 0.1), ValueError,
         ["got groups on meta, target_rows on cpu, update_rows on cpu, predictions on cpu"]),
        ((C, T3, _meta(Z3), P3, 0.9, 0.1), ValueError, ["got groups on cpu, target_rows on cpu, update_rows on meta, predictions on cpu"]),
        ((C, rows(6, 5).view(2, 3, 5), Z3, P3, 0.9, 0.1), ValueError,
         ["groups and target_rows must have the same feature dimension D, got groups (3, 4) and target_rows (2, 3, 5)"]),
        ((C, T3, rows(3, 5), P3, 0.9, 0.1), ValueError, ["groups and update_rows must have the same feature dimension D, got groups (3, 4) and update_rows (3, 5)"]),
        ((C, T3, Z3, rows(6, 5).view(2, 3, 5), 0.9, 0.1), ValueError,
         ["groups and predictions must have the same feature dimension D, got groups (3, 4) and predictions (2, 3, 5)"]),
        ((C, T3, Z3.half(), P3, 0.9, 0.1), TypeError,
         ["target_rows (torch.float32) and update_rows (torch.float16) must have the same dtype"]),
        ((C, T3, Z3, P3.half(), 0.9, 0.1), TypeError, ["target_rows (torch.float32) and predictions (torch.float16) must have the same dtype"]),
        ((C.half(), T3.bfloat16(), Z3.bfloat16(), P3.bfloat16(), 0.9, 0.1), TypeError,
         ["groups (torch.float16)", "rows' dtype (torch.bfloat16)", "float32"]),
        ((C[:0], T3, Z3, P3, 0.9, 0.1), ValueError, ["groups must hold at least one group (K >= 1), got shape (0, 4)"]),
        ((C, T3, Z3, P3[:, :2], 0.9, 0.1), ValueError, ["same N", "predictions (2, 2, 4)", "target_rows (2, 3, 4)"]),
        ((C, T3, Z3, P3, 1.5, 0.1), ValueError, ["beta must lie in [0, 1], got 1.5"]),
        ((C, T3, Z3, P3, -0.5, 0.1), ValueError, ["beta must lie in [0, 1], got -0.5"]),
        ((C, T3, Z3, P3, 0.9, 0.0), ValueError, ["temperature must be > 0, got 0.0"]),
    ],
)
def test_grouping_step_rejects(backend, args, error, words):
    with pytest.raises(error) as info:
        sk.grouping_step(*args, backend=backend)
    for word in words:
        assert word in str(info.value)
