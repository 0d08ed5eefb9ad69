"""bench/train_step as a user runs it (a subprocess) on a tiny digits config: the JSON and PNG land where
promised, every phase of every variant is timed, nothing is written under train.out_dir, and a bad
--compare is a usage error. No timing thresholds (the phase accounting itself: tests/test_profile.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.train_subset=128", "train.batch_size=32", "data.small_crops=1", "method.groups=8"]


def bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run([str(REPO / "bench" / "train_step"), *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_command_times_every_phase_of_every_variant_and_writes_json_and_png(tmp_path):
    out = tmp_path / "results"
    done = bench("--config", "digits", "--steps", "2", "--warmup", "1", "--compare", "data.augment_on=loader,device",
                 "--out", str(out), f"train.out_dir={tmp_path / 'runs'}", *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    stem = out / "train_step_digits_data.augment_on"
    data = json.loads(Path(str(stem) + ".json").read_text())
    assert [v["label"] for v in data["variants"]] == ["data.augment_on=loader", "data.augment_on=device"]
    assert data["machine"]["cpu"] and data["machine"]["torch"]
    timed = ("loader", "crops", "online forward", "momentum forward", "grouping step", "backward", "optimizer",
             "after step")
    for variant in data["variants"]:
        assert len(variant["steps_s"]) == 2
        for step in variant["steps_s"]:
            assert all(step[name] > 0 for name in (*timed, "total", "total CPU")), (variant["label"], step)
            assert step["total"] >= sum(step[name] for name in timed) * (1 - 1e-9)
    assert os.path.getsize(str(stem) + ".png") > 0
    assert all(name in done.stdout for name in (*timed, "other", "total", "total CPU"))
    assert not (tmp_path / "runs").exists()  # no checkpoint, no log


def test_a_bad_compare_is_a_usage_error():
    done = bench("--config", "digits", "--compare", "model.channels_last=true")
    assert done.returncode == 2 and "at least two values" in done.stderr
