"""One training iteration against a hand-written step built from smog_kernels.reference (docs/method.md order)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from smog.config import load_config
from smog.health import group_health
from smog.schedules import ema_rate, group_momentum
from smog_kernels import reference, step as step_module
from tests.training import first_batch, make_trainer, ready


def list_forward(net: torch.nn.Sequential, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """A Sequential over crop groups as the authors' code runs it: each BatchNorm layer sees every group's
    pixels flattened side by side into one [1, C, sum of N*H*W, 1] batch."""
    for layer in net:
        if isinstance(layer, torch.nn.BatchNorm2d):
            flat = torch.cat([x.transpose(0, 1).flatten(1) for x in xs], dim=1)
            out = layer(flat[None, :, :, None])[0, :, :, 0]
            sizes = [x.numel() // x.shape[1] for x in xs]
            xs = [o.reshape(x.shape[1], x.shape[0], *x.shape[2:]).transpose(0, 1).contiguous()
                  for o, x in zip(out.split(sizes, dim=1), xs)]
        else:
            xs = [layer(x) for x in xs]
    return xs


def hand_step(model, batch: dict, step: int, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The spec's iteration written out with reference ops: (loss, updated groups [H, K, D], bank rows [2, N, D]).

    bn_crops=pooled (swap all): one BatchNorm batch over all crop sizes (list_forward), heads once over
    all crops, the momentum network forwards its target crops and the small k crops, whole sets swap.
    bn_crops=per_resolution (swap large): crops of one size go through a network together; only the
    large crops swap.
    """
    q, k = list(batch["q"]), list(batch["k"])
    pooled = cfg.model.bn_crops == "pooled"
    if step % 2 == 1:
        q, k = (k, q) if cfg.method.swap == "all" else (k[:2] + q[2:], q[:2] + k[2:])
    online, momentum = model.online, model.momentum
    n = q[0].shape[0]
    targets_in = [k[i] for i in cfg.method.target_crops]
    if pooled:
        feats = list_forward(online.backbone, [torch.cat(q[:2]), torch.cat(q[2:])])
        h = online.projector(torch.cat(feats))
        z_q, p_q = F.normalize(h, dim=1).split(n), F.normalize(online.predictor(h), dim=1).split(n)
        with torch.no_grad():
            feats_k = list_forward(momentum.backbone, [torch.cat(targets_in), torch.cat(k[2:])])
            z_k = F.normalize(momentum.projector(torch.cat(feats_k)), dim=1).split(n)[:len(targets_in)]
    else:
        z_q, p_q = [], []
        for size_group in (q[:2], q[2:]):
            h = online.projector(online.backbone(torch.cat(size_group)))
            z_q += list(F.normalize(h, dim=1).chunk(len(size_group)))
            p_q += list(F.normalize(online.predictor(h), dim=1).chunk(len(size_group)))
        with torch.no_grad():
            z_k = F.normalize(momentum.projector(momentum.backbone(torch.cat(targets_in))), dim=1).split(n)
    beta = group_momentum(cfg.method, step, 10 ** 9)
    update = cfg.method.update_crops
    losses, groups = [], []
    for h in range(cfg.method.heads):
        g = model.grouping.groups[h]
        rows = z_q[update[h % len(update)]].detach()
        targets = [reference.assign(z, g)[0] for z in z_k]  # 1. targets under G (before the update)
        index, _ = reference.assign(rows, g)  # 2. assignment of q crop update_crops[h mod len]
        sums, counts = reference.group_stats(rows, index, g.shape[0])  # 3. statistics
        g_new = reference.momentum_update(g, sums, counts, beta)  # 4. momentum update
        for t in targets:  # 5. every q crop against G' for every target
            for p in p_q:
                losses.append(F.cross_entropy(p @ g_new.T / cfg.method.temperature, t))
        groups.append(g_new)
    return torch.stack(losses).mean(), torch.stack(groups), torch.stack([z_q[i] for i in update]).detach()


STEP_VARIANTS = [  # (overrides, step)
    ((), 0), ((), 1),
    (("model.bn_crops=per_resolution", "method.swap=large"), 1),
    (("method.target_crops=[1]", "method.update_crops=[1]"), 1),
    (("method.target_crops=[1, 0]", "method.update_crops=[1, 0]", "model.bn_crops=per_resolution"), 0),
]


@pytest.mark.parametrize("overrides, step", STEP_VARIANTS)
def test_one_step_matches_hand_written_reference(tmp_path, overrides, step):
    trainer = ready(make_trainer(tmp_path, *overrides))
    trainer.progress.total_steps = 10 ** 9  # beta and EMA schedules as in hand_step
    trainer.progress.step = step
    batch = first_batch(trainer)
    before = copy.deepcopy(trainer.method)
    expected_loss, expected_groups, expected_bank = hand_step(before, batch, step, trainer.cfg)
    expected_loss.backward()

    online_before = copy.deepcopy(trainer.method.online)
    loss = trainer.step(batch)

    assert loss == pytest.approx(float(expected_loss.detach()), rel=1e-5, abs=1e-5)
    torch.testing.assert_close(trainer.method.grouping.groups, expected_groups, rtol=1e-5, atol=1e-6)
    bank = trainer.method.bank
    n = len(batch["index"])  # the epoch's first batch: bank positions 0 .. n
    assert torch.equal(bank.index[:n], batch["index"]) and bank.position == n
    torch.testing.assert_close(bank.bank[:, :n], expected_bank, rtol=1e-5, atol=1e-6)
    # the optimiser stepped on the same gradient direction: the weights moved against the reference gradient
    w_before = dict(online_before.named_parameters())
    grads = dict(before.online.named_parameters())
    with torch.no_grad():
        for name, p in trainer.method.online.named_parameters():
            if grads[name].grad is not None and grads[name].grad.abs().sum() > 0 and p.ndim > 1:
                assert float(((p - w_before[name]) * grads[name].grad).sum()) < 0, name
    # EMA: theta_k = m * theta_k(old) + (1 - m) * theta_q(new)
    rate = ema_rate(trainer.cfg.method, step, trainer.progress.total_steps)
    old_k = dict(before.momentum.named_parameters())
    new_q = dict(trainer.method.online.named_parameters())
    for name, p in trainer.method.momentum.named_parameters():
        torch.testing.assert_close(p, rate * old_k[name] + (1 - rate) * new_q[name], rtol=1e-5, atol=1e-6)


def test_grad_into_groups_changes_the_gradient(tmp_path):
    """lightly's variant lets the gradient reach the update rows through G'; the default detaches G'."""
    grads = []
    for flag in ("false", "true"):
        trainer = ready(make_trainer(tmp_path / flag, f"method.grad_into_groups={flag}", "method.beta_start=0.5",
                                     "method.beta_end=0.5"))
        trainer.method.training_step(trainer, first_batch(trainer))
        grads.append(trainer.method.online.projector[0].weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("setting, autocast, expected", [
    ("auto", False, torch.float32), ("auto", True, torch.bfloat16), ("float32", True, torch.float32),
    ("bfloat16", False, torch.bfloat16),
])
def test_step_dtype_follows_autocast(tmp_path, monkeypatch, setting, autocast, expected):
    """Under bfloat16 autocast ("auto") the grouping step gets bfloat16 rows and the float32 groups;
    the groups it returns stay float32 and the loss reaches the network."""
    trainer = ready(make_trainer(tmp_path, f"method.step_dtype={setting}"))
    trainer.bf16 = autocast  # the trainer's autocast region, here on the CPU
    grouping = trainer.method.grouping
    seen = []
    grouping.register_forward_pre_hook(
        lambda module, args: seen.append((module.groups.dtype, *(t.dtype for t in args[:3]))))
    loss = trainer.method.training_step(trainer, first_batch(trainer))
    assert seen == [(torch.float32, expected, expected, expected)]
    assert grouping.result.groups.dtype == torch.float32 and torch.isfinite(loss)
    assert trainer.method.online.projector[0].weight.grad.abs().sum() > 0


def test_reset_momentum_copies_online_weights(tmp_path):
    trainer = make_trainer(tmp_path)
    with torch.no_grad():
        for p in trainer.method.online.parameters():
            p.add_(1.0)
    trainer.method.reset_momentum()
    online = dict(trainer.method.online.backbone.state_dict())
    for name, value in trainer.method.momentum.backbone.state_dict().items():
        torch.testing.assert_close(value, online[name])


@pytest.mark.parametrize("backbone, channels, size, extra", [
    ("small_cnn", 1, 28, []), ("resnet18", 3, 32, ["model.small_stem=true"]), ("resnet18", 1, 64, []),
    ("swin_t", 1, 64, []), ("vit_b_16", 3, 32, []),
])
def test_backbones_give_flat_features(backbone, channels, size, extra):
    from smog.backbones import build_backbone

    cfg = load_config("digits", [f"model.backbone={backbone}", *extra])
    net = build_backbone(cfg.model, channels, size).eval()
    with torch.no_grad():
        out = net(torch.randn(2, channels, size, size))
    assert out.shape == (2, net.out_features)


def test_crop_sets_that_do_not_match_the_recipe_are_refused(tmp_path):
    """q and k must hold the same number of crops, 2 large + data.small_crops small ones each."""
    trainer = make_trainer(tmp_path)
    batch = first_batch(trainer)
    q, k = list(batch["q"]), list(batch["k"])
    small = trainer.cfg.data.small_crops
    for bad_q, bad_k in ((q, k[:-1]), (q[1:], k[1:])):
        message = (f"q and k must each hold 2 large + data.small_crops={small} small crops, got {len(bad_q)} q "
                   f"and {len(bad_k)} k crops")
        with pytest.raises(ValueError) as error:
            trainer.method.forward_crops(trainer.online, bad_q, bad_k)
        assert message in str(error.value)


def test_step_runs_on_the_configured_backend(tmp_path, monkeypatch):
    trainer = ready(make_trainer(tmp_path, "method.backend=reference"))
    seen = []
    real_resolve = step_module.resolve

    def spy(backend, *args, **kwargs):
        seen.append(backend)
        return real_resolve(backend, *args, **kwargs)

    monkeypatch.setattr(step_module, "resolve", spy)
    trainer.method.training_step(trainer, first_batch(trainer))
    assert seen == ["reference"] * trainer.cfg.method.heads


def test_a_steps_counts_reach_the_meters_the_records_and_the_collapse_watch(tmp_path, monkeypatch):
    trainer = ready(make_trainer(tmp_path))
    method, cfg, p = trainer.method, trainer.cfg, trainer.progress
    watched = []
    monkeypatch.setattr(method.watch, "update", lambda *args: watched.append(args))
    counts = []
    for _ in range(2):
        trainer.step(first_batch(trainer))
        counts.append(method.grouping.result.counts.clone())
    assert torch.equal(method.counts, counts[0] + counts[1])  # the epoch's meter adds up every step's
    fillable = min(cfg.method.groups, cfg.train.batch_size)  # 10 groups, 64 rows a step
    assert watched == [(group_health(c)["in_use"], fillable, trainer.say) for c in counts]
    assert method.step_metrics(trainer) == {"beta": group_momentum(cfg.method, 1, p.total_steps),
                                            **group_health(counts[1])}  # the step just taken: step 1
    assert group_momentum(cfg.method, 1, p.total_steps) != group_momentum(cfg.method, 2, p.total_steps)

    method.counts.zero_()
    method.counts[0, :2] = 1  # head 0: two groups of one member
    method.counts[1] = 5  # head 1: every group equally full; head 2: no members
    beta = group_momentum(cfg.method, p.step, p.total_steps)
    assert method.progress_fields(trainer) == {"beta": f"{beta:.4f}", "groups": 2}
    state = method.method_state()
    method.counts[2, 0] = 7
    assert torch.equal(state["counts"][2], torch.zeros(cfg.method.groups, dtype=torch.int64))  # a copy
    method.load_method_state(state)
    assert int(method.counts[2, 0]) == 0
    metrics = method.epoch_metrics()
    assert metrics["nonempty"] == [2, 10, 0]
    assert [round(e, 12) for e in metrics["entropy"]] == [round(math.log(2) / math.log(10), 12), 1.0, 0.0]
    assert set(metrics) == {"nonempty", "entropy"} and not method.counts.any()  # the meters start again


def test_the_bank_is_this_processes_state_and_a_missing_one_is_filled_again(tmp_path):
    trainer = ready(make_trainer(tmp_path))
    bank = trainer.method.bank
    steps, cfg = trainer.progress.steps_per_epoch, trainer.cfg
    assert bank.bank.shape == (len(cfg.method.update_crops), steps * trainer.batch_size, cfg.model.dim)
    assert trainer.method.bank_ready and trainer.method.on_fit_start(trainer) is None  # filled once
    other = make_trainer(tmp_path / "other")
    other.method.load_rank_state(trainer.method.rank_state())
    assert other.method.bank_ready
    assert torch.equal(other.method.bank.bank, bank.bank) and torch.equal(other.method.bank.index, bank.index)
    other.method.load_rank_state(None)
    assert not other.method.bank_ready
    other.progress.step = other.progress.step_in_epoch = 1  # resumed after the epoch's first step
    record = other.method.on_fit_start(other)
    assert record["kind"] == "bank_fill" and record["step"] == 1 and record["seconds"] > 0
    assert other.method.bank_ready and other.method.bank.count == bank.size
    assert other.method.bank.position == other.batch_size  # where the epoch's next step writes


@pytest.mark.parametrize("overrides, reclustered, reset", [
    ((), [0, 1, 2], True),
    (("method.recluster_every=2", "method.reset_momentum_each_epoch=false"), [0, 2], False),
    (("method.recluster_every=0",), [], True),
])
def test_each_epoch_resets_the_momentum_network_and_reclusters_every_head_from_the_bank(tmp_path, overrides,
                                                                                         reclustered, reset):
    import smog_kernels as sk

    trainer = make_trainer(tmp_path, *overrides)
    method, m = trainer.method, trainer.cfg.method
    method.on_fit_start(trainer)
    for epoch in range(3):
        groups = method.grouping.groups.clone()
        with torch.no_grad():
            for param in method.momentum.parameters():
                param.add_(1.0)
        trainer.progress.step = 5 * epoch
        record = method.on_epoch_start(trainer, epoch)
        online = dict(method.online.named_parameters())
        for name, param in method.momentum.named_parameters():
            assert torch.equal(param, online[name]) == reset, name
        if epoch not in reclustered:
            assert record is None and torch.equal(method.grouping.groups, groups)
            continue
        counts = []
        for h in range(m.heads):
            rows = method.bank.rows(h % method.bank.views)
            want, index = sk.spherical_kmeans(rows, m.groups, m.kmeans_iters,
                                              seed=trainer.cfg.train.seed * 7919 + epoch * m.heads + h)
            assert torch.equal(method.grouping.groups[h], want), (epoch, h)
            counts.append(torch.bincount(index, minlength=m.groups))
        assert record == {"kind": "recluster", "epoch": epoch, "step": 5 * epoch,
                          **group_health(torch.stack(counts))}
