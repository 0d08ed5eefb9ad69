"""bench/lightly_example as a user runs it (a subprocess), with a stand-in for lightly's example (lightly's
file lives in its repository, not here): the stand-in's CIFAR-10 answers with the benchmark's data and its
DataLoader runs at the benchmark's batch size and workers in place of the 256 and 8 it asks for; both scripts
stop after warmup + steps; the JSON holds each script's medians and their ratio. No timing thresholds."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAND_IN = """\
import torch
import torchvision

dataset = torchvision.datasets.CIFAR10("datasets/cifar10", download=True, transform=lambda image: (
    torch.zeros(3, 32, 32), torch.ones(3, 32, 32)))
dataloader = torch.utils.data.DataLoader(dataset, batch_size=256, shuffle=True, drop_last=True, num_workers=8)
for epoch in range(10):
    for batch_idx, batch in enumerate(dataloader):
        (x0, x1) = batch[0]
        assert len(dataset) == 1500 and x0.shape == (8, 3, 32, 32), (len(dataset), x0.shape)
        assert dataloader.num_workers == 0
"""


def bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run([str(REPO / "bench" / "lightly_example"), *args], env=env, capture_output=True, text=True,
                          timeout=900, check=False)


def test_both_examples_are_timed_on_the_same_data_and_batch(tmp_path):
    pytest.importorskip("lightly", reason="examples/lightly_smog.py needs the lightly package")
    stand_in = tmp_path / "smog.py"
    stand_in.write_text(STAND_IN)
    out = tmp_path / "result.json"
    done = bench(str(stand_in), "--steps", "2", "--warmup", "1", "--repeats", "1", "--batch-size", "8",
                 "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["lightly_example"]["sha256"] == hashlib.sha256(STAND_IN.encode()).hexdigest()
    for name in ("lightly", "smog"):
        assert data[name]["step_s"] > 0 and data[name]["step_cpu_s"] > 0 and data[name]["load_s"] > 0, data[name]
        assert len(data[name]["runs"]["step_s"]) == 1
    assert data["lightly"]["grouping_s"] == 0  # the stand-in calls no SMoGPrototypes
    assert data["smog"]["grouping_s"] > 0  # Grouping.forward, timed
    assert data["step_ratio_lightly_over_smog"] == data["lightly"]["step_s"] / data["smog"]["step_s"]
    assert data["machine"]["cpu"] and (data["batch_size"], data["workers"], data["data"]) == (8, 0, "digits")
    assert "step: lightly / smog" in done.stdout


def test_a_path_without_lightlys_example_is_refused_with_where_to_get_it(tmp_path):
    done = bench(str(tmp_path))
    assert done.returncode != 0
    assert "git clone https://github.com/lightly-ai/lightly" in done.stderr
