"""`bench/train_step`: where one training step's time goes, phase by phase, for a recipe and its variants.

    bench/train_step [--config NAME] [--compare KEY=V1,V2,...] [--steps S] [--warmup W] [--out DIR]
                     [section.key=value ...]

Builds the real training pieces (`smog.loop.Trainer`: model, data, loader or device crops, optimiser,
memory bank) for the recipe (default: quickstart, with `section.key=value` overrides as in `smog train`),
and runs `Trainer.train_step` itself on batches from the trainer's own loader, timing each phase with
wall-clock perf_counter stamps taken by hooks around the trainer's pieces (no copy of the step's code):

  crops             next batch from the DataLoader (the loader's per-image crops, data.augment_on=loader)
                    + Trainer._crops (to the device, memory format; the batch crops, augment_on=device)
  online forward    the online network on every q crop (forward hooks)
  momentum forward  the momentum network on the k crops (forward hooks)
  grouping step     every head's smog_kernels.grouping_step call, or its CUDA graph (method.cuda_graphs):
                    assignment, statistics, group update, loss and its gradient, summed over heads
  backward          from optimizer.zero_grad() returning to optimizer.step() starting (loss.backward(),
                    gradient clipping when optim.grad_clip > 0)
  optimiser + EMA   optimizer.step() and the momentum network's EMA update
  other             the rest of the step: schedules, loss readback, group copy, memory-bank write, meters

On CUDA every stamp is taken after torch.cuda.synchronize(), so a phase owns the kernels it launched.
Nothing is written under train.out_dir: no bank fill, k-means, checkpoint or kNN runs (those are per-epoch
costs, not per step); the groups stay at their random initialisation, which does not change a step's cost.

`--compare KEY=V1,V2` builds one trainer per value and interleaves their steps (round by round, the order
rotating), so that drift of the machine hits every variant alike; the table gives per-phase medians and
IQRs and each variant's ratio to the first. Values are split on `|` when the list holds one, else on `,`.
Writes DIR/train_step_<config>[_<KEY>].json and .png (stacked bars of the phase medians).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch

PHASES = ("crops", "online forward", "momentum forward", "grouping step", "backward", "optimiser + EMA", "other")
TIMED = PHASES[:-1]
CROP_PARTS = ("loader", "batch_crops")  # the two spans that make up "crops"
QUIET_CORES = 0.25  # a step counts as quiet when other processes kept fewer cores busy than this


class PhaseClock:
    """Wall-clock spans of named phases within one step (synchronising CUDA before each stamp)."""

    def __init__(self, sync: Callable[[], None] | None = None):
        self.sync = sync
        self.spans: list[tuple[str, float, float]] = []
        self.open: dict[str, float] = {}

    def now(self) -> float:
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    def begin(self, name: str) -> None:
        if name in self.open:
            raise RuntimeError(f"phase {name!r} began twice without ending")
        self.open[name] = self.now()

    def end(self, name: str) -> None:
        if name not in self.open:
            raise RuntimeError(f"phase {name!r} ended without beginning")
        self.spans.append((name, self.open.pop(name), self.now()))

    def wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.begin(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.end(name)
        return timed


class _Active:
    """The clock of the variant whose step is running (smog_kernels.grouping_step is patched once for all)."""
    clock: PhaseClock | None = None


def _patch_grouping_step():
    """Time every grouping step: smog_kernels.grouping_step (smog.method calls it through the module
    attribute) and GraphedGroupingStep.__call__ (method.cuda_graphs); a call inside another is not
    counted again. Returns the undo."""
    import smog_kernels
    from smog_kernels.graphed_step import GraphedGroupingStep

    def timing(original):
        @functools.wraps(original)
        def timed(*args, **kwargs):
            clock = _Active.clock
            if clock is None or "grouping step" in clock.open:
                return original(*args, **kwargs)
            clock.begin("grouping step")
            try:
                return original(*args, **kwargs)
            finally:
                clock.end("grouping step")
        return timed

    eager, graphed = smog_kernels.grouping_step, GraphedGroupingStep.__call__
    smog_kernels.grouping_step, GraphedGroupingStep.__call__ = timing(eager), timing(graphed)

    def undo():
        smog_kernels.grouping_step, GraphedGroupingStep.__call__ = eager, graphed
    return undo


class Variant:
    """One config's Trainer with hooks at the phase boundaries, stepping through its own loader."""

    def __init__(self, label: str, overrides: list[str], cfg):
        from smog.loop import Trainer

        self.label, self.overrides, self.cfg = label, overrides, cfg
        self.trainer = t = Trainer(cfg)
        self.threads = cfg.train.threads or torch.get_num_threads()
        self.clock = clock = PhaseClock(torch.cuda.synchronize if t.device.type == "cuda" else None)
        self.handles = []
        for name, module in (("online forward", t.online), ("momentum forward", t.model.momentum)):
            self.handles.append(module.register_forward_pre_hook(lambda _m, _a, n=name: clock.begin(n)))
            self.handles.append(module.register_forward_hook(lambda _m, _a, _o, n=name: clock.end(n)))
        t._crops = clock.wrap("batch_crops", t._crops)
        zero_grad, opt_step, ema = t.optimizer.zero_grad, t.optimizer.step, t.model.ema_update

        def zero_grad_then_backward(*args, **kwargs):
            out = zero_grad(*args, **kwargs)
            clock.begin("backward")
            return out

        def optimizer_step(*args, **kwargs):
            clock.end("backward")
            clock.begin("optimiser + EMA")
            return opt_step(*args, **kwargs)

        def ema_update(*args, **kwargs):
            out = ema(*args, **kwargs)
            clock.end("optimiser + EMA")
            return out

        t.optimizer.zero_grad, t.optimizer.step, t.model.ema_update = zero_grad_then_backward, optimizer_step, ema_update
        self.batches = iter(t._batches(t.epoch, 0))
        self.records: list[dict] = []

    def _next_batch(self) -> dict:
        try:
            return next(self.batches)
        except StopIteration:  # a new epoch: its loader (workers start again) counts in this step's crops
            t = self.trainer
            t.epoch += 1
            t.step_in_epoch = 0
            self.batches = iter(t._batches(t.epoch, 0))
            return next(self.batches)

    def step(self) -> dict:
        """One timed training step; returns {phase: seconds, "total": seconds, part: seconds}."""
        torch.set_num_threads(self.threads)
        clock, t = self.clock, self.trainer
        clock.spans.clear()
        _Active.clock = clock
        busy_before, own_before = machine_busy_s(), own_cpu_s()
        try:
            start = clock.now()
            clock.begin("loader")
            batch = self._next_batch()
            clock.end("loader")
            t.train_step(batch)
            t.step += 1
            t.step_in_epoch += 1
            stop = clock.now()
        finally:
            _Active.clock = None
            clock.open.clear()
        busy_after, own_after = machine_busy_s(), own_cpu_s()
        times = {name: 0.0 for name in (*TIMED, *CROP_PARTS)}
        calls = {name: 0 for name in times}
        for name, begin, end in clock.spans:
            times[name] += end - begin
            calls[name] += 1
        expected = {"loader": 1, "batch_crops": 1, "online forward": 1, "momentum forward": 1,
                    "grouping step": self.cfg.method.heads, "backward": 1, "optimiser + EMA": 1}
        wrong = {name: calls[name] for name, n in expected.items() if calls[name] != n}
        if wrong:
            raise RuntimeError(f"a training step made {wrong} calls where {expected} were expected: "
                               f"Trainer.train_step changed shape; update bench/train_step.py")
        times["crops"] = times["loader"] + times["batch_crops"]
        times["total"] = stop - start
        times["other"] = times["total"] - sum(times[name] for name in TIMED)
        # CPU cores other processes kept busy during this step (clock-tick resolution: +-0.1 core or so
        # at 0.2 s per step; indicative only for short steps)
        times["others_cores"] = (None if busy_before is None or busy_after is None else
                                 max(0.0, (busy_after - busy_before) - (own_after - own_before)) / times["total"])
        return times

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def summarise(variant: Variant) -> dict:
    steps = variant.records
    summary = {"label": variant.label, "overrides": variant.overrides, "threads": variant.threads,
               "batch_size": variant.trainer.batch_size, "device": str(variant.trainer.device),
               "augment_on": variant.cfg.data.augment_on, "workers": variant.cfg.data.workers,
               "median_s": {}, "iqr_s": {}}
    for name in (*PHASES, "total", *CROP_PARTS):
        q1, q2, q3 = _quartiles([s[name] for s in steps])
        summary["median_s"][name], summary["iqr_s"][name] = q2, [q1, q3]
    summary["images_per_s"] = variant.trainer.batch_size / summary["median_s"]["total"]
    quiet = [s for s in steps if s["others_cores"] is not None and s["others_cores"] < QUIET_CORES]
    summary["quiet_steps"] = len(quiet)  # steps during which other processes used < QUIET_CORES cores
    summary["quiet_median_s"] = ({name: statistics.median(s[name] for s in quiet) for name in (*PHASES, "total")}
                                 if quiet else None)
    from smog.config import to_dict

    summary["resolved_config"] = to_dict(variant.cfg)
    summary["steps_s"] = steps
    return summary


def source_version() -> dict:
    """The checkout's commit and whether tracked files differ from it (None outside a git checkout)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                 capture_output=True, text=True, timeout=10, check=True).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "modified": None}
    return {"commit": commit, "modified": sorted(line[3:] for line in changed if line.strip())}


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (Linux): other jobs on the machine show up here, not in the medians."""
    try:
        with open("/proc/loadavg") as handle:
            return [float(x) for x in handle.read().split()[:3]]
    except (OSError, ValueError):
        return None


def machine_busy_s() -> float | None:
    """CPU seconds all processes of the machine have spent busy since boot (Linux /proc/stat)."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
        return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def parse_compare(text: str | None) -> tuple[str | None, list[str]]:
    if not text:
        return None, []
    if "=" not in text:
        raise ValueError(f"--compare must look like section.key=V1,V2, got {text!r}")
    key, values = text.split("=", 1)
    items = [v.strip() for v in values.split("|" if "|" in values else ",") if v.strip()]
    if len(items) < 2:
        raise ValueError(f"--compare {text!r}: give at least two values")
    return key.strip(), items


def run(config: str = "quickstart", overrides: list[str] | None = None, compare: str | None = None,
        steps: int = 40, warmup: int = 5) -> dict:
    """The breakdown as a dict (the JSON written by main)."""
    from smog.benchmarks.kernels import machine
    from smog.config import load_config

    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    overrides = list(overrides or [])
    key, values = parse_compare(compare)
    plans = [(f"{key}={v}", [*overrides, f"{key}={v}"]) for v in values] if key else [("base", overrides)]
    default_threads = torch.get_num_threads()
    restore = _patch_grouping_step()
    variants: list[Variant] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_before = load_average()
    busy_before, own_before, wall_before = machine_busy_s(), own_cpu_s(), time.perf_counter()
    try:
        for label, extra in plans:
            torch.set_num_threads(default_threads)  # each Trainer sets train.threads itself
            variants.append(Variant(label, extra, load_config(config, extra)))
        for _ in range(warmup):
            for variant in variants:
                variant.step()
        for round_ in range(steps):  # interleaved, the order rotating each round
            for i in range(len(variants)):
                variant = variants[(i + round_) % len(variants)]
                variant.records.append(variant.step())
    finally:
        restore()
        for variant in variants:
            variant.close()
        torch.set_num_threads(default_threads)
    device = variants[0].trainer.device
    busy_after, wall = machine_busy_s(), time.perf_counter() - wall_before
    others = (None if busy_before is None or busy_after is None
              else max(0.0, (busy_after - busy_before) - (own_cpu_s() - own_before)) / wall)
    result = {
        "benchmark": "train_step", "config": variants[0].cfg.name, "compare": key,
        "overrides": overrides, "machine": machine(), "device": str(device), "source": source_version(),
        "clock": "wall clock (time.perf_counter)" + (", torch.cuda.synchronize() before every stamp"
                                                     if device.type == "cuda" else ""),
        "warmup_steps": warmup, "steps": steps, "interleaved": "one step per variant per round, order rotating",
        "phases": list(PHASES), "started": started, "load_average_before": load_before,
        "load_average_after": load_average(),
        "other_processes_cores": others,  # mean CPU cores busy outside this process during the run
        "quiet_below_cores": QUIET_CORES,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "notes": ["crops = loader (next batch from the DataLoader) + batch_crops (Trainer._crops)",
                  "backward = optimizer.zero_grad() return .. optimizer.step() start (incl. gradient clipping)",
                  "other = step total - the timed phases (schedules, loss readback, group copy, bank write, meters)",
                  "no bank fill, k-means, checkpoint or kNN; groups at their random initialisation"],
        "variants": [summarise(v) for v in variants],
    }
    first = result["variants"][0]["median_s"]
    for summary in result["variants"]:
        summary["ratio_to_first"] = {name: (summary["median_s"][name] / first[name] if first[name] > 0 else None)
                                     for name in (*PHASES, "total")}
    return result


def table(result: dict) -> str:
    variants = result["variants"]
    width = max(24, *(len(v["label"]) + 2 for v in variants))
    head = f"{'phase (median ms)':<18}" + "".join(f"{v['label']:>{width}}" for v in variants)
    if len(variants) > 1:
        head += "".join(f"{'x ' + str(i + 1) + '/1':>9}" for i in range(1, len(variants)))
    lines = [head, "-" * len(head)]
    for name in (*PHASES, "total"):
        if name == "total":
            lines.append("-" * len(head))
        cells = []
        for v in variants:
            q1, q3 = v["iqr_s"][name]
            cells.append(f"{v['median_s'][name] * 1e3:.1f} [{q1 * 1e3:.1f}-{q3 * 1e3:.1f}]")
        row = f"{name:<18}" + "".join(f"{c:>{width}}" for c in cells)
        for v in variants[1:]:
            r = v["ratio_to_first"][name]
            row += f"{r:>9.2f}" if r is not None else f"{'-':>9}"
        lines.append(row)
    lines.append(f"{'sum of medians':<18}" + "".join(f"{sum(v['median_s'][p] for p in PHASES) * 1e3:>{width}.1f}"
                                                   for v in variants))
    lines.append(f"{'images / s':<18}" + "".join(f"{v['images_per_s']:>{width}.0f}" for v in variants))
    quiet = [(v["quiet_median_s"]["total"] * 1e3 if v["quiet_median_s"] else None, v["quiet_steps"]) for v in variants]
    lines.append(f"{'total, quiet steps':<18}" + "".join(
        f"{(f'{t:.1f}' if t is not None else '-') + f' ({n} steps)':>{width}}" for t, n in quiet))
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = result["variants"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.8 * len(variants) + 3.5), 4.8))
    labels = [v["label"] for v in variants]
    bottoms = [0.0] * len(variants)
    colours = plt.get_cmap("tab10").colors
    for j, name in enumerate(PHASES):
        heights = [v["median_s"][name] * 1e3 for v in variants]
        ax.bar(labels, heights, 0.6, bottom=bottoms, label=name, color=colours[j % len(colours)])
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for i, v in enumerate(variants):
        note = f"{v['median_s']['total'] * 1e3:.0f} ms"
        if i:
            note += f"\n{v['ratio_to_first']['total']:.2f}x"
        ax.annotate(note, (i, bottoms[i]), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, max(bottoms) * 1.18)
    m = result["machine"]
    ax.set(ylabel="median ms per step (phase medians, stacked)",
           title=f"train step: {result['config']}, {result['device']}, {m['cpu']}\n"
                 f"torch threads {', '.join(sorted({str(v['threads']) for v in variants}))}, "
                 f"medians of {result['steps']} interleaved steps")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(result: dict, out_dir: str) -> str:
    """Writes DIR/train_step_<config>[_<compare key>].json and .png; returns the path stem."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"train_step_{result['config']}" + (f"_{result['compare']}" if result["compare"] else ""))
    with open(stem + ".json", "w") as handle:
        json.dump(result, handle, indent=1)
    plot(result, stem + ".png")
    return stem


def main(argv: list[str] | None = None) -> int:
    from smog.config import ConfigError
    from smog.data import DatasetNotFound

    parser = argparse.ArgumentParser(prog="bench/train_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="quickstart", help="packaged recipe name or YAML path")
    parser.add_argument("--compare", default=None, metavar="KEY=V1,V2",
                        help="one trainer per value of this config key, steps interleaved (e.g. "
                             "model.channels_last=false,true or data.augment_on=loader,device)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first (default 5)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied to every variant")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = run(args.config, args.overrides, args.compare, args.steps, args.warmup)
    except (ConfigError, DatasetNotFound, ValueError) as error:
        print(f"bench/train_step: error: {error}", file=sys.stderr)
        return 2
    m = result["machine"]
    print(f"machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}; device {result['device']}; "
          f"config {result['config']}; {result['warmup_steps']} warm-up + {result['steps']} timed steps per "
          f"variant, interleaved; wall-clock medians [IQR] in ms")
    print(table(result))
    others = result["other_processes_cores"]
    if others is not None:
        print(f"other processes kept {others:.2f} of {m['logical_cpus']} CPUs busy on average during the run"
              + (": the machine was not idle, absolute times are inflated (ratios less so: steps interleaved)"
                 if others > 0.1 else ""))
    stem = write(result, args.out)
    print(f"wrote {stem}.json and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
