"""The per-step schedules at their endpoints, warm-up boundary and midpoints, against values worked
out by hand from docs/method.md's formulas; and one training step applying them at literal rates."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from smog.config import MethodConfig, OptimConfig, load_config
from smog.schedules import ema_rate, group_momentum, learning_rate
from smog.loop import Trainer
from smog.method import swap_roles
from tests.training import first_batch, ready

R2 = math.sqrt(2.0) / 2.0  # cos(pi / 4)

# lr 1.0, warm-up from 0.2 over 2 epochs of 5 steps (10 steps), cosine to 0.1 at step 30
LR = OptimConfig(lr=1.0, warmup_epochs=2, warmup_start_lr=0.2, final_lr=0.1)


@pytest.mark.parametrize("step, expected", [
    (0, 0.2),  # warm-up start
    (5, 0.6),  # warm-up midpoint: 0.2 + 0.8 * 5 / 10
    (9, 0.92),  # last warm-up step
    (10, 1.0),  # warm-up boundary: the cosine starts at lr
    (15, 0.1 + 0.45 * (1 + R2)),  # a quarter of the cosine
    (20, 0.55),  # cosine midpoint: (lr + final_lr) / 2
    (30, 0.1),  # the end
    (45, 0.1),  # past the end: stays at final_lr
])
def test_learning_rate(step, expected):
    assert learning_rate(LR, step, steps_per_epoch=5, total_steps=30) == pytest.approx(expected, rel=1e-12)


def test_learning_rate_edge_cases():
    no_warmup = OptimConfig(lr=1.0, warmup_epochs=0, warmup_start_lr=0.2, final_lr=0.1)
    assert learning_rate(no_warmup, 0, 5, 30) == pytest.approx(1.0, rel=1e-12)  # no warm-up: starts at lr
    assert learning_rate(no_warmup, 15, 5, 30) == pytest.approx(0.55, rel=1e-12)
    assert learning_rate(LR, 11, 5, 11) == pytest.approx(0.1, rel=1e-12)  # one cosine step: over at once
    half = OptimConfig(lr=1.0, warmup_epochs=0.5, warmup_start_lr=0.0, final_lr=0.0)  # 0.5 * 8 = 4 steps
    assert learning_rate(half, 2, 8, 100) == pytest.approx(0.5, rel=1e-12)


BETA = MethodConfig(beta_start=1.0, beta_end=0.9)


@pytest.mark.parametrize("step, total, expected", [
    (0, 11, 1.0),  # first step: beta_start
    (5, 11, 0.95),  # midpoint of steps 0..10
    (10, 11, 0.9),  # last step: beta_end
    (20, 11, 0.9),  # past the end: stays
    (1, 2, 0.9),  # two steps: the second is the last
    (0, 1, 1.0),  # one step: beta_start
])
def test_group_momentum(step, total, expected):
    assert group_momentum(BETA, step, total) == pytest.approx(expected, rel=1e-12)


EMA = MethodConfig(ema_start=0.9, ema_end=1.0)


@pytest.mark.parametrize("step, total, expected", [
    (0, 10, 0.9),  # ema_start
    (5, 10, 0.95),  # cosine midpoint
    (1, 4, 1.0 - 0.05 * (1 + R2)),  # a quarter: 1 - 0.1 * (cos(pi / 4) + 1) / 2
    (10, 10, 1.0),  # ema_end at total_steps
    (30, 10, 1.0),  # past the end: stays
    (1, 1, 1.0),  # one step
])
def test_ema_rate(step, total, expected):
    assert ema_rate(EMA, step, total) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("step, lr, beta, ema", [
    # 4 steps per epoch, 2 epochs (8 steps), warm-up over the first epoch from 0.1 to 0.5
    (2, 0.3, 1.0 - 0.1 * 2 / 7, 1.0 - 0.05 * (1 + R2)),
    (4, 0.5, 1.0 - 0.1 * 4 / 7, 0.95),
])
def test_training_step_applies_the_rates(tmp_path, step, lr, beta, ema):
    """Plain SGD (no momentum, no weight decay): every online weight moves by exactly -lr * its
    gradient, the groups are the step's output at beta, and the momentum network is the EMA at the
    literal rate of the new online weights."""
    cfg = load_config("digits", [
        f"train.out_dir={tmp_path}", "data.train_subset=256", "train.epochs=2",
        "optim.name=sgd", "optim.momentum=0.0", "optim.weight_decay=0.0", "optim.lr=0.5",
        "optim.warmup_epochs=1", "optim.warmup_start_lr=0.1", "optim.final_lr=0.0",
        "method.beta_start=1.0", "method.beta_end=0.9", "method.ema_start=0.9", "method.ema_end=1.0",
    ])
    trainer = ready(Trainer(cfg))
    assert (trainer.progress.steps_per_epoch, trainer.progress.total_steps) == (4, 8)
    trainer.progress.step = step
    batch = first_batch(trainer)
    model = copy.deepcopy(trainer.method)
    q, k = swap_roles(list(batch["q"]), list(batch["k"]), step, cfg.method.swap)
    z_k, z_q, predictions = model.forward_crops(model.online, q, k)
    model.grouping(z_k, z_q[model.update_crops], predictions, beta).backward()

    trainer.step(batch)

    torch.testing.assert_close(trainer.method.grouping.groups, model.grouping.groups, rtol=0, atol=1e-6)
    online = dict(trainer.method.online.named_parameters())
    for name, p in model.online.named_parameters():
        expected = p.detach() - lr * p.grad if p.grad is not None else p.detach()
        torch.testing.assert_close(online[name], expected, rtol=1e-6, atol=1e-7, msg=name)
    old = dict(model.momentum.named_parameters())
    for name, p in trainer.method.momentum.named_parameters():
        torch.testing.assert_close(p, ema * old[name] + (1 - ema) * online[name], rtol=1e-6, atol=1e-7, msg=name)

