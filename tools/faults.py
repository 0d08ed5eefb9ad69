"""`bench/faults` (this module): random SIGKILLs against `smog train --resume auto` under torchrun
--max-restarts. Its launch, kill and comparison helpers also drive tests/test_elastic.py.

usage: bench/faults [--config digits] [--nproc 1] [--kills 20] [--seed 0] [--out DIR] [key=value ...]

Runs the recipe once uninterrupted, then again under `torchrun --max-restarts=KILLS` while SIGKILLing a
random worker at a random moment after each generation has checkpointed past the previous kill. Prints how
many kills landed, how many restarted groups resumed (checkpointed past the step they were killed at), and
whether the final checkpoint and rank files equal the uninterrupted run's bit for bit. JSON in
bench/results/faults_<config>_<nproc>p.json. Processes, rendezvous and stores use loopback and free ports.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from smog import checkpoint

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, max_restarts: int, port: int, args: list[str], nnodes: int = 1,
             program: list[str] | None = None) -> list[str]:
    """The documented launch, `torchrun --max-restarts=N ... -m smog.cli train ARGS --resume auto` (or
    `program` in place of smog), on loopback with c10d rendezvous at 127.0.0.1:port."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
            f"--rdzv_id=smog-{port}", "--local-addr=127.0.0.1", "--monitor-interval=0.1",
            *(program or ["-m", "smog.cli", "train", *args, "--resume", "auto"])]


def environment() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def workers(agent: int) -> dict[int, tuple[int, int]]:
    """{pid: (RANK, TORCHELASTIC_RESTART_COUNT)} of the live workers the torchrun agent `agent` started."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            if ppid != agent:
                continue
            with open(f"/proc/{entry}/environ", "rb") as handle:
                env = dict(v.split(b"=", 1) for v in handle.read().split(b"\0") if b"=" in v)
            found[int(entry)] = (int(env[b"RANK"]), int(env[b"TORCHELASTIC_RESTART_COUNT"]))
        except (OSError, ValueError, IndexError, KeyError):
            continue
    return found


def position(run_dir: Path) -> tuple[int, int]:
    """(epoch, step) in the header of the run's newest checkpoint (os.replace makes it whole); (-1, -1) before."""
    try:
        with open(run_dir / "checkpoint.pt", "rb") as handle:
            head = handle.read(checkpoint.HEADER_LIMIT)
    except FileNotFoundError:
        return (-1, -1)
    fields = json.loads(head[len(checkpoint.MAGIC):head.index(b"\n", len(checkpoint.MAGIC))])
    return (fields["epoch"], fields["step"])


def run_with_kills(cmd: list[str], run_dir: Path, kills: int, rng: random.Random, log: Path,
                   delay_s: float = 1.0, timeout_s: float = 1800.0) -> dict:
    """Start `cmd` (a torchrun agent); `kills` times: wait until a restarted generation has checkpointed past
    the previous kill, sleep a random [0, delay_s), SIGKILL one random worker. Then wait for the agent.

    A kill landed if the worker was alive to receive it; a resume succeeded if a later generation of workers
    wrote a checkpoint past the one the kill interrupted (or the run ended cleanly after it)."""
    started = time.time()
    landed, resumed, events = 0, 0, []
    killed_at, killed_generation = (-1, -1), -1

    def resumed_past_kill() -> bool:
        return position(run_dir) > killed_at and any(g > killed_generation for _, g in workers(agent.pid).values())

    with open(log, "w") as out:
        agent = subprocess.Popen(cmd, env=environment(), stdout=out, stderr=subprocess.STDOUT)
        try:
            for _ in range(kills):
                while agent.poll() is None and time.time() < started + timeout_s and not (
                        resumed_past_kill() if landed else position(run_dir) >= (0, 1)):
                    time.sleep(0.05)
                if agent.poll() is not None or time.time() >= started + timeout_s:
                    break
                resumed += landed > 0
                time.sleep(rng.uniform(0.0, delay_s))
                alive = workers(agent.pid)
                if not alive:
                    continue
                pid = rng.choice(sorted(alive))
                killed_at, (rank, killed_generation) = position(run_dir), alive[pid]
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                landed += 1
                events.append({"rank": rank, "generation": killed_generation, "after": list(killed_at),
                               "at_s": round(time.time() - started, 2)})
            agent.wait(timeout=max(1.0, started + timeout_s - time.time()))
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    resumed += landed > 0 and agent.returncode == 0 and position(run_dir) > killed_at
    return {"exit": agent.returncode, "landed": landed, "resumed": resumed, "kills": events}


def final_state(run_dir: Path, world: int) -> dict:
    """The run's checkpoint and every rank file, less the config (it names the run directory), the training
    clock's seconds (wall time) and the RNG states: those record a process's history, not the training's (numpy's and Python's start from OS
    entropy and nothing in smog draws from them; the data loader draws a seed from torch's whenever an
    epoch's loader starts, which a resumed process does once more); crops and shuffles have their own seeds."""
    state = checkpoint.load(str(run_dir / "checkpoint.pt"))
    del state["config"], state["seconds"], state["rank"]["rng"]
    files = {"checkpoint": state}
    for r in range(world if world > 1 else 0):
        files[f"rank{r}"] = checkpoint.load(str(run_dir / f"rank{r}.pt"))
        del files[f"rank{r}"]["rank"]["rng"]
    return files


def differences(a, b, where: str = "") -> tuple[int, list[str]]:
    """(tensors compared, paths where `a` and `b` differ), recursively through dicts, lists and tuples, bit
    for bit (tensors: same dtype, shape and values; anything else: ==)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
        return 1, [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return 0, [f"{where} keys {sorted(map(str, a.keys() ^ b.keys()))}"]
        pairs = [(a[k], b[k], f"{where}/{k}") for k in a]
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        pairs = [(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b))]
    else:
        return 0, [] if a == b else [where]
    count, differ = 0, []
    for x, y, path in pairs:
        n, d = differences(x, y, path)
        count, differ = count + n, differ + d
    return count, differ


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="digits")
    parser.add_argument("--nproc", type=int, default=1, help="processes (gloo on CPU)")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments and victims")
    parser.add_argument("--delay", type=float, default=1.0, help="kill within [0, DELAY) s after progress")
    parser.add_argument("--out", default="/tmp/smog-faults", help="run directories")
    parser.add_argument("overrides", nargs="*", help="section.key=value (default train.checkpoint_every_steps=1)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = ["train.checkpoint_every_steps=1", "train.progress=false", "train.dist_timeout_s=60",
                 "train.device=cpu", *args.overrides]
    runs = {}
    for name, kills in (("uninterrupted", 0), ("killed", args.kills)):
        run_dir = out / f"{args.config}-{args.nproc}p-{name}"
        for stale in (run_dir.glob("*") if run_dir.is_dir() else []):
            stale.unlink()
        train_args = ["--config", args.config, f"train.out_dir={out}", f"train.run_name={run_dir.name}", *overrides]
        cmd = torchrun(args.nproc, kills, free_port(), train_args)
        started = time.time()
        runs[name] = run_with_kills(cmd, run_dir, kills, random.Random(args.seed), out / f"{run_dir.name}.log",
                                    delay_s=args.delay)
        runs[name]["seconds"] = round(time.time() - started, 1)
        runs[name]["run_dir"] = str(run_dir)
        if runs[name]["exit"] != 0:
            print(f"{name} run failed (exit {runs[name]['exit']}); log: {out / f'{run_dir.name}.log'}")
    identical, compared, differ = False, 0, ["a run failed"]
    if all(r["exit"] == 0 for r in runs.values()):
        compared, differ = differences(final_state(Path(runs["uninterrupted"]["run_dir"]), args.nproc),
                                       final_state(Path(runs["killed"]["run_dir"]), args.nproc))
        identical = not differ
    killed = runs["killed"]
    print(f"{args.config}, {args.nproc} process(es), {args.kills} SIGKILLs requested: {killed['landed']} landed, "
          f"{killed['resumed']} resumes succeeded, torchrun exit {killed['exit']}, "
          f"{killed['seconds']} s (uninterrupted {runs['uninterrupted']['seconds']} s)")
    print(f"final state bit-identical to the uninterrupted run: {'yes' if identical else 'NO'} "
          f"({compared} tensors compared" + (f"; differ: {differ[:5]})" if differ else ")"))
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    with open(results / f"faults_{args.config}_{args.nproc}p.json", "w") as handle:
        json.dump({"config": args.config, "nproc": args.nproc, "kills": args.kills, "seed": args.seed,
                   "overrides": overrides, "runs": runs, "identical": identical, "compared": compared}, handle,
                  indent=1)
    return 0 if identical and killed["landed"] == args.kills and killed["resumed"] == args.kills else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
