"""Crop roles: which crop set is q and which is k at each step (method.swap), the colour recipe each
small crop was made with (q: blur p=1.0, no solarisation; k: blur p=0.1, solarisation p=0.2), on the
device path and the loader path, and the momentum network's inputs (method.target_crops, momentum_small)."""
from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from smog.augment.on_device import BatchMultiCrop
from smog.config import load_config
from smog.loop import Trainer
from smog.augment.per_image import MultiCrop
from tests.training import ready

Q_RECIPE, K_RECIPE = (1.0, 0.0), (0.1, 0.2)  # (blur p, solarise p) of the q and k sets, by hand from the spec


def make_trainer(tmp_path, *overrides: str) -> Trainer:
    cfg = load_config("digits", [f"train.out_dir={tmp_path}", "data.train_subset=128", "train.batch_size=32", "data.augment_on=device",
                                 "data.blur=true", *overrides])
    return Trainer(cfg)


def recorded_roles(trainer: Trainer, monkeypatch, steps: int) -> list[dict]:
    """Per step: the (blur p, solarise p, size) recipe of every q and k crop the model's step received, and
    the crops the momentum network forwarded (as indices into k)."""
    made: dict[int, tuple] = {}
    real_view = BatchMultiCrop.view

    def view(self, x, recipe, g):
        out = real_view(self, x, recipe, g)
        made[id(out)] = (recipe.blur_p, recipe.solarize_p, recipe.size)
        return out

    seen: list[dict] = []
    real_forward_crops = type(trainer.method).forward_crops
    real_momentum = trainer.method.momentum.forward

    def forward_crops(method, online, q, k):
        record = {"q": [made[id(c)] for c in q], "k": [made[id(c)] for c in k], "momentum": []}
        ids = [id(c) for c in k]

        def momentum(crops):
            record["momentum"] = [ids.index(id(c)) for c in crops]
            return real_momentum(crops)

        monkeypatch.setattr(method.momentum, "forward", momentum)
        seen.append(record)
        return real_forward_crops(method, online, q, k)

    monkeypatch.setattr(BatchMultiCrop, "view", view)
    monkeypatch.setattr(type(trainer.method), "forward_crops", forward_crops)
    ready(trainer)
    batches = iter(trainer.data.batches(0, trainer.batch_size))
    for _ in range(steps):
        made.clear()
        trainer.step(next(batches))
    return seen


def test_whole_sets_swap_on_odd_steps(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path)
    large, small = trainer.cfg.data.large_size, trainer.cfg.data.small_size
    for step, record in enumerate(recorded_roles(trainer, monkeypatch, 4)):
        online, target = (Q_RECIPE, K_RECIPE) if step % 2 == 0 else (K_RECIPE, Q_RECIPE)
        assert record["q"] == [(*online, large)] * 2 + [(*online, small)] * 2, step
        assert record["k"] == [(*target, large)] * 2 + [(*target, small)] * 2, step
        assert record["momentum"] == [0, 1, 2, 3], step  # target crops, then the small k crops


def test_swap_large_keeps_the_small_crops_on_the_q_recipe(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, "method.swap=large")
    large, small = trainer.cfg.data.large_size, trainer.cfg.data.small_size
    for step, record in enumerate(recorded_roles(trainer, monkeypatch, 2)):
        online, target = (Q_RECIPE, K_RECIPE) if step % 2 == 0 else (K_RECIPE, Q_RECIPE)
        assert record["q"] == [(*online, large)] * 2 + [(*Q_RECIPE, small)] * 2, step
        assert record["k"] == [(*target, large)] * 2 + [(*K_RECIPE, small)] * 2, step


@pytest.mark.parametrize("overrides, expected", [
    (("method.target_crops=[1]",), [1, 2, 3]),
    (("method.target_crops=[1, 0]", "method.momentum_small=false"), [1, 0]),
    (("model.bn_crops=per_resolution",), [0, 1]),  # per resolution the small crops could not shape the targets
])
def test_momentum_network_inputs(tmp_path, monkeypatch, overrides, expected):
    trainer = make_trainer(tmp_path, *overrides)
    assert [r["momentum"] for r in recorded_roles(trainer, monkeypatch, 1)] == [expected]


def _probabilities(view: v2.Compose) -> dict[str, float]:
    """{"blur": p, "solarize": p} of one loader-path crop pipeline (0 where the step is absent)."""
    found = {"blur": 0.0, "solarize": 0.0}
    for step in view.transforms:
        if isinstance(step, v2.RandomSolarize):
            found["solarize"] = step.p
        if isinstance(step, v2.RandomApply) and isinstance(step.transforms[0], v2.GaussianBlur):
            found["blur"] = step.p
    return found


def test_loader_path_makes_small_crops_for_both_sets():
    cfg = load_config("digits", ["data.blur=true"]).data
    crops = MultiCrop(cfg, 1, (0.3,), (0.4,))
    assert _probabilities(crops.q_small) == {"blur": Q_RECIPE[0], "solarize": Q_RECIPE[1]}
    assert _probabilities(crops.k_small) == {"blur": K_RECIPE[0], "solarize": K_RECIPE[1]}
    out = crops(torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8))
    sizes = [cfg.large_size] * 2 + [cfg.small_size] * cfg.small_crops
    assert [c.shape[-1] for c in out["q"]] == sizes and [c.shape[-1] for c in out["k"]] == sizes
