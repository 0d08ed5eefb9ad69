"""`bench/accuracy --budget-minutes`: every method trains for the budget and no longer, reports kNN at both
settings and a linear probe; a finished method is not run again; lightly's absence is said. And the clock
(smog.budget) that the comparison rests on."""
from __future__ import annotations

import json
import os
import sys
import time

import pytest

from bench import accuracy
from smog.budget import Budget
from smog.commands.eval import main as smog_eval

BUDGET_MIN = 0.05  # 3 s of training per method
# a method stops at the first step after the budget: digits steps take milliseconds (more on a loaded
# machine), smog's first step waits for its memory-bank fill and k-means
TOLERANCE_S = 1.5
DIGITS = ["data.augment_on=device", "eval.knn_k=[200,20]", "eval.knn_t=[0.1,0.07]", "eval.linear_epochs=3",
          "train.threads=1", "train.progress=false", "train.tensorboard=false"]
KEYS = {"k200_t0.1", "k20_t0.07"}


def run(tmp_path, *args: str) -> tuple[int, dict | None]:
    rc = accuracy.main(["--config", "digits", "--budget-minutes", str(BUDGET_MIN), "--run-dir", str(tmp_path / "run"),
                        "--out", str(tmp_path / "out"), *args, *DIGITS])
    path = tmp_path / "out" / f"accuracy_digits_budget{BUDGET_MIN:g}.json"
    return rc, json.loads(path.read_text()) if path.exists() else None


def test_the_clock_stands_still_while_paused():
    budget = Budget(1.0)
    started = time.perf_counter()
    budget.start()
    time.sleep(0.1)
    with budget.paused():
        time.sleep(0.3)
    time.sleep(0.1)
    budget.stop()
    outside = time.perf_counter() - started - 0.3
    assert 0.2 <= budget.spent() <= outside + 0.05
    assert not budget.over()


def test_an_evaluation_is_due_once_per_mark_and_never_at_or_after_the_end():
    budget = Budget(0.5 / 60, eval_every_minutes=0.1 / 60)  # 0.5 s, every 0.1 s
    budget.start()
    due = []
    while not budget.over():
        if budget.eval_due():
            due.append(budget.spent())
        time.sleep(0.01)
    assert 3 <= len(due) <= 4  # at 0.1, 0.2, 0.3, 0.4 s (a loaded machine may skip one)
    assert all(0.1 <= t < 0.5 for t in due)
    assert all(b - a >= 0.09 for a, b in zip(due, due[1:]))
    assert not budget.eval_due()


def test_total_steps_puts_each_step_at_the_share_of_the_time_spent():
    budget = Budget(0.6 / 60)
    budget.start()
    time.sleep(0.1)  # spent before the first step (a bank fill): not the schedule's
    assert budget.total_steps(0) == 1
    step = 0
    while not budget.over():
        time.sleep(0.01)
        step += 1
        spent = budget.spent()
        total = budget.total_steps(step)
        share = (spent - 0.1) / 0.5
        if share > 0.2:
            assert step / total == pytest.approx(share, abs=0.1)
    assert step / budget.total_steps(step) > 0.9


def test_every_method_trains_for_the_budget_and_reports_knn_and_a_linear_probe(tmp_path, capsys):
    pytest.importorskip("lightly", reason="lightly-smog, byol and swav need the lightly package")
    started = time.perf_counter()
    rc, result = run(tmp_path)
    wall = time.perf_counter() - started
    assert rc == 0
    assert list(result["methods"]) == list(accuracy.METHODS) and result["skipped"] == {}
    budget_s = 60 * BUDGET_MIN
    for name, method in result["methods"].items():
        assert set(method["knn"]) == KEYS, name
        assert all(0 <= v <= 100 for v in method["knn"].values()), name
        assert 0 <= method["linear_top1"] <= 100, name
        if name in ("random init", "raw pixels"):
            assert "curve" not in method
            continue
        assert budget_s <= method["train_seconds"] <= budget_s + TOLERANCE_S, name
        assert method["wall_seconds"] >= budget_s, name  # timed apart from the budget's clock
        assert method["steps"] >= 1 and method["lr_progress"] > 0.9, name  # the schedule spans the budget
        curve = method["curve"]
        assert curve[-1]["knn"] == method["knn"] and curve[-1]["step"] == method["steps"], name
        assert curve[-1]["minutes"] == pytest.approx(method["train_seconds"] / 60, abs=1e-6), name
        assert all(a["minutes"] < b["minutes"] for a, b in zip(curve, curve[1:])), name
    assert len(result["methods"]["byol"]["curve"]) >= 3  # kNN along the way: every M / 5 and at the end
    assert wall < 4 * 6 * budget_s + 60  # no method ran far past its budget
    assert {"cpu_model", "cores", "torch_threads", "torch"} <= set(result["machine"])
    assert (tmp_path / "out" / f"accuracy_digits_budget{BUDGET_MIN:g}.png").stat().st_size > 0
    # smog's checkpoint is the one `smog eval knn` reads, and gives the same scores
    capsys.readouterr()
    assert smog_eval(["knn", str(tmp_path / "run" / "smog"), "train.threads=1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {k: report[k] for k in KEYS} == pytest.approx(result["methods"]["smog"]["knn"])


@pytest.mark.parametrize("name", ["smog", "byol"])
def test_training_gets_the_whole_budget_with_evaluations_off_the_clock(tmp_path, monkeypatch, name):
    """Timed from outside: the time from the call to the final evaluation, less the evaluations along the
    way (made slow here), is the budget (plus setup and the last step), however long they take."""
    if name == "byol":
        pytest.importorskip("lightly", reason="byol needs the lightly package")
    import bench.equal_time
    import smog.loop
    from smog.config import load_config
    from smog.loop import pick_device

    calls = []

    def slow_knn(*args, **kwargs):
        started = time.perf_counter()
        scores = real(*args, **kwargs)
        time.sleep(0.5)
        calls.append((started, time.perf_counter()))
        return scores

    real = bench.equal_time.knn_scores
    monkeypatch.setattr(bench.equal_time, "knn_scores", slow_knn)
    monkeypatch.setattr(smog.loop, "knn_scores", slow_knn)
    cfg = load_config("digits", [f"train.out_dir={tmp_path}", *DIGITS])
    budget = Budget(BUDGET_MIN, eval_every_minutes=BUDGET_MIN / 5)
    started = time.perf_counter()
    if name == "smog":
        bench.equal_time.train_smog_for(cfg, budget, str(tmp_path / name))
    else:
        bench.equal_time.train_lightly_for(name, cfg, budget, pick_device("cpu"), str(tmp_path / name))
    *along, (last, _) = calls
    assert len(along) >= 1
    trained = last - started - sum(end - begin for begin, end in along)
    assert 60 * BUDGET_MIN <= trained <= 60 * BUDGET_MIN + TOLERANCE_S + 1.0  # + setup (data, model)


def test_a_finished_method_is_not_run_again(tmp_path, capsys):
    pytest.importorskip("lightly", reason="byol needs the lightly package")
    rc, first = run(tmp_path, "--methods", "byol,raw pixels")
    assert rc == 0
    model = tmp_path / "run" / "byol" / "model.pt"
    written = model.stat().st_mtime_ns
    done = tmp_path / "run" / "byol" / "result.json"
    marked = {**json.loads(done.read_text()), "linear_top1": -1.0}  # a figure no run produces
    done.write_text(json.dumps(marked))
    os.remove(tmp_path / "run" / "raw_pixels" / "result.json")  # a method that did not finish
    rc, second = run(tmp_path, "--methods", "byol,raw pixels")
    assert rc == 0
    assert second["methods"]["byol"]["linear_top1"] == -1.0 and model.stat().st_mtime_ns == written
    assert second["methods"]["raw pixels"]["knn"] == first["methods"]["raw pixels"]["knn"]
    assert (tmp_path / "run" / "raw_pixels" / "result.json").exists()
    # a stored result measured otherwise is refused, not mixed in
    assert run(tmp_path, "--methods", "byol", "train.batch_size=32")[0] == 2
    assert "byol/result.json was measured with another budget or configuration" in capsys.readouterr().err


def test_without_lightly_asked_methods_are_an_error_and_default_ones_are_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lightly", None)  # import lightly now raises ImportError
    rc, result = run(tmp_path, "--methods", "raw pixels,swav")
    err = capsys.readouterr().err
    assert rc == 2 and result is None
    assert "--methods swav" in err and "pip install lightly" in err
    methods, skipped = accuracy.pick_methods(None)
    assert methods == ["smog", "random init", "raw pixels"]
    assert set(skipped) == {"lightly-smog", "byol", "swav"}
    assert all("lightly" in reason for reason in skipped.values())


def test_a_bad_budget_is_refused():
    with pytest.raises(SystemExit):
        accuracy.main(["--config", "digits", "--budget-minutes", "0"])
    with pytest.raises(ValueError, match="budget minutes"):
        Budget(-1.0)
