"""Group health (smog.health) against figures worked out by hand, and the collapse warning's timing."""
from __future__ import annotations

import math

import pytest
import torch

from smog.health import CollapseWatch, group_health


def test_group_health_of_a_fixed_count_matrix_by_hand():
    counts = torch.tensor([[2, 0, 2, 4],    # shares 1/4, 0, 1/4, 1/2
                           [0, 0, 0, 0],    # no members
                           [3, 3, 3, 3],    # every group equally full
                           [0, 0, 7, 0]])   # one group takes all
    health = group_health(counts)
    assert health["in_use"] == [3, 0, 4, 1]
    assert health["largest_share"] == pytest.approx([0.5, 0.0, 0.25, 1.0])
    # head 0: -(1/4 ln 1/4 + 1/4 ln 1/4 + 1/2 ln 1/2) = 1.5 ln 2, over ln 4 = 2 ln 2
    assert health["entropy"] == pytest.approx([0.75, 0.0, 1.0, 0.0])
    assert health["entropy"][0] == pytest.approx(1.5 * math.log(2) / math.log(4))


def test_collapse_warning_fires_once_after_the_steps_in_a_row():
    said: list[str] = []
    watch = CollapseWatch(fraction=0.5, steps=3)
    fillable = 10  # under 5 groups in use is low
    for in_use in ([6, 6], [4, 6], [4, 6], [6, 6], [4, 9], [3, 9]):  # low runs of 2, then 2: no warning
        watch.update(in_use, fillable, said.append)
    assert said == []
    watch.update([9, 2], fillable, said.append)  # the third low step in a row
    assert len(said) == 1 and "for 3 steps in a row a head used 2 groups" in said[0]
    for _ in range(5):
        watch.update([1, 1], fillable, said.append)
    assert len(said) == 1  # once per run


def test_collapse_fraction_zero_never_warns():
    said: list[str] = []
    watch = CollapseWatch(fraction=0.0, steps=1)
    for _ in range(4):
        watch.update([0, 0], 10, said.append)
    assert said == []


def test_group_health_of_two_groups_and_of_one():
    assert group_health(torch.tensor([[3, 3]]))["entropy"] == [1.0]  # log 2 / log 2
    one = group_health(torch.tensor([[5], [0]]))  # K = 1: entropy 0, not 0 / log 1
    assert one == {"in_use": [1, 0], "largest_share": [1.0, 0.0], "entropy": [0.0, 0.0]}


def test_collapse_needs_fewer_groups_than_the_fraction_and_every_step_of_the_run_low():
    said: list[str] = []
    watch = CollapseWatch(fraction=0.25, steps=1)  # low: under 0.25 * 16 = 4
    watch.update([4, 4], 16, said.append)
    assert said == [] and watch.run == 0
    watch.update([4, 3], 16, said.append)
    assert len(said) == 1 and watch.run == 1
    fresh = CollapseWatch(fraction=0.25, steps=2)
    fresh.update([1, 8], 16, said.append)  # a run starts at the first low step: one of two
    assert len(said) == 1 and fresh.run == 1
