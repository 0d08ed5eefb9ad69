"""Training time (smog.budget.Clock) and runs that fit a time limit (train.minutes): the schedules laid over
the time by hand-computed step counts, a budgeted digits run that ends on time with its schedules at their
end values, and the same run interrupted and resumed, which continues its clock and its schedules."""
from __future__ import annotations

import time

import pytest

from smog.budget import Budget, Clock
from smog.schedules import learning_rate
from tests.training import make_trainer

MINUTES = 0.1  # 6 s of training time
SLACK_S = 5.0  # a run stops at the first step after its budget; a step of this tiny run is far shorter


def test_the_clock_stands_still_while_paused_and_starts_from_a_saved_reading():
    clock = Clock(2.0)
    started = time.perf_counter()
    clock.start()
    time.sleep(0.1)
    with clock.paused():
        time.sleep(0.3)
    time.sleep(0.1)
    clock.stop()
    outside = time.perf_counter() - started - 0.3
    assert 2.2 <= clock.spent() <= 2.0 + outside + 0.05
    with clock.paused():  # pausing a stopped clock leaves it stopped
        pass
    assert clock.spent() == clock.spent()


def test_total_steps_puts_each_step_at_the_share_of_the_time_spent_since_the_first_step():
    budget = Budget(1.0)  # 60 s
    assert budget.total_steps(0, 10.0) == 1  # the first step (10 s went to a bank fill): progress 0
    assert budget.total_steps(10, 35.0) == 20  # (35 - 10) / (60 - 10) = 0.5 of the time: step 10 of 20
    assert budget.total_steps(30, 47.5) == 40  # 0.75 of the time at step 30
    assert budget.total_steps(41, 60.0) == 42  # at the end: never below step + 1
    restored = Budget(1.0)
    restored.load_state_dict(budget.state_dict())
    assert restored.total_steps(10, 35.0) == 20  # the first step's reading travels with a checkpoint
    assert budget.over(60.0) and not budget.over(59.9)
    with pytest.raises(ValueError, match="must be positive"):
        Budget(0.0)


def test_a_running_clock_counts_from_zero_and_from_its_start():
    clock = Clock()
    assert clock.spent() == 0.0
    clock.start()
    time.sleep(0.05)
    clock.start()  # starting a running clock keeps its start
    time.sleep(0.05)
    running = clock.spent()
    assert 0.1 <= running < 5.0


def test_total_steps_counts_from_the_first_scheduled_step_whatever_its_number():
    budget = Budget(1.0)  # 60 s
    assert budget.state_dict() == {"first": None}
    fresh = Budget(1.0)
    fresh.load_state_dict(budget.state_dict())  # a checkpoint taken before the first step
    assert fresh.first is None and fresh.total_steps(100, 0.0) == 101
    assert fresh.total_steps(110, 30.0) == 120  # a resumed run's first step 100: half the time, 10 steps since
    half = Budget(0.5)
    assert half.seconds == 30.0 and half.over(30.0) and not half.over(29.9)
    late = Budget(1.0)
    assert late.total_steps(5, 60.0) == 6  # its first step comes with the budget spent: progress 1
    assert late.total_steps(8, 61.0) == 9


def steps(trainer) -> list[dict]:
    return [r for r in trainer.log.records() if r["kind"] == "step"]


def budgeted(tmp_path, *extra: str):
    return make_trainer(tmp_path, f"train.minutes={MINUTES}", "train.log_every=1", "train.batch_size=32",
                        "data.train_subset=128", "data.augment_on=device",
                        "train.checkpoint_every_steps=20", "eval.knn_train_subset=100", "eval.knn_test_subset=50",
                        "train.threads=1", *extra)


def test_a_budgeted_run_ends_on_time_with_its_schedules_at_their_end_values(tmp_path):
    every = MINUTES / 4
    trainer = budgeted(tmp_path, f"eval.knn_every_minutes={every}")
    final = trainer.fit()
    marks = [r for r in trainer.log.records() if r["kind"] == "knn"]  # kNN along the way: once per mark passed
    assert 1 <= len(marks) <= 3 and all(r["minutes"] < MINUTES for r in marks)
    passed = [int(r["minutes"] // every) for r in marks]
    assert all(p >= 1 for p in passed) and passed == sorted(set(passed))
    assert MINUTES <= final["minutes"] < MINUTES + SLACK_S / 60
    assert final["step"] == trainer.progress.step > trainer.progress.steps_per_epoch  # ran past an epoch
    records = steps(trainer)
    assert [r["step"] for r in records] == list(range(1, final["step"] + 1))
    cfg, last = trainer.cfg, records[-1]
    total = trainer.progress.total_steps
    assert last["step"] / total > 0.9  # the last step sits at the end of the schedules
    start_lr = learning_rate(cfg.optim, 0, trainer.progress.steps_per_epoch, total)
    assert abs(last["lr"] - cfg.optim.final_lr) < 0.05 * (start_lr - cfg.optim.final_lr)
    assert abs(last["beta"] - cfg.method.beta_end) < 0.05 * (cfg.method.beta_start - cfg.method.beta_end)


def test_an_interrupted_budgeted_run_resumes_its_clock_and_schedules(tmp_path):
    first = budgeted(tmp_path)
    first.fit(stop_after_steps=first.progress.steps_per_epoch + 3)  # interrupted mid-epoch 1, checkpointed
    stopped_at, seconds = first.progress.step, first.clock.spent()
    before = steps(first)
    del first
    time.sleep(1.0)  # time between the runs is not training time
    resumed = budgeted(tmp_path)
    assert resumed.resume("auto") and resumed.progress.step == stopped_at
    assert resumed.clock.spent() == pytest.approx(seconds, abs=0.01)  # the training time, not the pause
    final = resumed.fit()
    assert MINUTES <= final["minutes"] < MINUTES + SLACK_S / 60  # training time of both runs together
    after = steps(resumed)
    assert after[:len(before)] == before  # the log kept the first run's records
    lrs = [r["lr"] for r in after]
    jumps = [abs(b - a) for a, b in zip(lrs, lrs[1:])]
    at_resume = jumps[stopped_at - 1]  # between the last step before and the first step after
    span = max(lrs) - min(lrs)
    assert at_resume <= 0.1 * span, (at_resume, span)
    assert abs(after[-1]["lr"] - resumed.cfg.optim.final_lr) < 0.05 * span
