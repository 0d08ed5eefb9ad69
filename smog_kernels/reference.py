"""The "reference" backend: plain-PyTorch versions of every op of smog_kernels.backend.Backend, the
specification in code.

Vectorised (matrix products, index_add_), no loop over groups, and short enough to be
obviously right. They materialise the N x K score matrix, which is what the fused backends avoid.
Arithmetic is float32 for float32/16-bit inputs (float64 stays float64, for gradcheck). The public functions in `smog_kernels` validate
their arguments before calling these.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from smog_kernels.backend import AUTOGRAD_LOSS
from smog_kernels.kmeans import lloyd


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32 for 16-bit inputs; float64 stays float64 (so gradcheck can run on the reference)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def assign(x: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D], groups [K, D] -> (index int64 [N], score float32 [N]) of argmax_k <x_n, g_k>.

    Exact ties go to the smallest k (torch.max returns the first maximal index).
    """
    scores = _wide(x) @ _wide(groups).T
    score, index = scores.max(dim=1)
    return index, score


def group_stats(
    x: torch.Tensor, index: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D], index int64 [N] -> (sums float32 [K, D], counts int64 [K]).

    (Counts by index_add_, not bincount: on a GPU bincount reads the largest index back to the host,
    which a CUDA-graph capture of the step cannot do.)"""
    sums = torch.zeros(num_groups, x.shape[1], dtype=_wide(x).dtype, device=x.device)
    sums.index_add_(0, index, _wide(x))
    counts = torch.zeros(num_groups, dtype=torch.int64, device=x.device).index_add_(0, index, torch.ones_like(index))
    return sums, counts


def momentum_update(
    groups: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, beta: float
) -> torch.Tensor:
    """Rows with count > 0 become normalize(beta * c + (1 - beta) * sum / count); others stay."""
    c = _wide(groups)
    mean = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
    moved = F.normalize(beta * c + (1.0 - beta) * mean, dim=1)
    return torch.where((counts > 0).unsqueeze(1), moved, c).to(groups.dtype)


def group_contrastive_loss(
    p: torch.Tensor,
    groups: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    reduction: str = "mean",
    grad_groups: bool = False,
) -> torch.Tensor:
    """Softmax cross-entropy of p @ groups.T / temperature against targets [N] or [T, N].

    Every target set is scored against the same logits. reduction "mean" averages over T and N,
    "sum" adds them, "none" returns float32 [N] for targets [N] and [T, N] for targets [T, N].
    Without grad_groups no gradient flows into the groups.
    """
    if not grad_groups:
        groups = groups.detach()
    log_prob = F.log_softmax(_wide(p) @ _wide(groups).T / temperature, dim=1)  # [N, K]
    targets_2d = targets.unsqueeze(0) if targets.dim() == 1 else targets
    per_target = -log_prob.gather(1, targets_2d.T).T  # [T, N]
    return reduce_per_target(per_target, reduction, targets.shape)


def loss_forward(
    p: torch.Tensor, groups: torch.Tensor, targets: torch.Tensor, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """targets [T, N] -> (lse [N], target_logits [T, N], attention [N, D]) of logits <p, g> * inv_temperature;
    attention[n] = sum_k softmax_nk g_k."""
    logits = _wide(p) @ _wide(groups).T * inv_temperature  # [N, K]
    return logits.logsumexp(1), logits.gather(1, targets.T).T, logits.softmax(1) @ _wide(groups)


def loss_group_grad(
    p: torch.Tensor, groups: torch.Tensor, lse: torch.Tensor, row_weight: torch.Tensor, inv_temperature: float
) -> torch.Tensor:
    """[K, D] = inv_temperature * sum_n row_weight[n] softmax_nk p_n, softmax_nk = exp(logit_nk - lse_n)."""
    softmax = (_wide(p) @ _wide(groups).T * inv_temperature - lse.unsqueeze(1)).exp()  # [N, K]
    return inv_temperature * (softmax * row_weight.unsqueeze(1)).T @ _wide(p)


def reduce_per_target(per_target: torch.Tensor, reduction: str, target_shape: torch.Size) -> torch.Tensor:
    """per_target float32 [T, N] -> mean, sum, or the targets' shape for reduction "none"."""
    if reduction == "mean":
        return per_target.mean()
    if reduction == "sum":
        return per_target.sum()
    return per_target.reshape(target_shape)


def spherical_kmeans(
    x: torch.Tensor,
    num_groups: int,
    iters: int = 10,
    seed: int = 0,
    init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means on the unit sphere: E-step = assign, M-step = normalised group mean, `iters` rounds.

    init [K, D] or None for K distinct rows of x drawn with `seed`. Returns (groups [K, D] in
    x's dtype, index int64 [N]); index is the assignment under the returned groups (a final
    E-step after the last update). An empty group keeps its previous row.
    """
    return lloyd(REFERENCE, x, num_groups, iters, seed, init)


class Reference:
    """The module's functions as a Backend object; the loss runs under autograd (AUTOGRAD_LOSS)."""

    name = "reference"
    capabilities = frozenset({AUTOGRAD_LOSS})
    assign = staticmethod(assign)
    group_stats = staticmethod(group_stats)
    momentum_update = staticmethod(momentum_update)
    loss_forward = staticmethod(loss_forward)
    loss_group_grad = staticmethod(loss_group_grad)
    group_contrastive_loss = staticmethod(group_contrastive_loss)

    @staticmethod
    def available() -> bool:
        return True

    @staticmethod
    def supports(device: torch.device) -> bool:
        return True


REFERENCE = Reference()
