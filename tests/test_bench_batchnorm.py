"""`bench/batchnorm` and `bench/step_dtype` on the digits recipe: they run and write what they say."""
from __future__ import annotations

import json

from bench import batchnorm, step_dtype


def test_batchnorm_bench_times_both_variants_on_both_clocks(tmp_path):
    result = batchnorm.main(["--config", "digits", "--rounds", "2", "--warmup", "0", "--repeats", "2",
                             "--out", str(tmp_path), "train.threads=1"])
    assert json.loads((tmp_path / "batchnorm_digits_train.threads-1.json").read_text()) == result
    assert len(result["repeats"]) == 2
    for clock in ("wall", "cpu"):
        medians = result["repeats"][0][clock]["median_s"]
        assert set(medians) == set(batchnorm.VARIANTS)
        for phases in medians.values():
            assert all(seconds > 0 for seconds in phases.values())
            assert phases["total"] == sum(phases[p] for p in batchnorm.PHASES)
        assert set(result["ratio_median_over_repeats"][clock]) == {*batchnorm.PHASES, "total"}


def test_step_dtype_bench_trains_both_dtypes_and_counts_flips(tmp_path):
    result = step_dtype.main(["--config", "digits", "--flip-batches", "2", "--flip-groups", "0", "30",
                              "--out", str(tmp_path), "train.epochs=1", "data.train_subset=512", "train.threads=1"])
    assert json.loads((tmp_path / "step_dtype_digits.json").read_text()) == result
    assert [(run["seed"], run["step_dtype"]) for run in result["runs"]] == [(0, "float32"), (0, "bfloat16")]
    assert all(run["knn"] for run in result["runs"])
    assert [flips["groups"] for flips in result["flips"]] == [10, 30]  # digits' method.groups, then k-means
    for flips in result["flips"]:
        assert flips["batches"] == 2 and flips["target_rows_per_head"] == 2 * 2 * 64  # 2 batches of 2 target crops
        assert all(0.0 <= f <= 1.0 for f in flips["targets_flipped"] + flips["assignments_flipped"])
        assert 0.0 <= flips["loss_relative_change_median"] <= flips["loss_relative_change_max"] < 0.05
