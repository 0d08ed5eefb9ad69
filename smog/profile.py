"""Named phases of a training step, and their times from torch.profiler.

The loop and the method mark each phase of a step with `phase(name)` (a torch.profiler.record_function:
nearly free when no profiler runs). `phase_times(profiler)` reads a finished profile back as the time
of every phase in every step; `train.profile: S` makes `smog train` profile S steps after a warm-up and
write profile/phases.json (per-phase medians) and a trace that TensorBoard's profiler plugin opens.
On CUDA a phase's time is the device time of the kernels it launched, elsewhere its wall time.
"""
from __future__ import annotations

import bisect
import contextlib
import json
import os
import statistics
from typing import Iterator

import torch
from torch.profiler import ProfilerActivity, profile, record_function

PREFIX = "smog/"
STEP = "step"  # the phase that spans one whole optimiser step
PHASES = ("loader", "crops", "online forward", "momentum forward", "grouping step", "backward", "optimizer",
          "after step")


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Marks the enclosed code as phase `name` of the current step."""
    with record_function(PREFIX + name):
        yield


def profiler(device: torch.device, trace_dir: str | None = None) -> profile:
    """A torch.profiler recording CPU (and CUDA) activity; with trace_dir, a TensorBoard trace is written
    there when it stops."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    handler = torch.profiler.tensorboard_trace_handler(trace_dir) if trace_dir else None
    return profile(activities=activities, on_trace_ready=handler)


def _duration_us(event, device: bool) -> float:
    if device:
        return float(event.device_time_total)
    return float(event.time_range.end - event.time_range.start)


def phase_times(prof: profile, device: bool = False) -> list[dict[str, float]]:
    """Seconds of every phase in every profiled step, in step order: [{"step": s, "loader": s, ...}]. A phase
    entered several times in a step (once per sub-batch) adds up; a phase outside any step is left out
    (the loader's, which runs before its step, is counted with the step it feeds)."""
    events = [e for e in prof.events() if e.name.startswith(PREFIX)]
    steps = sorted((e for e in events if e.name == PREFIX + STEP), key=lambda e: e.time_range.start)
    times: list[dict[str, float]] = [{name: 0.0 for name in (STEP, *PHASES)} for _ in steps]
    starts = [s.time_range.start for s in steps]
    for event in events:
        name = event.name[len(PREFIX):]
        if name not in PHASES:
            continue
        if name == "loader":  # fetched just before the step it feeds
            i = bisect.bisect_left(starts, event.time_range.end)
        else:
            i = bisect.bisect_right(starts, event.time_range.start) - 1
            i = i if i >= 0 and event.time_range.start <= steps[i].time_range.end else len(steps)
        if i < len(steps):
            times[i][name] += _duration_us(event, device) * 1e-6
    for i, step in enumerate(steps):
        times[i][STEP] = _duration_us(step, device) * 1e-6
    return times


def medians(times: list[dict[str, float]]) -> dict[str, float]:
    """Per-phase medians (seconds) over steps, and "other": the step's median minus the phases' inside it."""
    out = {name: statistics.median(t[name] for t in times) for name in (STEP, *PHASES)}
    inside = [t[STEP] - sum(t[name] for name in PHASES if name != "loader") for t in times]
    out["other"] = statistics.median(inside)
    return out


def write(times: list[dict[str, float]], folder: str) -> str:
    """profile/phases.json (every step, and the medians) and a text table; returns the table."""
    os.makedirs(folder, exist_ok=True)
    mid = medians(times)
    with open(os.path.join(folder, "phases.json"), "w") as out:
        json.dump({"median_s": mid, "steps": times}, out, indent=1)
    lines = [f"{'phase':<18}{'median ms':>12}"] + [f"{name:<18}{mid[name] * 1e3:>12.2f}" for name in
                                                   (*PHASES, "other", STEP)]
    table = "\n".join(lines)
    with open(os.path.join(folder, "phases.txt"), "w") as out:
        out.write(table + "\n")
    return table
