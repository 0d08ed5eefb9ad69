"""bench/lightly_example as a user runs it (a subprocess), with a stand-in for lightly's example (lightly's
file lives in its repository, not here): the stand-in's CIFAR-10 answers with the benchmark's data and its
DataLoader runs at the benchmark's batch size and workers in place of the 256 and 8 it asks for; both scripts
stop after warmup + steps; the stand-in's grouping lines (lightly's SMoGPrototypes; its cross-entropy is the
functional one, which the benchmark does not time, so that only the SMoGPrototypes calls are seen) and ours
(Grouping) are timed; the JSON holds each script's medians, the grouping steps timed alone and the
ratios. No timing thresholds."""
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
from lightly.models.modules.heads import SMoGPrototypes

dataset = torchvision.datasets.CIFAR10("datasets/cifar10", download=True, transform=lambda image: (
    torch.zeros(3, 32, 32), torch.ones(3, 32, 32)))
dataloader = torch.utils.data.DataLoader(dataset, batch_size=256, shuffle=True, drop_last=True, num_workers=8)
prototypes = SMoGPrototypes(group_features=torch.rand(10, 4), beta=0.99)
for epoch in range(10):
    for batch_idx, batch in enumerate(dataloader):
        (x0, x1) = batch[0]
        assert len(dataset) == 1500 and x0.shape == (8, 3, 32, 32), (len(dataset), x0.shape)
        assert dataloader.num_workers == 0
        encoded = torch.randn(8, 4, requires_grad=True)
        assignments = prototypes.assign_groups(encoded)
        group_features = prototypes.get_updated_group_features(encoded)
        loss = torch.nn.functional.cross_entropy(prototypes(encoded, group_features), assignments)
        prototypes.set_group_features(group_features)
        loss.backward()
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
                 "--grouping-repeats", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["lightly_example"]["sha256"] == hashlib.sha256(STAND_IN.encode()).hexdigest()
    for name in ("lightly", "smog"):
        assert data[name]["step_s"] > 0 and data[name]["step_cpu_s"] > 0 and data[name]["load_s"] > 0, data[name]
        assert len(data[name]["runs"]["step_s"]) == 1
        assert 0 < data[name]["grouping_s"] < data[name]["step_s"], data[name]  # the grouping lines, timed
        assert data["grouping_alone"][name] > 0
    assert data["step_ratio_lightly_over_smog"] == data["lightly"]["step_s"] / data["smog"]["step_s"]
    assert data["grouping_alone_ratio_lightly_over_smog"] == (data["grouping_alone"]["lightly"]
                                                              / data["grouping_alone"]["smog"])
    assert data["grouping_alone"]["repeats"] == 2
    assert data["machine"]["cpu"] and (data["batch_size"], data["workers"], data["data"]) == (8, 0, "digits")
    assert "step: lightly / smog" in done.stdout


def test_a_path_without_lightlys_example_is_refused_with_where_to_get_it(tmp_path):
    done = bench(str(tmp_path))
    assert done.returncode != 0
    assert "git clone https://github.com/lightly-ai/lightly" in done.stderr
