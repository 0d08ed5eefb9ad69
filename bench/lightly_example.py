"""`bench/lightly_example`: lightly's own SMoG example against examples/lightly_smog.py (the same example
with smog's grouping step), step for step.

lightly's example is not in the lightly package: it is read from a lightly checkout (examples/pytorch/smog.py;
a work tree, a bare git directory or the file itself) and run unmodified, in a child process, with three
things handed to it the way our example gets them: the data set (torchvision.datasets.CIFAR10 answers with
the same digits or Fashion-MNIST images as PIL RGB images), the DataLoader's batch size and workers (its
code fixes 256 and 8), and the stop after `--warmup + --steps` steps. Both scripts see the same data, batch,
transform (lightly's SMoGTransform, 32 px crops), backbone (torchvision's resnet18), optimiser, seed and
threads. A step's time runs from one batch handed over to the next asked for (the training step), as wall time
and as the process's CPU time (all threads: less moved by other jobs on a shared machine); the loader's
time for the next batch is kept apart; "grouping" is the time inside the grouping step and loss
calls (lightly: SMoGPrototypes' methods and the cross-entropy; smog: Grouping.forward), forward only. Runs
alternate between the two scripts (each a fresh process), the order flipping every repeat; the table shows
medians over repeats of each run's median step. "Grouping alone" times the two scripts' grouping lines by
themselves, forward and backward, in this process: the same random rows [batch, 128] and 300 groups for both,
calls alternating, the median of `--grouping-repeats`; both must pick the same targets.
JSON: bench/results/lightly_example_<data>.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.train_step import machine_busy_s, own_cpu_s

REPO = Path(__file__).resolve().parents[1]
OURS = REPO / "examples" / "lightly_smog.py"
LIGHTLY_PATH = "examples/pytorch/smog.py"
SCRIPTS = ("lightly", "smog")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/lightly_example", description=__doc__.split("\n\n")[0])
    parser.add_argument("lightly", help="lightly's examples/pytorch/smog.py, or a lightly checkout (work tree or "
                        "bare git directory) holding it")
    parser.add_argument("--data", default="digits", choices=["digits", "fashion_mnist"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers, both scripts")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each script")
    parser.add_argument("--grouping-repeats", type=int, default=50, help="timed calls of each grouping step alone")
    parser.add_argument("--out", default="", help="JSON output (default bench/results/lightly_example_<data>.json)")
    parser.add_argument("--child", choices=SCRIPTS, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def lightly_source(path: str) -> tuple[str, str | None]:
    """(the text of lightly's SMoG example, the checkout's commit when read from git) from `path`."""
    p = Path(path)
    if p.is_file():
        return p.read_text(), None
    if (p / LIGHTLY_PATH).is_file():
        return (p / LIGHTLY_PATH).read_text(), None
    git = ["git", "--git-dir", str(p / ".git" if (p / ".git").exists() else p)]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        text = subprocess.run([*git, "show", f"HEAD:{LIGHTLY_PATH}"], capture_output=True, text=True, check=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as error:
        raise SystemExit(f"bench/lightly_example: {path} is neither lightly's {LIGHTLY_PATH} nor a lightly checkout "
                         f"holding it ({error}); get one with: git clone https://github.com/lightly-ai/lightly") from None
    return text, commit


# ---- the child: one script, timed ----------------------------------------------------------------------


class Done(Exception):
    """The timed steps are over."""


def child(args: argparse.Namespace) -> None:
    import torch
    import torch.utils.data
    import torchvision
    from PIL import Image

    from smog.config import DataConfig
    from smog.data import load_split

    steps = args.warmup + args.steps
    times: list[dict] = []
    inside = {"depth": 0, "s": 0.0}  # time inside the grouping lines (outermost call only), this step

    class Images(torch.utils.data.Dataset):
        """The images examples/lightly_smog.py trains on, as CIFAR-10 hands them to lightly's example."""

        def __init__(self, root: str, download: bool = False, transform=None):
            train = load_split(DataConfig(name=args.data), "train")
            self.images, self.labels, self.transform = train.images, train.labels, transform

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, index: int):
            return self.transform(Image.fromarray(self.images[index, 0].numpy()).convert("RGB")), int(self.labels[index])

    class TimedLoader(torch.utils.data.DataLoader):
        """The script's DataLoader at the benchmark's batch size and workers; times each step; stops the run."""

        def __init__(self, dataset, **kwargs):
            kwargs.update(batch_size=args.batch_size, num_workers=args.workers)
            super().__init__(dataset, **kwargs)

        def __iter__(self):
            batches, handed, handed_cpu = super().__iter__(), None, 0.0
            while True:
                asked, asked_cpu = time.perf_counter(), time.process_time()
                if handed is not None:
                    times[-1].update(step_s=asked - handed, step_cpu_s=asked_cpu - handed_cpu, grouping_s=inside["s"])
                if len(times) == steps:
                    raise Done
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                inside["s"] = 0.0
                times.append({"load_s": time.perf_counter() - asked})
                handed, handed_cpu = time.perf_counter(), time.process_time()
                yield batch

    def timed(fn):
        def wrapper(*a, **k):
            inside["depth"] += 1
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                inside["depth"] -= 1
                if inside["depth"] == 0:
                    inside["s"] += time.perf_counter() - start
        return wrapper

    if args.child == "lightly":
        from lightly.models.modules.heads import SMoGPrototypes

        for name in ("assign_groups", "get_updated_group_features", "forward", "set_group_features"):
            setattr(SMoGPrototypes, name, timed(getattr(SMoGPrototypes, name)))
        torch.nn.CrossEntropyLoss.forward = timed(torch.nn.CrossEntropyLoss.forward)
        torchvision.datasets.CIFAR10 = Images
        script, argv = Path(args.child_out).with_suffix(".lightly.py"), []
        script.write_text(lightly_source(args.lightly)[0])
    else:
        import smog_kernels

        smog_kernels.Grouping.forward = timed(smog_kernels.Grouping.forward)
        script = OURS
        argv = ["--data", args.data, "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    torch.utils.data.DataLoader = TimedLoader
    torch.manual_seed(0)
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except Done:
        pass
    if len(times) < steps or "step_s" not in times[-1]:
        raise SystemExit(f"{args.child}: ran {len(times)} steps, {steps} asked (a data set of "
                         f"{args.batch_size * len(times)} images or more per epoch?)")
    Path(args.child_out).write_text(json.dumps({"steps": times[args.warmup:], "threads": torch.get_num_threads()}))


# ---- the parent: interleaved runs ----------------------------------------------------------------------


def run_child(which: str, args: argparse.Namespace, folder: str) -> dict:
    out = os.path.join(folder, f"{which}.json")
    cmd = [sys.executable, "-m", "bench.lightly_example", args.lightly, "--child", which, "--child-out", out,
           "--data", args.data, "--batch-size", str(args.batch_size), "--workers", str(args.workers),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    busy, own, wall = machine_busy_s(), own_cpu_s(), time.perf_counter()
    done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench/lightly_example: the {which} run failed:\n{done.stderr[-4000:]}")
    run = json.loads(Path(out).read_text())
    if busy is not None:  # cores other processes kept busy during the run (clock ticks; indicative only)
        others = (machine_busy_s() - busy) - (own_cpu_s() - own)
        run["other_processes_cores"] = max(0.0, others) / (time.perf_counter() - wall)
    return run


def summary(runs: list[dict]) -> dict:
    """Medians over runs of each run's median step (wall and CPU), loader and grouping time (seconds); the runs'
    own medians and the cores other processes kept busy during each."""
    per_run = {key: [statistics.median(s[key] for s in run["steps"]) for run in runs]
               for key in ("step_s", "step_cpu_s", "load_s", "grouping_s")}
    return ({key: statistics.median(values) for key, values in per_run.items()}
            | {"runs": per_run | {"other_processes_cores": [run.get("other_processes_cores") for run in runs]}})


def grouping_alone(batch: int, repeats: int) -> dict:
    """Median seconds of one grouping step, forward and backward, of each script on random unit rows [batch, 128]
    and 300 groups (lightly's example: SMoGPrototypes' calls and the cross-entropy; ours: F.normalize and
    Grouping), each call from the same groups and rows; SystemExit if their targets differ."""
    import torch
    import torch.nn.functional as F
    from lightly.models.modules.heads import SMoGPrototypes

    import smog_kernels

    generator = torch.Generator().manual_seed(0)
    groups = F.normalize(torch.randn(300, 128, generator=generator), dim=1)
    prototypes, criterion = SMoGPrototypes(group_features=groups.clone(), beta=0.99), torch.nn.CrossEntropyLoss()
    grouping = smog_kernels.Grouping(heads=1, num_groups=300, dim=128, temperature=0.1)

    def lightly_step(x1_encoded, x0_encoded, x0_predicted):
        prototypes.set_group_features(groups.clone())
        start = time.perf_counter()
        assignments = prototypes.assign_groups(x1_encoded)
        group_features = prototypes.get_updated_group_features(x0_encoded)
        logits = prototypes(x0_predicted, group_features, temperature=0.1)
        prototypes.set_group_features(group_features)
        criterion(logits, assignments).backward()
        return time.perf_counter() - start, assignments

    def smog_step(x1_encoded, x0_encoded, x0_predicted):
        grouping.groups.copy_(groups[None])
        start = time.perf_counter()
        grouping(F.normalize(x1_encoded, dim=1)[None], F.normalize(x0_encoded, dim=1)[None],
                 F.normalize(x0_predicted, dim=1)[None], beta=0.99).backward()
        return time.perf_counter() - start, grouping.result.targets[0, 0]

    times: dict[str, list[float]] = {"lightly": [], "smog": []}
    for repeat in range(repeats + 3):  # the first 3 untimed
        x1_encoded, x0_encoded, x0_predicted = (F.normalize(torch.randn(batch, 128, generator=generator), dim=1)
                                                 for _ in range(3))
        x0_encoded.requires_grad_(), x0_predicted.requires_grad_()  # as the model's outputs
        targets = {}
        for name, step in (("lightly", lightly_step), ("smog", smog_step))[::1 if repeat % 2 == 0 else -1]:
            seconds, targets[name] = step(x1_encoded, x0_encoded, x0_predicted)
            if repeat >= 3:
                times[name].append(seconds)
        if not torch.equal(targets["lightly"], targets["smog"]):
            raise SystemExit("bench/lightly_example: lightly's and smog's grouping steps chose different targets")
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.child:
        child(args)
        return
    import torch

    from smog.benchmarks.kernels import machine

    text, commit = lightly_source(args.lightly)
    runs: dict[str, list[dict]] = {name: [] for name in SCRIPTS}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for which in SCRIPTS if repeat % 2 == 0 else SCRIPTS[::-1]:
                runs[which].append(run_child(which, args, folder))
                last = runs[which][-1]
                print(f"repeat {repeat + 1}/{args.repeats} {which}: median step "
                      f"{statistics.median(s['step_s'] for s in last['steps']):.3f} s, other processes kept "
                      f"{last.get('other_processes_cores', float('nan')):.1f} cores busy", flush=True)
    result = {name: summary(runs[name]) for name in SCRIPTS}
    alone = grouping_alone(args.batch_size, args.grouping_repeats)
    ratio = result["lightly"]["step_s"] / result["smog"]["step_s"]
    cpu_ratio = result["lightly"]["step_cpu_s"] / result["smog"]["step_cpu_s"]
    grouping_ratio = result["lightly"]["grouping_s"] / result["smog"]["grouping_s"]
    report = {
        "benchmark": "lightly_example", "data": args.data, "batch_size": args.batch_size, "workers": args.workers,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "backbone": "torchvision resnet18",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "lightly_example": {"path": LIGHTLY_PATH, "commit": commit, "sha256": hashlib.sha256(text.encode()).hexdigest()},
        "machine": machine() | {"date": time.strftime("%Y-%m-%d", time.gmtime()),
                                "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "lightly": result["lightly"], "smog": result["smog"],
        "step_ratio_lightly_over_smog": ratio, "step_cpu_ratio_lightly_over_smog": cpu_ratio,
        "grouping_ratio_lightly_over_smog": grouping_ratio,
        "grouping_alone": alone | {"repeats": args.grouping_repeats},
        "grouping_alone_ratio_lightly_over_smog": alone["lightly"] / alone["smog"],
    }
    out = Path(args.out or REPO / "bench" / "results" / f"lightly_example_{args.data}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{report['machine']['cpu']}, {report['machine']['logical_cpus']} logical CPUs, "
          f"load average {load_before[0]:.1f} at the start; {args.data}, batch {args.batch_size}, resnet18, "
          f"medians of {args.repeats} runs x {args.steps} steps (s)")
    print(f"{'':8} {'step':>8} {'step CPU':>9} {'loader':>8} {'grouping (forward)':>19}")
    for name in SCRIPTS:
        r = result[name]
        print(f"{name:8} {r['step_s']:8.3f} {r['step_cpu_s']:9.3f} {r['load_s']:8.3f} {r['grouping_s']:19.4f}")
    print(f"step: lightly / smog = {ratio:.3f}x (CPU time {cpu_ratio:.3f}x); grouping calls: lightly / smog = "
          f"{grouping_ratio:.2f}x")
    print(f"grouping alone (forward and backward, median of {args.grouping_repeats}): lightly "
          f"{alone['lightly'] * 1e3:.2f} ms, smog {alone['smog'] * 1e3:.2f} ms, lightly / smog = "
          f"{report['grouping_alone_ratio_lightly_over_smog']:.1f}x  -> {out}")


if __name__ == "__main__":
    main()
