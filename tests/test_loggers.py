"""What users of other SSL libraries expect: TensorBoard event files beside metrics.jsonl, Weights & Biases
as an opt-in logger, timm backbones by name."""
from __future__ import annotations

import json
import os
import math
import sys
import types

import pytest
import torch

from smog.backbones import build_backbone
from smog.config import ConfigError, load_config
from smog.runlog import scalars
from smog.loop import Trainer

SMALL = ["data.train_subset=256", "train.batch_size=32", "data.small_crops=1", "eval.knn_every=1",
         "eval.knn_train_subset=200", "eval.knn_test_subset=100"]


def trainer_for(out_dir, *overrides: str) -> Trainer:
    return Trainer(load_config("digits", [f"train.out_dir={out_dir}", *SMALL, *overrides]))


def records(trainer: Trainer) -> list[dict]:
    with open(trainer.log.path) as handle:
        return [json.loads(line) for line in handle]


def test_tensorboard_event_files_hold_the_numbers_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = trainer_for(tmp_path, "train.epochs=2", "train.log_every=3")
    trainer.fit()
    trainer.log.close()
    events = EventAccumulator(trainer.run_dir)
    events.Reload()
    epochs = [r for r in records(trainer) if r["kind"] == "epoch"]
    assert len(epochs) == 2
    loss = [(e.step, e.value) for e in events.Scalars("epoch/loss")]
    assert loss == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in epochs]
    knn = [(e.step, e.value) for e in events.Scalars("epoch/knn/k20_t0.07")]
    assert knn == [(r["step"], pytest.approx(r["knn"]["k20_t0.07"], rel=1e-6)) for r in epochs]
    assert [e.value for e in events.Scalars("epoch/nonempty/2")] == [r["nonempty"][2] for r in epochs]
    assert "bank_fill/seconds" in events.Tags()["scalars"]
    steps = [r for r in records(trainer) if r["kind"] == "step"]  # group health along the run, per head
    assert [r["step"] for r in steps] == [3, 6, 9, 12, 15]
    for name in ("in_use", "largest_share", "entropy"):
        for h in range(trainer.cfg.method.heads):
            got = [(e.step, e.value) for e in events.Scalars(f"step/{name}/{h}")]
            assert got == [(r["step"], pytest.approx(r[name][h], rel=1e-6)) for r in steps], (name, h)
    reclusters = [r for r in records(trainer) if r["kind"] == "recluster"]
    assert [r["epoch"] for r in reclusters] == [0, 1]
    assert [e.value for e in events.Scalars("recluster/in_use/0")] == [r["in_use"][0] for r in reclusters]


def test_tensorboard_off_writes_no_event_files(tmp_path):
    trainer = trainer_for(tmp_path, "train.epochs=1", "train.tensorboard=false")
    trainer.fit()
    assert not [p for p in os.listdir(trainer.run_dir) if "tfevents" in p]


class FakeWandb(types.ModuleType):
    """Stands in for the wandb package: records init arguments and logged rows."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.rows, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, row: dict, step: int) -> None:
        self.rows.append((step, row))

    def finish(self) -> None:
        self.finished += 1


def test_wandb_is_opt_in_and_gets_every_record(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    trainer_for(tmp_path / "off", "train.epochs=1").fit()
    assert fake.inits == []  # off by default
    trainer = trainer_for(tmp_path / "on", "train.epochs=1", "train.wandb=true", "train.wandb_project=p")
    trainer.fit()
    trainer.log.close()
    assert len(fake.inits) == 1 and fake.inits[0]["project"] == "p" and fake.inits[0]["name"] == "digits"
    assert fake.inits[0]["config"]["train"]["wandb"] is True
    expected = []
    for r in records(trainer):  # by hand: every number of the record under "kind/name"
        row = {f"{r['kind']}/{k}": float(v) for k, v in r.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        for key in ("knn", "nonempty", "entropy", "in_use", "largest_share"):
            values = r.get(key, {})
            items = values.items() if isinstance(values, dict) else enumerate(values)
            row.update({f"{r['kind']}/{key}/{k}": float(v) for k, v in items})
        expected.append((r["step"], row))
    assert fake.rows == expected and fake.finished == 1


def test_wandb_enabled_but_not_installed_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError, match=r"train.wandb=true needs the wandb package: pip install wandb"):
        trainer_for(tmp_path, "train.wandb=true")


def test_scalars_flattens_dicts_and_per_head_lists():
    record = {"kind": "epoch", "step": 9, "loss": 1.5, "knn": {"k20": 80.0}, "nonempty": [3, 4], "epoch": 0}
    assert scalars(record) == {"epoch/loss": 1.5, "epoch/knn/k20": 80.0, "epoch/nonempty/0": 3.0,
                               "epoch/nonempty/1": 4.0, "epoch/epoch": 0.0}


@pytest.mark.parametrize("name, width", [("resnet18", 512), ("mobilenetv3_small_050", 1024)])
def test_timm_backbone_by_name_reads_its_feature_width(name, width):
    pytest.importorskip("timm", reason="the timm package is not installed")
    cfg = load_config("digits", [f"model.backbone=timm/{name}"])
    net = build_backbone(cfg.model, channels=1, image_size=8).eval()
    assert net.out_features == width  # the widths of these models' pooled features (timm's model cards)
    with torch.no_grad():
        assert net(torch.zeros(2, 1, 32, 32)).shape == (2, width)


def test_timm_backbone_trains_an_epoch_of_digits(tmp_path):
    pytest.importorskip("timm", reason="the timm package is not installed")
    with pytest.raises(ConfigError, match="model.bn_crops=per_resolution"):  # timm's ResNet: no lockstep forward
        trainer_for(tmp_path / "pooled", "model.backbone=timm/resnet18", "train.epochs=1").fit()
    trainer = trainer_for(tmp_path, "model.backbone=timm/resnet18", "model.bn_crops=per_resolution", "train.epochs=1",
                          "eval.knn_every=0")
    record = trainer.fit()
    assert math.isfinite(record["loss"]) and 0 <= record["knn"]["k20_t0.07"] <= 100


def test_unknown_timm_model_names_the_key():
    pytest.importorskip("timm", reason="the timm package is not installed")
    with pytest.raises(ConfigError, match="model.backbone=timm/no_such_net"):
        build_backbone(load_config("digits", ["model.backbone=timm/no_such_net"]).model, 1, 8)


@pytest.mark.filterwarnings("ignore:No artists with labels")  # the stand-in plot draws nothing to label
def test_plots_number_epochs_as_the_log_does(tmp_path, monkeypatch):
    """The kNN after the second epoch (record "epoch": 1, printed "epoch 2") is drawn at 2."""
    pytest.importorskip("matplotlib", reason="matplotlib is not installed")
    import matplotlib.axes

    from smog.runlog import RunLog

    drawn = []
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, x, y, **kw: drawn.append(list(x)))
    log = RunLog(str(tmp_path))
    for epoch in range(3):
        record = {"kind": "epoch", "epoch": epoch, "step": 10 * (epoch + 1), "loss": 1.0, "nonempty": [5],
                  "entropy": [0.5]}
        log.write({**record, "knn": {"k20_t0.07": 50.0}} if epoch == 1 else record)
    log.plot()
    log.close()
    assert drawn == [[1, 2, 3], [2], [1, 2, 3], [1, 2, 3]]  # loss, kNN, groups in use, entropy


@pytest.mark.parametrize("every_s, expected", [(0.0, [1, 2, 3]), (3600.0, [1, 3])])
def test_plots_are_redrawn_after_the_first_epoch_then_at_most_every_interval_and_at_the_end(
        tmp_path, monkeypatch, every_s, expected):
    """Short epochs are not spent drawing: with an hour between plots, epoch 1's and the final one only."""
    import smog.callbacks
    from smog.runlog import RunLog

    monkeypatch.setattr(smog.callbacks.Logging, "PLOT_EVERY_S", every_s)
    trainer = trainer_for(tmp_path, "train.epochs=3", "eval.knn_every=0", "data.train_subset=64")
    drawn = []  # epochs in the log at each plot
    monkeypatch.setattr(RunLog, "plot", lambda self: drawn.append(len([r for r in records(trainer)
                                                                         if r["kind"] == "epoch"])))
    trainer.fit()
    assert drawn == expected
