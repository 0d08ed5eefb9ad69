"""Errors of a fused backend against the reference on fresh random inputs (behind `smog check`).

Relative errors are ||fused - reference|| / ||reference||, both sides computed from the same
low-precision inputs. `tolerance(op, dtype)` is the bound the test-suite and `smog check` hold every
backend to: per quantity and dtype, by the dtype the quantity is stored in.
"""
from __future__ import annotations

import torch

import smog_kernels as sk
from smog_kernels import reference as ref

# Outputs computed and stored in float32 (statistics, the loss, float32 groups) are held near float32
# accuracy whatever the input dtype; outputs stored in a 16-bit dtype (gradients, groups in the
# rows' dtype) to two units of that dtype's rounding (u = 2^-8 bfloat16, 2^-11 float16).
FLOAT32_TOL = 1e-5
REL_TOL = {torch.float32: FLOAT32_TOL, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}  # by output dtype
FLOAT32_OUTPUTS = frozenset({"group_stats", "loss", "step loss", "step f32 groups loss", "step f32 groups groups",
                             "graphed step loss"})
# an assignment that differs from the reference must score within this of the best score
SCORE_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _unit(n: int, d: int, dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1).to(device, dtype)


def measure(backend: str, device: str, dtype: torch.dtype, n: int, k: int, d: int, seed: int = 0) -> dict[str, float]:
    """Per-op error of `backend` on one random problem; every value must be <= tolerance(op, dtype).
    "assign score gap" is the largest amount by which an assigned group scores below the best group."""
    gen = torch.Generator().manual_seed(seed)
    x, c, p = _unit(n, d, dtype, device, gen), _unit(k, d, dtype, device, gen), _unit(n, d, dtype, device, gen)
    errors: dict[str, float] = {}

    index, _ = sk.assign(x, c, backend=backend)
    exact = x.double() @ c.double().T
    chosen = exact.gather(1, index.unsqueeze(1)).squeeze(1)
    errors["assign score gap"] = float((exact.max(1).values - chosen).max())

    sums, counts = sk.group_stats(x, index, k, backend=backend)
    ref_sums, ref_counts = ref.group_stats(x, index, k)
    errors["group_stats"] = max(rel_err(sums, ref_sums), float((counts != ref_counts).any()))
    errors["momentum_update"] = rel_err(sk.momentum_update(c, ref_sums, ref_counts, 0.99, backend=backend),
                                        ref.momentum_update(c, ref_sums, ref_counts, 0.99))

    targets = torch.randint(0, k, (2, n), generator=gen).to(device)
    results = []
    for fn in (lambda *a: sk.group_contrastive_loss(*a, backend=backend), ref.group_contrastive_loss):
        pp, cc = p.clone().requires_grad_(), c.clone().requires_grad_()
        loss = fn(pp, cc, targets, 0.1, "mean", True)
        loss.backward()
        results.append((loss.detach(), pp.grad, cc.grad))
    for name, got, want in zip(("loss", "dloss/dp", "dloss/dgroups"), *results):
        errors[name] = rel_err(got, want)

    init = _unit(min(k, n), d, dtype, device, gen)
    got_c, _ = sk.spherical_kmeans(x, init.shape[0], iters=3, init=init, backend=backend)
    want_c, _ = ref.spherical_kmeans(x, init.shape[0], iters=3, init=init)
    errors["spherical_kmeans"] = rel_err(got_c, want_c)
    errors.update(_step_errors(backend, device, dtype, n, k, d, gen))
    return errors


def _step_errors(backend: str, device: str, dtype: torch.dtype, n: int, k: int, d: int,
                 gen: torch.Generator) -> dict[str, float]:
    """One head's grouping step (what training runs) against the reference step built on the fused
    step's own assignments (16-bit near-ties may pick another group; "assign score gap" bounds those):
    loss, updated groups and dloss/dp. "step" keeps the groups in the rows' dtype; "step f32 groups"
    (16-bit rows) gives it a float32 master copy, as under mixed precision. On a GPU, "graphed step"
    compares the CUDA-graph replay (GraphedGroupingStep) with the eager step."""
    target_rows = _unit(2 * n, d, dtype, device, gen).view(2, n, d)
    update_rows = _unit(n, d, dtype, device, gen)
    predictions = _unit(n, d, dtype, device, gen).view(1, n, d)
    errors: dict[str, float] = {}

    def run(step_fn, groups):
        p = predictions.clone().requires_grad_()
        out = step_fn(groups, target_rows, update_rows, p)
        out.loss.backward()
        return out, p.grad

    def eager(groups, t, z, p):
        return sk.grouping_step(groups, t, z, p, 0.99, 0.1, backend=backend)

    variants = [("step", dtype)] + ([("step f32 groups", torch.float32)] if dtype != torch.float32 else [])
    for name, groups_dtype in variants:
        groups = _unit(k, d, groups_dtype, device, gen)
        out, grad = run(eager, groups)
        sums, counts = ref.group_stats(update_rows, out.index, k)
        updated = ref.momentum_update(groups, sums, counts, 0.99)
        p = predictions[0].clone().requires_grad_()
        want = ref.group_contrastive_loss(p, updated.to(dtype), out.targets, 0.1)
        want.backward()
        errors[f"{name} loss"] = rel_err(out.loss, want)
        errors[f"{name} groups"] = rel_err(out.groups, updated)
        errors[f"{name} dloss/dp"] = rel_err(grad, p.grad)
        if device == "cuda" and name == "step":
            graphed = sk.GraphedGroupingStep(0.1, backend=backend)
            replay, replay_grad = run(lambda g, t, z, q: graphed(g, t, z, q, 0.99), groups)
            errors["graphed step loss"] = rel_err(replay.loss, out.loss)
            errors["graphed step groups"] = rel_err(replay.groups, out.groups)
            errors["graphed step dloss/dp"] = rel_err(replay_grad, grad)
    return errors


def tolerance(op: str, dtype: torch.dtype) -> float:
    """The bound on `measure`'s error `op` for inputs of `dtype`."""
    if op == "assign score gap":
        return SCORE_TOL[dtype]
    bound = FLOAT32_TOL if op in FLOAT32_OUTPUTS else REL_TOL[dtype]
    if op == "spherical_kmeans":  # a near-tie assignment flip moves a group by more than rounding
        return max(bound, 1e-3)
    return bound


def within_tolerance(op: str, error: float, dtype: torch.dtype) -> bool:
    return error <= tolerance(op, dtype)
