"""The public ops of smog_kernels: validate, pick a backend, run.

Inputs are float32, bfloat16 or float16 feature matrices, expected L2-normalised by the caller;
arithmetic and accumulation are float32. Non-finite inputs are not checked (that would cost a pass
over the data): a NaN or inf in a row propagates into that row's score and loss, and the group it
is assigned to is unspecified. Training code checks the loss instead.
"""
from __future__ import annotations

import torch

from smog_kernels import _validate as check
from smog_kernels.backend import AUTOGRAD_LOSS, Backend
from smog_kernels.fused_loss import FusedGroupLoss
from smog_kernels.kmeans import lloyd
from smog_kernels.registry import resolve


def assign(x: torch.Tensor, groups: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D], groups [K, D] -> (index int64 [N], score float32 [N]): argmax_k <x_n, g_k>.

    Exact ties go to the smallest k.
    """
    check.check_assign(x, groups)
    return resolve(backend, x, groups.shape[0], "assign").assign(x, groups)


def group_stats(
    x: torch.Tensor, index: torch.Tensor, num_groups: int, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D], index int64 [N] in [0, K) -> (sums float32 [K, D], counts int64 [K])."""
    check.check_group_stats(x, index, num_groups)
    return resolve(backend, x).group_stats(x, index, num_groups)


def momentum_update(
    groups: torch.Tensor,
    sums: torch.Tensor,
    counts: torch.Tensor,
    beta: float,
    backend: str = "auto",
) -> torch.Tensor:
    """Rows with count > 0: normalize(beta * g + (1 - beta) * sum / count); others unchanged.

    groups [K, D], sums float32 [K, D], counts int64 [K]; returns [K, D] in groups' dtype.
    """
    check.check_momentum_update(groups, sums, counts, beta)
    return resolve(backend, groups).momentum_update(groups, sums, counts, float(beta))


def group_contrastive_loss(
    p: torch.Tensor,
    groups: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    reduction: str = "mean",
    grad_groups: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax cross-entropy of p @ groups.T / temperature against each target set.

    p [N, D], groups [K, D], targets int64 [N] or [T, N]. reduction "mean" (over T and N), "sum"
    or "none" (float32, targets' shape). Gradients flow to p, and to groups if grad_groups.
    """
    check.check_loss(p, groups, targets, temperature, reduction)
    wants_grad = torch.is_grad_enabled() and (p.requires_grad or (grad_groups and groups.requires_grad))
    chosen = resolve(backend, p, groups.shape[0], "loss_fwdbwd" if wants_grad else "loss_fwd")
    return run_loss(chosen, p, groups, targets, temperature, reduction, grad_groups)


def run_loss(
    backend: Backend,
    p: torch.Tensor,
    groups: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    reduction: str,
    grad_groups: bool,
) -> torch.Tensor:
    """group_contrastive_loss on validated arguments with an already chosen backend (its forward
    and backward then run on the same backend: the backward reuses the forward's outputs)."""
    if AUTOGRAD_LOSS in backend.capabilities:
        return backend.group_contrastive_loss(p, groups, targets, temperature, reduction, grad_groups)
    if not grad_groups:
        groups = groups.detach()
    return FusedGroupLoss.apply(p, groups, targets, float(temperature), reduction, grad_groups, backend)


def spherical_kmeans(
    x: torch.Tensor,
    num_groups: int,
    iters: int = 10,
    seed: int = 0,
    init: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means on the unit sphere (inner-product assignment, normalised means), `iters` rounds.

    x [N, D]; init [K, D] or None for K distinct rows of x drawn with `seed`. Returns
    (groups [K, D] in x's dtype, index int64 [N] of the rows under those groups). An empty
    group keeps its previous row.
    """
    check.check_kmeans(x, num_groups, iters, init)
    chosen = resolve(backend, x, num_groups, "assign")  # assignment is most of a k-means round
    return lloyd(chosen, x, num_groups, iters, seed, init)
