"""`smog train --resume auto` under torchrun's elastic agent, with real processes over gloo on loopback.

1. A restarted worker group joins its own generation: torchrun keeps one store for the whole job, and a
   restarted rank that reads it before its peer has published its new address must not connect to the
   dead generation's (the "Gloo connectFullMesh failed ... Connect timeout" of a restart), even when the
   ranks' TORCHELASTIC_RESTART_COUNT differ.
2. Two SIGKILLs of a random worker at random steps under `torchrun --max-restarts=3`: the run ends with
   the uninterrupted 2-process run's checkpoint and rank files, bit for bit (parameters, optimiser state,
   groups, memory banks, counters).
3. Two torchrun agents on this host (`--nnodes=2`, one process each, c10d rendezvous on 127.0.0.1) train
   the same run as one agent with two processes, bit for bit.
4. A refused (truncated) rank file: the resume takes the previous position every file holds and ends as
   the uninterrupted run.
5. A world-size change (2 -> 1 process): the checkpoint is resumed with the memory bank refilled by the
   fill pass, and said so; with another number of steps per epoch it is refused with a message.

The uninterrupted reference is one 2-process torchrun launch shared by 2-5 (tools.faults holds
the launch and kill helpers that bench/faults uses). About 2-3 minutes on 2 cores.
"""
from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from smog import checkpoint
from tools.faults import differences, environment, final_state, free_port, run_with_kills, torchrun

WORLD = 2
TIMEOUT_S = 240
SMALL = ["--config", "digits", "data.train_subset=256", "train.batch_size=32", "data.small_crops=1",
         "data.workers=0", "train.epochs=2", "train.checkpoint_every_steps=1", "train.progress=false",
         "eval.knn_every=0", "eval.knn_train_subset=300", "eval.knn_test_subset=100", "train.dist_timeout_s=60"]
STEPS = 2 * 256 // 32


def train_args(run_dir: Path, *extra: str) -> list[str]:
    return [*SMALL, f"train.out_dir={run_dir.parent}", f"train.run_name={run_dir.name}", *extra]


def launch(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=environment(), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def finish(procs: list[subprocess.Popen], logs: list[Path]) -> list[str]:
    """Wait (bounded) for every process; each must exit 0. Returns their outputs."""
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    finally:
        for p in procs:  # only the processes this test started, by their handles
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [log.read_text() for log in logs]
    for p, text in zip(procs, texts):
        assert p.returncode == 0, f"exit {p.returncode}:\n{text[-4000:]}"
    return texts


def assert_same_run(run_dir: Path, reference: Path, world: int = WORLD) -> None:
    compared, differ = differences(final_state(reference, world), final_state(run_dir, world))
    assert compared > 50 and not differ, f"{len(differ)} of {compared} tensors or fields differ: {differ[:10]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted 2-process run (torchrun, c10d rendezvous, no restarts)."""
    root = tmp_path_factory.mktemp("reference")
    run_dir = root / "run"
    cmd = torchrun(WORLD, 0, free_port(), train_args(run_dir))
    finish([launch(cmd, root / "log")], [root / "log"])
    assert checkpoint.header(str(run_dir / "checkpoint.pt"))["step"] == STEPS
    return run_dir


# ---- 1 -------------------------------------------------------------------------------------------

WORKER = r'''
import os, sys, time
import torch, torch.distributed as dist
from smog.dist import init_from_env
generation, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
# two agents' restart counts can differ (one restarted for a membership change does not count it)
os.environ["TORCHELASTIC_RESTART_COUNT"] = str(generation + rank)
if generation == 1 and rank == 0:
    time.sleep(3)  # the restarted rank 0 starts late: its peer reads the job's store first
init_from_env("cpu", timeout_s=20)
total = torch.ones(1)
dist.all_reduce(total)
print(f"generation {generation} rank {rank} sum {total.item():g}", flush=True)
if generation == 0 and rank == 1:
    sys.exit(3)  # the first generation fails: torchrun restarts the group
dist.destroy_process_group()
'''


def test_a_restarted_group_does_not_connect_to_the_dead_generation(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = torchrun(WORLD, 1, free_port(), [], program=[str(script)])
    [text] = finish([launch(cmd, tmp_path / "log")], [tmp_path / "log"])
    for generation in (0, 1):
        for rank in range(WORLD):
            assert f"generation {generation} rank {rank} sum 2" in text, text[-3000:]
    assert "connectFullMesh" not in text


# ---- 2 -------------------------------------------------------------------------------------------


def test_two_sigkills_under_torchrun_max_restarts_end_bit_identical(reference, tmp_path):
    seed = random.randrange(10**6)
    run_dir = tmp_path / "run"
    cmd = torchrun(WORLD, 3, free_port(), train_args(run_dir))
    result = run_with_kills(cmd, run_dir, 2, random.Random(seed), tmp_path / "log", delay_s=0.5,
                            timeout_s=TIMEOUT_S)
    log = (tmp_path / "log").read_text()
    assert result["exit"] == 0, f"seed {seed}: torchrun exited {result['exit']}:\n{log[-4000:]}"
    assert result["landed"] == 2 and result["resumed"] == 2, (seed, result)
    assert all(k["after"][1] < STEPS for k in result["kills"]), (seed, result)
    assert_same_run(run_dir, reference)


# ---- 3 -------------------------------------------------------------------------------------------


def test_two_agents_on_one_host_match_one_agent_with_two_processes(reference, tmp_path):
    run_dir = tmp_path / "run"
    port = free_port()
    cmd = torchrun(1, 0, port, train_args(run_dir), nnodes=2)
    logs = [tmp_path / "agent0", tmp_path / "agent1"]
    finish([launch(cmd, logs[0]), launch(cmd, logs[1])], logs)
    assert checkpoint.header(str(run_dir / "checkpoint.pt"))["world"] == WORLD
    assert_same_run(run_dir, reference)


# ---- 4 -------------------------------------------------------------------------------------------


def test_a_truncated_rank_file_resumes_the_previous_position(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    bad = run_dir / "rank1.pt"
    bad.write_bytes(bad.read_bytes()[:5000])
    previous = checkpoint.header(str(run_dir / "checkpoint.prev.pt"))
    assert (previous["epoch"], previous["step"]) == (1, STEPS)  # the end of the last epoch, before its kNN
    cmd = torchrun(WORLD, 0, free_port(), train_args(run_dir))
    [text] = finish([launch(cmd, tmp_path / "log")], [tmp_path / "log"])
    assert f"checkpoint {bad} is refused: truncated" in text, text[-3000:]
    assert (run_dir / "rank1.pt.set-aside").is_file() and (run_dir / "checkpoint.pt.set-aside").is_file()
    assert_same_run(run_dir, reference)


# ---- 5 -------------------------------------------------------------------------------------------


def test_a_world_size_change_refills_the_bank_or_is_refused(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    one = [sys.executable, "-m", "smog.cli", "train", *train_args(run_dir, "train.epochs=3"), "--resume", "auto"]
    [text] = finish([launch(one, tmp_path / "log")], [tmp_path / "log"])
    assert "was written by 2 processes, this run has 1" in text and "refilled by the fill pass" in text, text[-3000:]
    state = checkpoint.load(str(run_dir / "checkpoint.pt"))
    assert (state["world"], state["epoch"], state["step"]) == (1, 3, STEPS + STEPS // 2)
    kinds = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"bank_fill"' in line]
    assert len(kinds) == 2, "the 1-process resume did not run the fill pass"

    other = tmp_path / "other"
    shutil.copytree(reference, other)
    refused = [sys.executable, "-m", "smog.cli", "train", *train_args(other, "train.epochs=3", "train.batch_size=64"),
               "--resume", "auto"]
    done = subprocess.run(refused, env=environment(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "was written by 2 processes with 8 steps per epoch" in done.stderr and "resume it with 2" in done.stderr
