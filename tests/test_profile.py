"""smog.profile: the phases of a step, read back from torch.profiler (by hand on a made-up step), and
`train.profile` writing a run's phase table and trace."""
from __future__ import annotations

import json
import time

import pytest
import torch

from smog import profile
from tests.training import make_trainer


class Stopwatch:
    """Wall time of the blocks it times, by name, per step: what the profile must give back."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []

    def time(self, name: str, work: float):
        start = time.perf_counter()
        while time.perf_counter() < start + work:
            pass
        self.steps[-1][name] = self.steps[-1].get(name, 0.0) + time.perf_counter() - start


def test_phase_times_add_up_each_steps_phases_and_give_the_loader_to_the_next_step():
    watch = Stopwatch()
    with profile.profiler(torch.device("cpu")) as prof:
        with profile.phase("crops"):  # outside any step and not the loader: left out
            time.sleep(0.01)
        for _ in range(2):
            watch.steps.append({})
            with profile.phase("loader"):
                watch.time("loader", 0.01)
            start = time.perf_counter()
            with profile.phase(profile.STEP):
                for _ in range(2):  # a phase entered twice in a step (two sub-batches) adds up
                    with profile.phase("backward"):
                        watch.time("backward", 0.01)
                time.sleep(0.01)
            watch.steps[-1][profile.STEP] = time.perf_counter() - start
    times = profile.phase_times(prof)
    assert len(times) == 2
    for got, want in zip(times, watch.steps):
        for name in ("loader", "backward", profile.STEP):
            assert got[name] == pytest.approx(want[name], abs=1e-3), name
        assert got["crops"] == 0.0
    mid = profile.medians(times)
    inside = sorted(t[profile.STEP] - t["backward"] for t in times)
    assert mid["other"] == pytest.approx(sum(inside) / 2)


def test_train_profile_writes_the_phase_table_and_a_trace(tmp_path):
    trainer = make_trainer(tmp_path, "train.epochs=1", "train.batch_size=32", "train.profile=3", "eval.knn_every=0",
                           "eval.knn_train_subset=100", "eval.knn_test_subset=50", "data.small_crops=1")
    trainer.fit()
    folder = tmp_path / "digits" / "profile"
    data = json.loads((folder / "phases.json").read_text())
    assert len(data["steps"]) == 3
    for name in ("crops", "online forward", "momentum forward", "grouping step", "backward", "optimizer",
                 "after step", "loader"):
        assert all(step[name] > 0 for step in data["steps"]), name
    assert (folder / "phases.txt").is_file()
    assert list(folder.glob("*.pt.trace.json")), sorted(p.name for p in folder.iterdir())
