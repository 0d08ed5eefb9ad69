"""Checkpoints are written atomically: a failed write leaves the previous file intact and no temp file."""
from __future__ import annotations

import os

import pytest
import torch

from smog import checkpoint


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "run" / "checkpoint.pt")
    checkpoint.save_atomic({"step": 1, "w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        checkpoint.save_atomic({"step": 2, "bad": Unpicklable()}, path)
    assert checkpoint.load(path)["step"] == 1
    assert os.listdir(tmp_path / "run") == ["checkpoint.pt"]


def test_rng_state_round_trip():
    state = checkpoint.rng_state()
    first = torch.rand(4)
    checkpoint.set_rng_state(state)
    torch.testing.assert_close(torch.rand(4), first, rtol=0, atol=0)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        checkpoint.load(str(tmp_path / "nope.pt"))
