"""The online network's crop batching: crops of one size go through the network together."""
from __future__ import annotations

import torch

from smog.config import load_config
from smog.loop import build_model


def test_online_net_runs_each_crop_size_together_with_an_odd_count():
    """Crops of one size go through the network as one batch, also for an odd number of small crops
    (2 large + 1 small): in eval mode (no batch statistics) each crop's output equals its own pass."""
    model = build_model(load_config("digits", [])).eval()
    gen = torch.Generator().manual_seed(0)
    crops = [torch.randn(3, 1, 8, 8, generator=gen), torch.randn(3, 1, 8, 8, generator=gen),
             torch.randn(3, 1, 4, 4, generator=gen)]
    with torch.no_grad():
        z, p = model.online(crops)
        alone = [model.online([c]) for c in crops]
    assert z.shape[0] == p.shape[0] == 3
    for v in range(3):
        torch.testing.assert_close(z[v], alone[v][0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p[v], alone[v][1][0], rtol=1e-5, atol=1e-6)


def test_step_moves_each_head_by_its_large_crop_at_beta_below_one(tmp_path):
    """At beta = 0.9 (beta_start = beta_end) the update rows matter: head h's groups move by the
    statistics of large q crop h mod 2, as the hand-written reference step of test_method says."""
    import copy

    from tests.test_method import hand_step
    from tests.training import first_batch, make_trainer, ready

    trainer = ready(make_trainer(tmp_path, "method.beta_start=0.9", "method.beta_end=0.9"))
    batch = first_batch(trainer)
    before = copy.deepcopy(trainer.method)
    expected_loss, expected_groups, _ = hand_step(before, batch, 0, trainer.cfg)
    loss = trainer.step(batch)
    assert not torch.allclose(expected_groups, before.grouping.groups)  # beta < 1: the groups moved
    torch.testing.assert_close(trainer.method.grouping.groups, expected_groups, rtol=1e-5, atol=1e-6)
    assert abs(loss - float(expected_loss.detach())) <= 1e-5 * abs(float(expected_loss.detach()))
