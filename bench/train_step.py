"""`bench/train_step`: where one training step's time goes, phase by phase, for a recipe and its variants.

    bench/train_step [--config NAME] [--compare KEY=V1,V2,...] [--steps S] [--warmup W] [--out DIR]
                     [section.key=value ...]

Builds the real training loop (`smog.loop.Trainer`: model, data, loader or device crops, optimiser, memory
bank) for the recipe (default: quickstart, with `section.key=value` overrides as in `smog train`) and runs
`Trainer.step` on batches from its own loader, each step under torch.profiler. The phases are the ones the
loop and the method name with `smog.profile.phase` (read back by `smog.profile.phase_times`):

  loader            next batch from the DataLoader (the loader's per-image crops, data.augment_on=loader)
  crops             the batch's crops on the device (made there, data.augment_on=device)
  online forward    the online network on every q crop
  momentum forward  the momentum network on the target crops
  grouping step     every head's targets, assignment, statistics, group update and loss (smog_kernels.Grouping)
  backward          loss.backward()
  optimizer         gradient clipping and optimizer.step()
  after step        the momentum network's EMA, memory-bank writes, group meters
  other             the rest of the step: schedules, loss readback
total = loader + the step. On CUDA a phase's time is the device time of its kernels, elsewhere wall time.
Nothing is written under train.out_dir: no bank fill, k-means, checkpoint or kNN runs (those are per-epoch
costs, not per step); the groups stay at their random initialisation, which does not change a step's cost.

`--compare KEY=V1,V2` builds one trainer per value and interleaves their steps (round by round, the order
rotating), so that drift of the machine hits every variant alike; the table gives per-phase medians and
IQRs and each variant's ratio to the first. Values are split on `|` when the list holds one, else on `,`.
Writes DIR/train_step_<config>[_<KEY>].json and .png (stacked bars of the phase medians).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from smog import profile

PHASES = (*profile.PHASES, "other")
QUIET_CORES = 0.25  # a step counts as quiet when other processes kept fewer cores busy than this


class Variant:
    """One config's Trainer stepping through its own loader, each step profiled."""

    def __init__(self, label: str, overrides: list[str], cfg):
        from smog.loop import Trainer

        self.label, self.overrides, self.cfg = label, overrides, cfg
        self.trainer = Trainer(cfg)
        self.threads = cfg.train.threads or torch.get_num_threads()
        self.epoch = 0
        self.batches = self._epoch_batches()
        self.records: list[dict] = []

    def _epoch_batches(self):
        return iter(self.trainer.data.batches(self.epoch, self.trainer.batch_size))

    def _next_batch(self) -> dict:
        batch = next(self.batches, None)
        if batch is None:  # a new epoch: its loader (workers start again) counts in this step's loader phase
            self.epoch += 1
            self.batches = self._epoch_batches()
            batch = next(self.batches)
        return batch

    def step(self) -> dict:
        """One profiled training step; returns {phase: seconds, "total": seconds, "others_cores": cores}."""
        torch.set_num_threads(self.threads)
        device = self.trainer.device
        busy_before, own_before, wall_before = machine_busy_s(), own_cpu_s(), time.perf_counter()
        with profile.profiler(device) as prof:
            with profile.phase("loader"):
                batch = self._next_batch()
            self.trainer.step(batch)
        wall = time.perf_counter() - wall_before
        busy_after, own_after = machine_busy_s(), own_cpu_s()
        (times,) = profile.phase_times(prof, device.type == "cuda")
        times["other"] = times[profile.STEP] - sum(times[name] for name in profile.PHASES if name != "loader")
        times["total"] = times[profile.STEP] + times["loader"]
        # CPU cores other processes kept busy during this step (clock-tick resolution; indicative only)
        times["others_cores"] = (None if busy_before is None or busy_after is None else
                                 max(0.0, (busy_after - busy_before) - (own_after - own_before)) / wall)
        return times


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def summarise(variant: Variant) -> dict:
    from smog.config import to_dict

    steps = variant.records
    summary = {"label": variant.label, "overrides": variant.overrides, "threads": variant.threads,
               "batch_size": variant.trainer.batch_size, "device": str(variant.trainer.device),
               "augment_on": variant.cfg.data.augment_on, "workers": variant.cfg.data.workers,
               "median_s": {}, "iqr_s": {}}
    for name in (*PHASES, "total"):
        q1, q2, q3 = _quartiles([s[name] for s in steps])
        summary["median_s"][name], summary["iqr_s"][name] = q2, [q1, q3]
    summary["images_per_s"] = variant.trainer.batch_size / summary["median_s"]["total"]
    quiet = [s for s in steps if s["others_cores"] is not None and s["others_cores"] < QUIET_CORES]
    summary["quiet_steps"] = len(quiet)  # steps during which other processes used < QUIET_CORES cores
    summary["quiet_median_s"] = ({name: statistics.median(s[name] for s in quiet) for name in (*PHASES, "total")}
                                 if quiet else None)
    summary["resolved_config"] = to_dict(variant.cfg)
    summary["steps_s"] = steps
    return summary


def source_version() -> dict:
    """The checkout's commit and whether tracked files differ from it (None outside a git checkout)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                 capture_output=True, text=True, timeout=10, check=True).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "modified": None}
    return {"commit": commit, "modified": sorted(line[3:] for line in changed if line.strip())}


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
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    busy_before, own_before, wall_before = machine_busy_s(), own_cpu_s(), time.perf_counter()
    variants: list[Variant] = []
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
        torch.set_num_threads(default_threads)
    device = variants[0].trainer.device
    busy_after, wall = machine_busy_s(), time.perf_counter() - wall_before
    others = (None if busy_before is None or busy_after is None
              else max(0.0, (busy_after - busy_before) - (own_cpu_s() - own_before)) / wall)
    result = {
        "benchmark": "train_step", "config": variants[0].cfg.name, "compare": key,
        "overrides": overrides, "machine": machine(), "device": str(device), "source": source_version(),
        "clock": "torch.profiler: " + ("device time of each phase's kernels" if device.type == "cuda"
                                       else "wall time of each phase (record_function spans)"),
        "warmup_steps": warmup, "steps": steps, "interleaved": "one step per variant per round, order rotating",
        "phases": list(PHASES), "started": started,
        "other_processes_cores": others,  # mean CPU cores busy outside this process during the run
        "quiet_below_cores": QUIET_CORES,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "notes": ["total = loader (next batch) + the step (smog.profile's 'step' span)",
                  "other = the step minus its named phases (schedules, loss readback)",
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
        heights = [max(0.0, v["median_s"][name]) * 1e3 for v in variants]
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
          f"variant, interleaved; medians [IQR] in ms ({result['clock']})")
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
