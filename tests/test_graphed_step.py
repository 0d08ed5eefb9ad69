"""GraphedGroupingStep (CUDA-graph replay of grouping_step) against the eager step.

The replayed step must give the eager step's results over several calls with new inputs and a
changing beta (the graphs read beta from a device scalar), with one instance per head. On a machine
without a GPU only the behaviour that needs none runs: a device tensor beta in the eager step (what
the graphs use) equals the float, and CPU tensors get a clear error.
"""
from __future__ import annotations

import pytest
import torch

import smog_kernels as sk
from smog_kernels.graphed_step import GraphedGroupingStep
from smog_kernels.parity import REL_TOL, rel_err
from tests.conftest import require, unit_rows


def _inputs(k, n, d, dtype, device, generator, grad_groups):
    groups = unit_rows(k, d, dtype, device, generator)
    target_rows = unit_rows(2 * n, d, dtype, device, generator).view(2, n, d)
    update_rows = unit_rows(n, d, dtype, device, generator).requires_grad_(grad_groups)
    predictions = unit_rows(3 * n, d, dtype, device, generator).view(3, n, d).requires_grad_()
    return groups, target_rows, update_rows, predictions


@pytest.mark.parametrize("grad_groups", [False, True], ids=["detached", "grad-groups"])
def test_tensor_beta_equals_float_beta(grad_groups, generator):
    groups, target_rows, update_rows, predictions = _inputs(37, 19, 16, torch.float32, "cpu", generator, grad_groups)
    results = []
    for beta in (0.93, torch.tensor(0.93)):
        out = sk.grouping_step(groups, target_rows, update_rows, predictions, beta, 0.1, grad_groups, backend="cpu")
        out.loss.backward()
        results.append((out, predictions.grad, update_rows.grad))
        predictions.grad = update_rows.grad = None
    (a, a_dp, a_dz), (b, b_dp, b_dz) = results
    assert torch.equal(a.targets, b.targets) and torch.equal(a.index, b.index) and torch.equal(a.counts, b.counts)
    assert rel_err(b.groups, a.groups) <= 1e-6
    assert rel_err(b.loss, a.loss) <= 1e-6 and rel_err(b_dp, a_dp) <= 1e-6
    if grad_groups:
        assert rel_err(b_dz, a_dz) <= 1e-6


def test_cpu_tensors_are_refused(generator):
    step = GraphedGroupingStep(0.1)
    with pytest.raises(ValueError, match="CUDA"):
        step(*_inputs(5, 4, 8, torch.float32, "cpu", generator, False), beta=0.9)


def test_bad_arguments_are_named(generator):
    with pytest.raises(ValueError, match="temperature"):
        GraphedGroupingStep(0.0)
    with pytest.raises(ValueError, match="beta"):
        GraphedGroupingStep(0.1)(*_inputs(5, 4, 8, torch.float32, "cpu", generator, False), beta=1.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("grad_groups", [False, True], ids=["detached", "grad-groups"])
def test_replays_match_the_eager_step(backend, dtype, grad_groups, generator):
    """Two heads (two instances, both called before one backward), three steps with new inputs and betas."""
    require(backend)
    k, n, d = 300, 129, 64
    heads = [GraphedGroupingStep(0.1, grad_groups, backend) for _ in range(2)]
    groups = [unit_rows(k, d, dtype, "cuda", generator) for _ in heads]
    for beta in (1.0, 0.97, 0.9):
        _, target_rows, update_rows, predictions = _inputs(k, n, d, dtype, "cuda", generator, grad_groups)
        graphed = [step(g, target_rows, update_rows, predictions, beta) for step, g in zip(heads, groups)]
        torch.stack([out.loss for out in graphed]).mean().backward()
        got_dp, got_dz = predictions.grad, update_rows.grad
        predictions.grad = update_rows.grad = None
        eager = [sk.grouping_step(g, target_rows, update_rows, predictions, beta, 0.1, grad_groups, backend=backend)
                 for g in groups]
        torch.stack([out.loss for out in eager]).mean().backward()
        tol = max(REL_TOL[dtype], 1e-5)  # the statistics' float32 atomics add in a varying order
        for got, want in zip(graphed, eager):
            assert torch.equal(got.targets, want.targets) and torch.equal(got.index, want.index)
            assert torch.equal(got.counts, want.counts)
            assert rel_err(got.groups, want.groups) <= tol
            assert rel_err(got.loss, want.loss) <= tol
        assert rel_err(got_dp, predictions.grad) <= tol
        if grad_groups:
            assert rel_err(got_dz, update_rows.grad) <= tol
        else:
            assert got_dz is None
        predictions.grad = update_rows.grad = None
        groups = [out.groups.detach().clone() for out in graphed]  # the groups move on, as in training


def _trainer(tmp_path, *overrides):
    from smog.config import load_config
    from smog.loop import Trainer

    return Trainer(load_config("digits", [f"train.out_dir={tmp_path}", "data.train_subset=256", *overrides]))


def test_trainer_refuses_graphs_without_one_cuda_process(tmp_path):
    from smog.config import ConfigError

    with pytest.raises(ConfigError, match="method.cuda_graphs"):
        _trainer(tmp_path, "train.device=cpu", "method.cuda_graphs=true")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_steps_with_graphs_match_eager(tmp_path):
    """Two training iterations of the same seeded run, with and without method.cuda_graphs (one backend
    for both: "auto" may pick another one for the graph, and 16-bit near-ties could then differ)."""
    runs = []
    for graphs in (False, True):
        trainer = _trainer(tmp_path / str(graphs), "train.device=cuda", "method.backend=triton",
                           f"method.cuda_graphs={str(graphs).lower()}")
        batches = iter(trainer.data.batches(trainer.progress.epoch, trainer.batch_size))
        losses = [trainer.step(next(batches)) for _ in range(2)]
        runs.append((torch.tensor(losses), trainer.method.grouping.groups.detach().cpu().clone()))
    (eager_loss, eager_groups), (graph_loss, graph_groups) = runs
    assert rel_err(graph_loss, eager_loss) <= 1e-4
    assert rel_err(graph_groups, eager_groups) <= 1e-4
