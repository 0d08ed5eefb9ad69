"""A wall-clock training budget: a clock that pauses while the model is evaluated or saved, the schedules'
progress over that clock, and the minutes at which an evaluation is due.

Time-based schedules: the step count a budget allows is unknown up front (it depends on the machine and
its load), so the per-step schedules of smog.schedules are called with total_steps = the count that puts
the current step at the fraction of the budget spent since the first step (Budget.total_steps). The
schedules then end where the budget ends, however fast the steps run; a warm-up given in epochs keeps its
length in steps.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Iterator


class Budget:
    """`minutes` of training time, and an evaluation due every `eval_every_minutes` of it (0: at the end only).

    points: the evaluations recorded along the way, [{"minutes", "step", "knn"}, ...].
    """

    def __init__(self, minutes: float, eval_every_minutes: float = 0.0):
        if not minutes > 0:
            raise ValueError(f"budget minutes must be positive, got {minutes}")
        if not eval_every_minutes >= 0:
            raise ValueError(f"eval_every_minutes must be 0 (at the end only) or positive, got {eval_every_minutes}")
        self.seconds = 60.0 * minutes
        self.every = 60.0 * eval_every_minutes
        self.points: list[dict] = []
        self._spent, self._since = 0.0, None
        self._next_eval = self.every or math.inf
        self._first: tuple[float, int] | None = None  # (seconds spent, step) at the first scheduled step

    def start(self) -> None:
        """Run the clock (again)."""
        if self._since is None:
            self._since = time.perf_counter()

    def stop(self) -> None:
        if self._since is not None:
            self._spent += time.perf_counter() - self._since
            self._since = None

    def spent(self) -> float:
        """Seconds of training time used so far."""
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

    def over(self) -> bool:
        return self.spent() >= self.seconds

    def eval_due(self) -> bool:
        """True once each time the clock passes the next multiple of eval_every_minutes before the end."""
        spent = self.spent()
        if spent < self._next_eval or spent >= self.seconds:
            return False
        while self._next_eval <= spent:
            self._next_eval += self.every
        return True

    def total_steps(self, step: int) -> int:
        """The total step count that puts `step` at the budget's progress p: the share of the time left at
        the first call that is spent since, so that step / total_steps = p (at least step + 1)."""
        spent = self.spent()
        if self._first is None:
            self._first = (spent, step)
        first_spent, first_step = self._first
        progress = (spent - first_spent) / (self.seconds - first_spent) if self.seconds > first_spent else 1.0
        if progress <= 0:
            return step + 1
        return max(step + 1, first_step + round((step - first_step) / progress))

    def record(self, step: int, knn: dict[str, float]) -> dict:
        """Append (and return) an evaluation point at the time spent so far."""
        point = {"minutes": self.spent() / 60.0, "step": step, "knn": knn}
        self.points.append(point)
        return point
