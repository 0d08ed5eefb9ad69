"""Gradient accumulation (train.accumulate = A, the authors' multi_forward) on one process.

BatchNorm runs on its running statistics (eval mode) in these tests, so that every z and p is a function
of its own sample only and a sub-batch's rows are exactly the rows the same samples get in a larger batch.
1. One step of A sub-batches moves the groups as one step on the whole batch does (same G', same counts,
   same bank rows): the statistics of all sub-batches, under the groups the cycle started from.
2. Its gradient is that of the cycle written out with smog_kernels.reference: targets and assignments
   under G for every sub-batch, sub-batches before the last scored against G, the last against G', the
   mean of the A sub-batch losses.
3. A global batch that does not split into A sub-batches per process is refused naming both keys.
4. method.backend and method.step_dtype reach every op of the cycle.
(The cycle itself, its reduction across processes and its equality with grouping_step for one sub-batch:
tests/test_grouping.py.)
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from smog.config import ConfigError, load_config
from smog.loop import Trainer
from smog.schedules import group_momentum
from smog_kernels import reference
from tests.training import first_batch, make_trainer, ready

BATCH, A = 64, 4
BASE = [f"train.batch_size={BATCH}", "data.small_crops=1", "eval.knn_every=0", "method.beta_start=0.5",
        "method.beta_end=0.5", "data.workers=0"]


def frozen_trainer(tmp_path, accumulate: int, *overrides: str) -> Trainer:
    """A trainer with BatchNorm on running statistics, bank filled and epoch 0's groups clustered."""
    trainer = make_trainer(tmp_path, *BASE, f"train.accumulate={accumulate}", *overrides)
    for module in trainer.method.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    return ready(trainer)


def recorded_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Filled with the online network's gradients when the optimiser steps."""
    grads: dict[str, torch.Tensor] = {}
    step = trainer.optimizer.step

    def spy(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in trainer.method.online.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = spy
    return grads


def test_a_cycle_of_sub_batches_moves_the_groups_as_one_batch_a_times_larger(tmp_path):
    whole, split = frozen_trainer(tmp_path / "whole", 1), frozen_trainer(tmp_path / "split", A)
    assert split.sub_batch * A == whole.batch_size == BATCH
    groups = {name: t.method.grouping.groups for name, t in (("whole", whole), ("split", split))}
    torch.testing.assert_close(groups["split"], groups["whole"], rtol=0, atol=0)  # the same start
    start = groups["whole"].clone()
    batch = first_batch(whole)
    assert torch.equal(first_batch(split)["index"], batch["index"])
    whole.step(batch)
    split.step(batch)
    assert float((groups["whole"] - start).abs().max()) > 1e-2  # the step moved the groups
    torch.testing.assert_close(groups["split"], groups["whole"], rtol=0, atol=1e-6)
    counts = {name: t.method.counts for name, t in (("whole", whole), ("split", split))}
    assert torch.equal(counts["split"], counts["whole"]) and int(counts["split"][0].sum()) == BATCH
    banks = {name: t.method.bank for name, t in (("whole", whole), ("split", split))}
    assert torch.equal(banks["split"].index, banks["whole"].index)
    assert banks["split"].position == banks["whole"].position == BATCH
    torch.testing.assert_close(banks["split"].bank, banks["whole"].bank, rtol=0, atol=1e-6)


def hand_cycle(model, batch: dict, cfg, beta: float) -> torch.Tensor:
    """The accumulated loss of one cycle (step 0: no view swap) from reference ops: sum over the A
    sub-batches of their mean loss, divided by A."""
    groups = model.grouping.groups.clone()
    heads, k = groups.shape[:2]
    sums, counts = torch.zeros(heads, k, groups.shape[2]), torch.zeros(heads, k, dtype=torch.int64)
    parts = []
    for i in range(A):
        cut = slice(i * BATCH // A, (i + 1) * BATCH // A)
        q, kc = [c[cut] for c in batch["q"]], [batch["k"][t][cut] for t in cfg.method.target_crops]
        h_q = [model.online.projector(model.online.backbone(x)) for x in q]
        z_q = [F.normalize(h, dim=1) for h in h_q]
        p_q = [F.normalize(model.online.predictor(h), dim=1) for h in h_q]
        with torch.no_grad():
            z_k = [F.normalize(model.momentum.projector(model.momentum.backbone(x)), dim=1) for x in kc]
        targets = []
        for h in range(heads):
            targets.append([reference.assign(z, groups[h])[0] for z in z_k])
            index, _ = reference.assign(z_q[h % 2].detach(), groups[h])
            s, c = reference.group_stats(z_q[h % 2].detach(), index, k)
            sums[h] += s
            counts[h] += c
        parts.append((p_q, targets))
    updated = torch.stack([reference.momentum_update(groups[h], sums[h], counts[h], beta) for h in range(heads)])
    total = 0.0
    for i, (p_q, targets) in enumerate(parts):
        scored = updated if i == A - 1 else groups
        losses = [F.cross_entropy(p @ scored[h].T / cfg.method.temperature, t)
                  for h in range(heads) for t in targets[h] for p in p_q]
        total = total + torch.stack(losses).mean()
    return total / A


def test_the_cycle_gradient_is_the_mean_of_the_sub_batch_losses_against_g_then_g_prime(tmp_path):
    trainer = frozen_trainer(tmp_path, A)
    before = copy.deepcopy(trainer.method)
    batch = first_batch(trainer)
    beta = group_momentum(trainer.cfg.method, 0, trainer.progress.total_steps)
    hand_cycle(before, batch, trainer.cfg, beta).backward()
    grads = recorded_grads(trainer)
    trainer.step(batch)
    expected = {n: p.grad for n, p in before.online.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys() and len(grads) > 0
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_a_cycle_runs_every_op_on_the_configured_backend_and_step_dtype(tmp_path, monkeypatch):
    """method.backend and method.step_dtype reach every op of the cycle: assignments, statistics and loss
    on bfloat16 rows and groups rounded to bfloat16; the momentum update on the float32 groups."""
    trainer = frozen_trainer(tmp_path, A, "method.backend=reference", "method.step_dtype=bfloat16")
    seen = []
    for name in ("assign", "group_stats", "momentum_update", "group_contrastive_loss"):
        def spy(a, b, *args, _name=name, _op=getattr(reference.REFERENCE, name), **kwargs):
            seen.append((_name, a.dtype, b.dtype if _name != "group_stats" else None))
            return _op(a, b, *args, **kwargs)
        monkeypatch.setattr(reference.REFERENCE, name, spy)
    trainer.step(first_batch(trainer))
    bf16, f32 = torch.bfloat16, torch.float32
    heads = trainer.cfg.method.heads
    calls = {name: sum(entry[0] == name for entry in seen) for name in
             ("assign", "group_stats", "momentum_update", "group_contrastive_loss")}
    assert calls == {"assign": A * heads, "group_stats": A * heads, "momentum_update": heads,
                     "group_contrastive_loss": A * heads}
    for name, first, second in seen:
        want = (f32, f32) if name == "momentum_update" else (bf16, None if name == "group_stats" else bf16)
        assert (first, second) == want, name


@pytest.mark.parametrize("overrides, words", [
    (["train.batch_size=60", "train.accumulate=8"], ["train.batch_size=60", "train.accumulate=8", "multiple of 8"]),
    (["train.accumulate=2", "method.grad_into_groups=true"], ["train.accumulate=2", "method.grad_into_groups"]),
])
def test_a_batch_that_does_not_split_into_the_sub_batches_is_refused(tmp_path, overrides, words):
    with pytest.raises(ConfigError) as error:
        make_trainer(tmp_path, *overrides)
    for word in words:
        assert word in str(error.value)


def test_accumulate_must_be_positive():
    with pytest.raises(ConfigError, match="train.accumulate must be positive"):
        load_config("digits", ["train.accumulate=0"])
