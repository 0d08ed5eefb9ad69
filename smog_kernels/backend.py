"""What a backend is: the ops every backend implements, and the optional ones it may declare.

A backend is an object satisfying `Backend`. Its ops are called with validated arguments (see
smog_kernels.api): features float32/bfloat16/float16 [N, D], groups [K, D] in the rows' dtype,
targets always [T, N]. Optional ops are declared by name in `capabilities`; callers test the
declaration, never the attribute, so a backend states in one place what it offers.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

ASSIGN_AND_STATS = "assign_and_stats"  # `FusedFirstPass.assign_and_stats`: assignment + statistics in one pass
AUTOGRAD_LOSS = "autograd_loss"  # `AutogradLoss.group_contrastive_loss`: the whole loss as autograd-aware torch code
CAPABILITIES = frozenset({ASSIGN_AND_STATS, AUTOGRAD_LOSS})


@runtime_checkable
class Backend(Protocol):
    name: str  # what users pass as backend=...
    capabilities: frozenset[str]  # a subset of CAPABILITIES

    def available(self) -> bool:
        """Whether this install can run the backend at all (fixed for the process's life)."""

    def supports(self, device: torch.device) -> bool:
        """Whether it runs on tensors on `device`."""

    def assign(self, x: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D], groups [K, D] -> (index int64 [N], score float32 [N]) of argmax_k <x_n, g_k>;
        exact ties go to the smallest k."""

    def group_stats(self, x: torch.Tensor, index: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D], index int64 [N] -> (sums float32 [K, D], counts int64 [K])."""

    def momentum_update(self, groups: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor,
                        beta: float) -> torch.Tensor:
        """Rows with count > 0 -> normalize(beta g + (1 - beta) sum / count); others unchanged; groups' dtype."""

    def loss_forward(self, p: torch.Tensor, groups: torch.Tensor, targets: torch.Tensor,
                     inv_temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (lse float32 [N], target_logits float32 [T, N], attention float32 [N, D]) of the logits
        <p_n, g_k> * inv_temperature, where attention[n] = sum_k softmax_k g_k."""

    def loss_group_grad(self, p: torch.Tensor, groups: torch.Tensor, lse: torch.Tensor, row_weight: torch.Tensor,
                        inv_temperature: float) -> torch.Tensor:
        """-> float32 [K, D] = inv_temperature * sum_n row_weight[n] softmax_nk p_n."""


@runtime_checkable
class FusedFirstPass(Protocol):
    """Capability ASSIGN_AND_STATS."""

    def assign_and_stats(self, x: torch.Tensor, groups: torch.Tensor,
                         stats_from: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(index, score) of every row of x and (sums, counts) of the rows x[stats_from:], in one pass."""


@runtime_checkable
class AutogradLoss(Protocol):
    """Capability AUTOGRAD_LOSS: the loss differentiated by autograd instead of smog_kernels.fused_loss."""

    def group_contrastive_loss(self, p: torch.Tensor, groups: torch.Tensor, targets: torch.Tensor, temperature: float,
                               reduction: str, grad_groups: bool) -> torch.Tensor:
        """As smog_kernels.group_contrastive_loss."""
