"""The grouping step replayed from CUDA graphs: two graph launches per step instead of ~30 kernels.

Eagerly, a fused step at training sizes is bound by the host (Python, dispatch and Triton launch
overhead per kernel), not by the GPU. Every kernel of `grouping_step` has a grid that depends on
shapes only and none synchronises with the host, so the step can be captured once per input
signature with torch.cuda.make_graphed_callables: the forward graph (assignment of the target and
update rows, statistics, momentum update, loss) and the backward graph (dL/dp, and dL/dz with
grad_groups). A call then copies its inputs into the captured buffers, sets beta (a device
scalar the graph reads, so a beta schedule needs no recapture) and replays.
"""
from __future__ import annotations

import torch

from smog_kernels import _validate as check
from smog_kernels.registry import resolve
from smog_kernels.step import GroupingStep, check_step, grouping_step


class GraphedGroupingStep:
    """`grouping_step(groups, target_rows, update_rows, predictions, beta, ...)` for one head on a
    CUDA GPU, from CUDA graphs captured on the first call with each input signature (shapes, dtype,
    device; a capture runs the step 3 times to warm up and takes a few hundred milliseconds).

    Results are the eager step's (same kernels, same order). Two rules follow from replaying fixed
    buffers: (1) the outputs and the tensors saved for backward live in the graphs' buffers until this
    object's next call, so use one instance per head and call backward (or copy what you keep, such as
    the updated groups) before calling the same instance again; (2) the statistics cannot be reduced
    across processes inside the graph, so there is no reduce_stats. Autocast is switched off inside
    (the fused kernels choose their own precision from the input dtype).
    """

    def __init__(self, temperature: float, grad_groups: bool = False, backend: str = "auto") -> None:
        check.positive("temperature", temperature)
        self.temperature = float(temperature)
        self.grad_groups = bool(grad_groups)
        self.backend = backend
        self._graphs: dict[tuple, tuple] = {}  # signature -> (graphed callable, its beta scalar)

    def __call__(self, groups: torch.Tensor, target_rows: torch.Tensor, update_rows: torch.Tensor,
                 predictions: torch.Tensor, beta: float) -> GroupingStep:
        beta = check.unit_interval("beta", beta)
        if not update_rows.requires_grad or not self.grad_groups:
            update_rows = update_rows.detach()  # no gradient flows into it: not an input of the backward graph
        inputs = (groups.detach(), target_rows.detach(), update_rows, predictions)
        key = tuple((t.shape, t.dtype, t.device, t.requires_grad) for t in inputs)
        if key not in self._graphs:
            self._graphs[key] = self._capture(inputs, beta)
        step, beta_scalar = self._graphs[key]
        beta_scalar.fill_(beta)
        with torch.autocast("cuda", enabled=False):
            return GroupingStep(*step(*inputs, beta_scalar))

    def _capture(self, inputs: tuple[torch.Tensor, ...], beta: float) -> tuple:
        check_step(*inputs, beta, self.temperature)
        if inputs[0].device.type != "cuda":
            raise ValueError(f"GraphedGroupingStep needs CUDA tensors, got groups on {inputs[0].device}; "
                             f"use smog_kernels.grouping_step elsewhere")
        # "auto": the backend tuned fastest as a graph (no host overhead), not the eager step's
        backend = resolve(self.backend, inputs[1], inputs[0].shape[0], "step_graph").name
        beta_scalar = torch.full((), beta, dtype=torch.float32, device=inputs[0].device)
        # capture on private copies, so that the warm-up steps leave no trace on the caller's tensors
        sample = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in inputs) + (beta_scalar,)

        def step(groups, target_rows, update_rows, predictions, beta_t):
            return tuple(grouping_step(groups, target_rows, update_rows, predictions, beta_t, self.temperature,
                                       self.grad_groups, backend=backend))

        with torch.autocast("cuda", enabled=False):
            graphed = torch.cuda.make_graphed_callables(step, sample)
        return graphed, beta_scalar
