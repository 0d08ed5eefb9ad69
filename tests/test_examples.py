"""examples/ as a user runs them (subprocesses, the CPU, digits), each for --steps 3.

1. lightly_smog.py (lightly's SMoG example with smog's grouping step; needs lightly): exits 0 with a finite
   loss, re-clustering from its memory bank at the third step (--reset-every 2).
2. lightning_smog.py (needs lightning or pytorch_lightning): three optimiser steps of two accumulated
   sub-batches each, re-clustering at the third; in process, one optimiser step moves the groups as a
   GroupingCycle over its two sub-batches' rows (last=False, then last=True).
3. torchrun_smog.py: one process, and two under torch.distributed.run (gloo), whose groups are the same bits.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import smog_kernels as sk

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
LOSS = re.compile(r"loss:? (\S+?)[,\s]")


def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done


def losses(text: str) -> list[float]:
    found = [float(x) for x in LOSS.findall(text + "\n")]
    assert found and all(math.isfinite(x) and x > 0 for x in found), text[-2000:]
    return found


def lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning", reason="neither lightning nor pytorch_lightning is installed "
                                 "(pip install lightning)")
    return pl


def test_lightlys_example_with_smogs_grouping_step_runs(tmp_path):
    pytest.importorskip("lightly", reason="the lightly example needs the lightly package (pip install lightly)")
    done = run(str(EXAMPLES / "lightly_smog.py"), "--steps", "3", "--batch-size", "160", "--reset-every", "2",
               cwd=tmp_path)
    assert "Starting Training" in done.stdout
    assert len(losses(done.stdout)) == 1  # one epoch line, over the three steps run


def test_the_lightning_example_runs_three_accumulated_steps(tmp_path):
    lightning()
    done = run(str(EXAMPLES / "lightning_smog.py"), "--steps", "3", "--images", "512", "--batch-size", "128",
               "--accumulate", "2", cwd=tmp_path)
    assert re.findall(r"epoch (\d) step (\d)", done.stdout) == [("0", "1"), ("0", "2"), ("1", "3")]
    assert len(losses(done.stdout)) == 3
    assert not any(tmp_path.iterdir())  # no logs, no checkpoints


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_lightning_module_moves_the_groups_once_per_step_from_every_sub_batch(tmp_path):
    """One optimiser step of two accumulated sub-batches: the inputs given to Grouping, replayed through a
    GroupingCycle from the initial groups, give the groups the module ends with."""
    pl = lightning()
    example = load_example("lightning_smog")
    pl.seed_everything(3)
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    model = example.SMoG(channels=1, batch_size=4, width=4, dim=8, heads=2, groups=5)
    start = model.grouping.groups.clone()
    calls = []
    model.grouping.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append(([a.detach().clone() for a in args[:3]], kwargs)), with_kwargs=True)
    loader = torch.utils.data.DataLoader(example.TwoViews(images), batch_size=4, shuffle=True, drop_last=True)
    trainer = pl.Trainer(max_steps=1, accumulate_grad_batches=2, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=loader)
    assert [kwargs["last"] for _, kwargs in calls] == [False, True]
    assert all(kwargs["beta"] == 0.99 for _, kwargs in calls)
    for h in range(2):
        cycle = sk.GroupingCycle(start[h], temperature=0.1)
        steps = [cycle.step(t, u[h % len(u)], p, 0.99, last=kwargs["last"]) for (t, u, p), kwargs in calls]
        assert torch.equal(model.grouping.groups[h], steps[-1].groups)
    assert not torch.equal(model.grouping.groups, start)
    assert model.bank.count == 8  # both sub-batches' rows, written at their positions


def test_the_torchrun_example_runs_on_one_process(tmp_path):
    done = run(str(EXAMPLES / "torchrun_smog.py"), "--steps", "3", "--images", "512", cwd=tmp_path)
    assert "epoch 1 step 3" in done.stdout  # two steps per epoch: the third re-clustered first
    assert len(losses(done.stdout)) == 2  # step 3, and the process's final line


def test_the_torchrun_example_on_two_processes_keeps_the_same_groups_on_both(tmp_path):
    done = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(EXAMPLES / "torchrun_smog.py"), "--steps", "3", "--images", "512", cwd=tmp_path)
    finals = re.findall(r"process (\d) of 2: loss \S+, groups sha256 ([0-9a-f]{16})", done.stdout)
    assert sorted(rank for rank, _ in finals) == ["0", "1"], done.stdout
    assert len({digest for _, digest in finals}) == 1, finals
    losses(done.stdout)


def test_the_torchrun_example_is_under_150_lines():
    assert len((EXAMPLES / "torchrun_smog.py").read_text().splitlines()) < 150
