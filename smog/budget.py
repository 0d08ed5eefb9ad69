"""Training time, and runs that fit a time limit (train.minutes).

`Clock` measures training time: it runs while the loop trains (steps, the memory-bank fill, re-clustering)
and stands still while it evaluates, logs or saves. A checkpoint keeps its reading, so a resumed run goes
on from the same time.

`Budget` lays the schedules over M minutes of training time: the step count a budget allows is unknown up
front (it depends on the machine and its load), so the per-step schedules of smog.schedules are called with
total_steps = the count that puts the current step at the share of the budget spent since the first step
(Budget.total_steps). The schedules then end where the budget ends, however fast the steps run; a warm-up
given in epochs keeps its length in steps.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator


class Clock:
    """Seconds of training time: start() and stop() it, or pause it for a block with paused()."""

    def __init__(self, seconds: float = 0.0):
        self._spent, self._since = seconds, None

    def start(self) -> None:
        if self._since is None:
            self._since = time.perf_counter()

    def stop(self) -> None:
        if self._since is not None:
            self._spent += time.perf_counter() - self._since
            self._since = None

    def spent(self) -> float:
        running = time.perf_counter() - self._since if self._since is not None else 0.0
        return self._spent + running

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The clock stands still inside the block (and runs again after it if it ran before)."""
        running = self._since is not None
        self.stop()
        try:
            yield
        finally:
            if running:
                self.start()


class Budget:
    """`minutes` of training time: when the run ends and how long its schedules are."""

    def __init__(self, minutes: float):
        if not minutes > 0:
            raise ValueError(f"budget minutes must be positive, got {minutes}")
        self.seconds = 60.0 * minutes
        self.first: tuple[float, int] | None = None  # (seconds spent, step) at the first scheduled step

    def over(self, spent: float) -> bool:
        return spent >= self.seconds

    def total_steps(self, step: int, spent: float) -> int:
        """The total step count that puts `step` at the budget's progress p: the share of the time left at
        the first call that is spent since, so that step / total_steps = p (at least step + 1)."""
        if self.first is None:
            self.first = (spent, step)
        first_spent, first_step = self.first
        progress = (spent - first_spent) / (self.seconds - first_spent) if self.seconds > first_spent else 1.0
        if progress <= 0:
            return step + 1
        return max(step + 1, first_step + round((step - first_step) / progress))

    def state_dict(self) -> dict:
        return {"first": list(self.first) if self.first is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.first = tuple(state["first"]) if state["first"] is not None else None
