"""`bench/accuracy --budget-minutes`: every method trains for the budget and no longer, reports kNN at both
settings and a linear probe; a finished method is not run again; lightly's absence is said. bench/accuracy runs
as a command (its CLI, in a subprocess). The clock it rests on (smog.budget): tests/test_budget.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from smog.budget import Budget
from smog.commands.eval import main as smog_eval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_MIN = 0.05  # 3 s of training per method
# a method stops at the first step after the budget: digits steps take milliseconds (more on a loaded
# machine), smog's first step waits for its memory-bank fill and k-means
TOLERANCE_S = 1.5
DIGITS = ["data.augment_on=device", "eval.knn_k=[200,20]", "eval.knn_t=[0.1,0.07]", "eval.linear_epochs=3",
          "train.threads=1", "train.progress=false", "train.tensorboard=false"]
KEYS = {"k200_t0.1", "k20_t0.07"}
METHODS = ["smog", "lightly-smog", "byol", "swav", "random init", "raw pixels"]
# Runs bench/accuracy's CLI with every kNN evaluation made 0.5 s slower, and logs to argv[1] when the
# training clock first started, when each evaluation began and ended, and when each pause of the clock
# began and ended (time.perf_counter).
SLOW_KNN = """
import contextlib, json, runpy, sys, time
import smog.budget, smog.evaluation
log, real_knn = sys.argv.pop(1), smog.evaluation.knn_scores
real_start, real_paused = smog.budget.Clock.start, smog.budget.Clock.paused
events = {"start": None, "knn": [], "paused": []}
def start(self):
    if events["start"] is None:
        events["start"] = time.perf_counter()
    real_start(self)
@contextlib.contextmanager
def paused(self):
    began = time.perf_counter()
    with real_paused(self):
        yield
    events["paused"].append((began, time.perf_counter()))
def slow_knn(*args, **kwargs):
    began = time.perf_counter()
    scores = real_knn(*args, **kwargs)
    time.sleep(0.5)
    events["knn"].append((began, time.perf_counter()))
    with open(log, "w") as f:
        json.dump(events, f)
    return scores
smog.budget.Clock.start, smog.budget.Clock.paused, smog.evaluation.knn_scores = start, paused, slow_knn
sys.argv[0] = "bench/accuracy"
runpy.run_module("bench.accuracy", run_name="__main__")
"""


def accuracy_command(tmp_path, *args: str, no_lightly: bool = False,
                     program: list[str] | None = None) -> subprocess.CompletedProcess:
    """bench/accuracy on digits with the budget, run and output folders under tmp_path; `no_lightly`: with
    `import lightly` failing, as without the package."""
    path = [ROOT]
    if no_lightly:
        fake = tmp_path / "no_lightly" / "lightly"
        fake.mkdir(parents=True, exist_ok=True)
        (fake / "__init__.py").write_text("raise ImportError('no lightly in this test')\n")
        path.insert(0, str(fake.parent))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "MPLBACKEND": "Agg"}
    cmd = [sys.executable, *(program or ["-m", "bench.accuracy"]), "--config", "digits",
           "--budget-minutes", str(BUDGET_MIN), "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
           *args, *DIGITS]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def run(tmp_path, *args: str, **kwargs) -> tuple[int, dict | None, str]:
    """(exit status, the JSON written or None, stderr) of one bench/accuracy command."""
    done = accuracy_command(tmp_path, *args, **kwargs)
    path = tmp_path / "out" / f"accuracy_digits_budget{BUDGET_MIN:g}.json"
    result = json.loads(path.read_text()) if path.exists() else None
    if path.exists():
        path.unlink()  # the next command's JSON, if any, is its own
    return done.returncode, result, done.stderr


def test_every_method_trains_for_the_budget_and_reports_knn_and_a_linear_probe(tmp_path, capsys):
    pytest.importorskip("lightly", reason="lightly-smog, byol and swav need the lightly package")
    started = time.perf_counter()
    rc, result, err = run(tmp_path)
    wall = time.perf_counter() - started
    assert rc == 0, err
    assert list(result["methods"]) == METHODS and result["skipped"] == {}
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
    assert wall < 4 * 6 * budget_s + 60  # no method ran far past its budget (the command's start included)
    assert {"cpu_model", "cores", "torch_threads", "torch"} <= set(result["machine"])
    assert (tmp_path / "out" / f"accuracy_digits_budget{BUDGET_MIN:g}.png").stat().st_size > 0
    # smog's checkpoint is the one `smog eval knn` reads, and gives the same scores
    capsys.readouterr()
    assert smog_eval(["knn", str(tmp_path / "run" / "smog"), "train.threads=1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {k: report[k] for k in KEYS} == pytest.approx(result["methods"]["smog"]["knn"])


@pytest.mark.parametrize("name", ["smog", "byol"])
def test_training_gets_the_whole_budget_with_evaluations_off_the_clock(tmp_path, name):
    """Timed from outside: the time from the clock's start to the final evaluation, less the evaluations
    along the way (made slow here), is the budget (plus the last step), however long they take. The
    clock's other pauses (checkpoints, logs at epoch ends) are left out too, so that their time on a
    loaded machine does not count as training; a pause holding an evaluation counts as that evaluation."""
    if name == "byol":
        pytest.importorskip("lightly", reason="byol needs the lightly package")
    log = tmp_path / "events.json"
    done = accuracy_command(tmp_path, "--methods", name, "--eval-every-minutes", str(BUDGET_MIN / 5),
                            program=["-c", SLOW_KNN, str(log)])
    assert done.returncode == 0, done.stderr
    events = json.loads(log.read_text())
    *along, (last, _) = events["knn"]
    assert len(along) >= 1
    others = [(begin, end) for begin, end in events["paused"] if end <= last
              and not any(begin <= k0 and k1 <= end for k0, k1 in events["knn"])]
    assert all(a1 <= b0 or b1 <= a0 for a0, a1 in others for b0, b1 in others if (a0, a1) != (b0, b1))  # not nested
    trained = last - events["start"] - sum(end - begin for begin, end in [*along, *others])
    assert 60 * BUDGET_MIN <= trained <= 60 * BUDGET_MIN + TOLERANCE_S + 1.0


def test_a_finished_method_is_not_run_again(tmp_path):
    pytest.importorskip("lightly", reason="byol needs the lightly package")
    rc, first, err = run(tmp_path, "--methods", "byol,raw pixels")
    assert rc == 0, err
    model = tmp_path / "run" / "byol" / "model.pt"
    written = model.stat().st_mtime_ns
    done = tmp_path / "run" / "byol" / "result.json"
    marked = {**json.loads(done.read_text()), "linear_top1": -1.0}  # a figure no run produces
    done.write_text(json.dumps(marked))
    os.remove(tmp_path / "run" / "raw_pixels" / "result.json")  # a method that did not finish
    rc, second, err = run(tmp_path, "--methods", "byol,raw pixels")
    assert rc == 0, err
    assert second["methods"]["byol"]["linear_top1"] == -1.0 and model.stat().st_mtime_ns == written
    assert second["methods"]["raw pixels"]["knn"] == first["methods"]["raw pixels"]["knn"]
    assert (tmp_path / "run" / "raw_pixels" / "result.json").exists()
    # a stored result measured otherwise is refused, not mixed in
    rc, _, err = run(tmp_path, "--methods", "byol", "train.batch_size=32")
    assert rc == 2
    assert "byol/result.json was measured with another budget or configuration" in err


def test_without_lightly_asked_methods_are_an_error_and_default_ones_are_skipped(tmp_path):
    rc, result, err = run(tmp_path, "--methods", "raw pixels,swav", no_lightly=True)
    assert rc == 2 and result is None
    assert "--methods swav" in err and "pip install lightly" in err
    rc, result, err = run(tmp_path, no_lightly=True)
    assert rc == 0, err
    assert list(result["methods"]) == ["smog", "random init", "raw pixels"]
    assert set(result["skipped"]) == {"lightly-smog", "byol", "swav"}
    assert all("lightly" in reason for reason in result["skipped"].values())


def test_a_bad_budget_is_refused():
    done = subprocess.run([sys.executable, "-m", "bench.accuracy", "--config", "digits", "--budget-minutes", "0"],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and "--budget-minutes must be positive" in done.stderr
    with pytest.raises(ValueError, match="budget minutes"):
        Budget(-1.0)
