"""`bench/accuracy`: smog's recipe vs lightly's SMoG recipe, same backbone, data, epochs and batch size.

Reports kNN top-1 of each (and of the random-init network and raw pixels) with the time per epoch of each;
writes bench/results/accuracy_<config>.json and .png.

--budget-minutes M: each method instead trains for M minutes of training time (bench.equal_time), on the
same data, backbone, crops maker, batch size and threads: smog, lightly-smog, byol, swav, then random init
and raw pixels (no training). Training time is everything a method needs to train (smog's memory-bank
fill and re-clustering, lightly's k-means, every step), checked after each step; the clock is paused for
the kNN evaluations (every --eval-every-minutes, default M / 5, and at the end), logs and checkpoints. The
schedules are laid out over the time (smog.budget). At the end: kNN at every (eval.knn_k, eval.knn_t) and a
linear probe (smog.evaluation.linear, the recipe of `smog eval linear --protocol features`: standardised frozen
features, SGD momentum 0.9, eval.linear_lr on a cosine, eval.linear_weight_decay, eval.linear_epochs,
batch 256). Each method's result and model state go to --run-dir/<method>/ (smog: checkpoint.pt, which
`smog eval knn` reads); a method whose result.json is there is not run again. Writes
bench/results/accuracy_<config>_budget<M>.json and .png (kNN top-1 at the first setting against minutes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from bench.equal_time import LIGHTLY_METHODS, train_lightly_for, train_smog_for
from smog.benchmarks.kernels import machine as kernels_machine
from smog.config import Config, config_from_dict, load_config, to_dict
from smog.evaluation import knn_scores, linear_score
from smog.commands.train import run as train_smog
from smog.loop import pick_device
from smog.method import build_model


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, scores) for name, scores in result["knn"].items()]
    keys = list(rows[0][1])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(rows)
    for i, (name, scores) in enumerate(rows):
        left.bar([j + i * width for j in range(len(keys))], [scores[k] for k in keys], width, label=name)
    left.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys)
    low = min(min(s.values()) for _, s in rows)
    left.set(ylabel="kNN top-1 (%)", ylim=(max(0, low - 10), 100), title=f"{result['config']}: kNN top-1")
    left.legend(fontsize=8)
    sides = list(result["seconds_per_epoch"])
    right.bar(sides, [sum(result["seconds_per_epoch"][s]) / len(result["seconds_per_epoch"][s]) for s in sides])
    right.set(ylabel="seconds per epoch (mean)", title="training time per epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class SetupError(ValueError):
    """The comparison cannot go on as asked: a method's package is missing, or a stored result was measured
    with another budget or configuration."""


METHODS = ("smog", "lightly-smog", "byol", "swav", "random init", "raw pixels")


def machine() -> dict:
    """The machine a result was measured on (smog.benchmarks.kernels.machine, with ATen's ISA and the date)."""
    shared = kernels_machine()
    return {"cpu_model": shared["cpu"], "cores": shared["logical_cpus"],
            "isa": torch.backends.cpu.get_cpu_capability(), "torch_threads": shared["threads"],
            "torch": shared["torch"], "python": shared["python"], "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d", time.gmtime())}


def pick_methods(text: str | None) -> tuple[list[str], dict[str, str]]:
    """(methods to run, {skipped method: reason}). Asked-for lightly methods without lightly: SetupError."""
    methods = [m.strip() for m in (text or ",".join(METHODS)).split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SetupError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    wanted = [m for m in methods if m in LIGHTLY_METHODS]
    try:
        import lightly  # noqa: F401
    except ImportError:
        if text is not None and wanted:
            raise SetupError(f"--methods {','.join(wanted)} need the lightly package, which is not installed: "
                             f"pip install lightly (or smog's bench extra)") from None
        reason = "the lightly package is not installed (pip install lightly)"
        return [m for m in methods if m not in wanted], {m: reason for m in wanted}
    return methods, {}


def run_method(name: str, cfg: Config, minutes: float, every: float, device: torch.device, run_dir: str) -> dict:
    """Train (but random init and raw pixels) for `minutes` of training time, kNN every `every` minutes and at
    the end, and evaluate one method; its result dict."""
    started = time.perf_counter()
    os.makedirs(run_dir, exist_ok=True)
    out: dict = {}
    if name == "smog":
        out = train_smog_for(cfg, minutes, every, run_dir)
        out["checkpoint"] = os.path.join(run_dir, "checkpoint.pt")
    elif name in LIGHTLY_METHODS:
        out = train_lightly_for(name, cfg, minutes, every, device, run_dir)
        out["checkpoint"] = os.path.join(run_dir, "model.pt")
    backbone = build_model(cfg).encoder().to(device) if name == "random init" else out.pop("backbone", None)
    result = {"knn": out["curve"][-1]["knn"]} if out else {"knn": knn_scores(backbone, cfg, device)}
    result["linear_top1"] = linear_score(backbone, cfg, device)
    result.update(out)
    result["wall_seconds"] = time.perf_counter() - started
    result["machine"] = machine()
    return result


def run_budget(cfg: Config, args: argparse.Namespace, methods: list[str], skipped: dict[str, str]) -> dict:
    """The equal-time comparison (see the module's docstring); the result of every method run or resumed."""
    minutes = args.budget_minutes
    every = args.eval_every_minutes if args.eval_every_minutes is not None else minutes / 5
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    root = args.run_dir or os.path.join("runs", f"accuracy_{cfg.name}_budget{minutes:g}")
    result = {"config": cfg.name, "budget_minutes": minutes, "eval_every_minutes": every,
              "resolved_config": to_dict(cfg), "device": str(device), "machine": machine(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "run_dir": root,
              "methods": {}, "skipped": skipped}
    setup = {"budget_minutes": minutes, "eval_every_minutes": every, "config": to_dict(cfg)}
    for name in methods:
        run_dir = os.path.join(root, name.replace(" ", "_"))
        path = os.path.join(run_dir, "result.json")
        if os.path.exists(path):
            with open(path) as done:
                found = json.load(done)
            if found.get("setup") != json.loads(json.dumps(setup)):
                raise SetupError(f"{path} was measured with another budget or configuration: remove it or pass "
                                 f"another --run-dir")
            result["methods"][name] = found
            print(f"{name}: result found in {path}, not run again", flush=True)
            continue
        method = {**run_method(name, cfg, minutes, every, device, run_dir), "setup": setup}
        with open(path + ".tmp", "w") as out:
            json.dump(method, out, indent=2)
        os.replace(path + ".tmp", path)
        result["methods"][name] = method
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return result


def plot_curves(result: dict, path: str) -> None:
    """kNN top-1 at the first setting against training minutes, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = next(iter(next(iter(result["methods"].values()))["knn"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, method in result["methods"].items():
        if "curve" in method:
            curve = method["curve"]
            ax.plot([p["minutes"] for p in curve], [p["knn"][key] for p in curve], "o-", label=name)
        else:
            ax.axhline(method["knn"][key], linestyle="--", color="gray" if name == "raw pixels" else "black",
                       label=name)
    ax.set(xlabel="training minutes", ylabel=f"kNN top-1 (%), {key}",
           title=f"{result['config']}: {result['budget_minutes']:g} minutes each, {result['machine']['cpu_model']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def budget_table(result: dict) -> str:
    methods = result["methods"]
    keys = list(next(iter(methods.values()))["knn"])
    lines = [f"{'method':<14}" + "".join(f"{k:>12}" for k in keys)
             + f"{'linear':>9}{'steps':>8}{'epochs':>8}{'train min':>10}"]
    for name, m in methods.items():
        trained = f"{m['steps']:>8}{m['epochs']:>8.2f}{m['train_seconds'] / 60:>10.2f}" if "steps" in m else ""
        scores = "".join(f"{m['knn'][k]:>12.2f}" for k in keys) + f"{m['linear_top1']:>9.2f}"
        lines.append(f"{name:<14}{scores}{trained}")
    return "\n".join(lines)


def write_budget(result: dict, out: str) -> None:
    """The equal-time JSON and PNG in `out`, the table on stdout."""
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"accuracy_{result['config']}_budget{result['budget_minutes']:g}")
    with open(stem + ".json", "w") as out_file:
        json.dump(result, out_file, indent=2)
    plot_curves(result, stem + ".png")
    print(budget_table(result))
    for name, reason in result["skipped"].items():
        print(f"{name}: not run, {reason}")
    print(f"wrote {stem}.json and {stem}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fashion_mnist")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--sides", default="smog,lightly", help="equal epochs: comma list of smog, lightly")
    parser.add_argument("--budget-minutes", type=float, help="equal time: minutes of training time per method")
    parser.add_argument("--eval-every-minutes", type=float, help="equal time: kNN every so many minutes (M / 5)")
    parser.add_argument("--methods", help=f"equal time: comma list of {', '.join(METHODS)} (default all)")
    parser.add_argument("--run-dir", help="equal time: where each method's result and model go "
                                          "(default runs/accuracy_<config>_budget<M>)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied to every method")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.budget_minutes is not None:
        if not args.budget_minutes > 0 or (args.eval_every_minutes is not None and args.eval_every_minutes < 0):
            parser.error(f"--budget-minutes must be positive and --eval-every-minutes 0 or positive, got "
                         f"{args.budget_minutes} and {args.eval_every_minutes}")
        try:
            write_budget(run_budget(cfg, args, *pick_methods(args.methods)), args.out)
        except SetupError as error:
            print(f"bench/accuracy: error: {error}", file=sys.stderr)
            return 2
        return 0
    sides = [s for s in args.sides.split(",") if s]
    device = pick_device(cfg.train.device)
    result = {"config": cfg.name, "resolved_config": to_dict(cfg), "device": str(device),
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "processor": platform.processor(), "torch": torch.__version__},
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "knn": {}, "seconds_per_epoch": {}}
    if "smog" in sides:
        smog_cfg = config_from_dict(to_dict(cfg), [f"train.run_name={cfg.train.run_name or 'bench_' + cfg.name}",
                                                   "eval.baselines=false"])  # baselines once below, for both sides
        out = train_smog(smog_cfg, "")
        records = [json.loads(line) for line in open(os.path.join(out["run_dir"], "metrics.jsonl"))]
        result["knn"]["smog"] = out["final"]["knn"]
        result["seconds_per_epoch"]["smog"] = [r["seconds"] for r in records if r.get("kind") == "epoch"]
        result["smog_bank_fill_seconds"] = sum(r["seconds"] for r in records if r.get("kind") == "bank_fill")
    if "lightly" in sides:
        from bench.lightly_smog import train_lightly

        lightly = train_lightly(cfg)
        result["knn"]["lightly"] = lightly["knn"]
        result["seconds_per_epoch"]["lightly"] = lightly["seconds_per_epoch"]
    result["knn"]["random init"] = knn_scores(build_model(cfg).encoder().to(device), cfg, device)
    result["knn"]["raw pixels"] = knn_scores(None, cfg, device)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"accuracy_{cfg.name}")
    with open(stem + ".json", "w") as out_file:
        json.dump(result, out_file, indent=2)
    plot(result, stem + ".png")
    keys = list(result["knn"]["raw pixels"])
    print(f"{'kNN top-1 (%)':<14}" + "".join(f"{k:>12}" for k in keys) + f"{'s/epoch':>10}")
    for name, scores in result["knn"].items():
        times = result["seconds_per_epoch"].get(name)
        per_epoch = f"{sum(times) / len(times):>10.1f}" if times else f"{'':>10}"
        print(f"{name:<14}" + "".join(f"{scores[k]:>12.2f}" for k in keys) + per_epoch)
    print(f"wrote {stem}.json and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
