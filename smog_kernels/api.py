"""The public ops of smog_kernels: validate, pick a backend, run.

Inputs are float32, bfloat16 or float16 feature matrices, expected L2-normalised by the caller;
arithmetic and accumulation are float32. Non-finite inputs are not checked (that would cost a pass
over the data): a NaN or inf in a row propagates into that row's score and loss, and the group it
is assigned to is unspecified. Training code checks the loss instead.
"""
from __future__ import annotations

from types import ModuleType

import torch

from smog_kernels import _validate as check
from smog_kernels._backends import resolve, resolve_for
from smog_kernels.fused_loss import FusedGroupLoss
from smog_kernels.kmeans import lloyd


def assign(
    x: torch.Tensor, centroids: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D], centroids [K, D] -> (index int64 [N], score float32 [N]): argmax_k <x_i, c_k>.

    Exact ties go to the smallest k.
    """
    check.check_assign(x, centroids)
    _, ops = resolve_for("assign", backend, x, centroids.shape[0])
    return ops.assign(x, centroids)


def group_stats(
    x: torch.Tensor, index: torch.Tensor, num_groups: int, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D], index int64 [N] in [0, K) -> (sums float32 [K, D], counts int64 [K])."""
    check.check_group_stats(x, index, num_groups)
    _, ops = resolve(backend, x.device)
    return ops.group_stats(x, index, num_groups)


def momentum_update(
    centroids: torch.Tensor,
    sums: torch.Tensor,
    counts: torch.Tensor,
    beta: float,
    backend: str = "auto",
) -> torch.Tensor:
    """Rows with count > 0: normalize(beta * c + (1 - beta) * sum / count); others unchanged.

    centroids [K, D], sums float32 [K, D], counts int64 [K]; returns [K, D] in centroids' dtype.
    """
    check.check_momentum_update(centroids, sums, counts, beta)
    _, ops = resolve(backend, centroids.device)
    return ops.momentum_update(centroids, sums, counts, float(beta))


def group_contrastive_loss(
    p: torch.Tensor,
    centroids: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    reduction: str = "mean",
    grad_centroids: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax cross-entropy of p @ centroids.T / temperature against each target set.

    p [N, D], centroids [K, D], targets int64 [N] or [T, N]. reduction "mean" (over T and N), "sum"
    or "none" (float32, targets' shape). Gradients flow to p, and to centroids if grad_centroids.
    """
    check.check_loss(p, centroids, targets, temperature, reduction)
    wants_grad = torch.is_grad_enabled() and (p.requires_grad or (grad_centroids and centroids.requires_grad))
    resolved = resolve_for("loss_fwdbwd" if wants_grad else "loss_fwd", backend, p, centroids.shape[0])
    return run_loss(resolved, p, centroids, targets, temperature, reduction, grad_centroids)


def run_loss(
    resolved: tuple[str, ModuleType],
    p: torch.Tensor,
    centroids: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    reduction: str,
    grad_centroids: bool,
) -> torch.Tensor:
    """group_contrastive_loss on validated arguments with an already resolved backend (its forward
    and backward then run on the same backend: the backward reuses the forward's outputs)."""
    name, ops = resolved
    if name == "reference":
        return ops.group_contrastive_loss(p, centroids, targets, temperature, reduction, grad_centroids)
    if not grad_centroids:
        centroids = centroids.detach()
    return FusedGroupLoss.apply(p, centroids, targets, float(temperature), reduction, grad_centroids, ops)


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
    (centroids [K, D] in x's dtype, index int64 [N] of the rows under those centroids). Empty
    groups keep their centroid.
    """
    check.check_kmeans(x, num_groups, iters, init)
    _, ops = resolve_for("assign", backend, x, num_groups)  # assignment is most of a k-means round
    return lloyd(ops, x, num_groups, iters, seed, init)
