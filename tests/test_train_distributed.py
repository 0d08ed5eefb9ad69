"""`smog train` on 2 real processes (gloo over loopback, env:// rendezvous): groups, failure, resume.

Every run is a separate OS process per rank, started either as plain subprocesses with the environment
torchrun gives its workers (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT on a free port) or by torchrun
itself, each launch under a timeout. The ranks run a small driver script (written to a tmp folder) that
imports smog unchanged and only wraps a few methods from the outside: it records each rank's state
(groups, weights, memory bank) at every checkpoint and after a resume, and for the failure test makes
rank 1 die with os._exit in the middle of a step.

1. 2 ranks vs 1 rank with the same global batch (`test_two_ranks_match_one_rank_...`).
   BatchNorm: synchronised BatchNorm (`model.sync_bn_group`) runs on CPU ranks too
   (`test_sync_batchnorm_option_...` trains with it; tests/test_batchnorm.py checks its statistics
   against one process; under a training-time budget rank 0's clock decides for every rank:
   `test_a_training_time_budget_...`). Plain BatchNorm in training mode
   normalises each rank's 16 rows with their own statistics, so every z (hence every assignment and
   group) of a 2-rank run differs from one process's by design. Both runs therefore put the BatchNorm layers on their running
   statistics (eval mode, set by the driver; the affine weights still train): BN is then a fixed
   per-sample map and everything the distribution does -- the sampler's shards, the all-reduced group
   statistics, DDP's gradient average, the loss as a mean of local means, LARS, EMA -- must reproduce
   the single process. Re-clustering is off (method.recluster_every=0): distributed k-means draws its
   initial rows from the union of the ranks' memory banks (docs/method.md, "Re-clustering") and one
   process from its whole bank, so the starting groups would differ by design (tests/test_distributed.py
   checks distributed k-means against one process for the same init; the next test covers it in
   training). Group momentum is 0.5 so every step moves the groups far more than the tolerance.
   Checked after every step: groups and global group counts bit-identical on both ranks and final weights
   too; the ranks' batches together are the single process's batch; groups (2e-6), counts (exactly),
   loss and weights equal the single process's.
   `test_ranks_keep_identical_groups_...`: across a whole 2-epoch `smog train` (each epoch opened by a
   distributed k-means), groups and parameters are bit-identical on both ranks at every checkpoint.
2. A rank killed mid-step (`test_killed_rank_stops_its_peer_...`): rank 1 calls os._exit in the middle
   of a step (after its forward pass and the all-reduce of the group statistics, before the backward's
   gradient all-reduce); rank 0 must exit non-zero with a distributed error within the process group's timeout.
   The trainer takes that timeout from train.dist_timeout_s (600 s by default); the test sets 10 s
   (gloo in fact reports the closed connection at once). The last checkpoint (rank 0 wrote it before the failure) must load with
   smog.checkpoint.load and hold the step it was written at, and `smog train --resume auto` on 2 ranks
   must continue it to the end, equal to an uninterrupted run bit for bit (both ranks) up to the end of
   the interrupted epoch, memory banks (rows, samples, write position) included.
3. `--resume auto` after a completed epoch (`test_resume_auto_after_a_completed_epoch_is_exact`): the
   uninterrupted run's end-of-epoch-1 checkpoint (written by rank 0) is put in a fresh run directory and
   together with each rank's own file (memory bank, RNG state: rank{r}.pt), and
   `smog train --resume auto` under torchrun continues it. Every rank must load it (step, epoch, groups,
   its own memory bank), and the continued run must end where the uninterrupted one ended, bit for bit,
   on every rank (the trainer promises exact-resume checkpoints, as tests/test_train.py checks on one
   process): groups, weights, memory banks, loss, kNN.

No expected figure is hard-coded: each quantity is compared with another run's. The file starts 7
launches (2 ranks share the 2 cores; importing torch + torchvision takes seconds per process), about
100 s in all.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from smog import checkpoint

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
LAUNCH_TIMEOUT_S = 120.0  # any launch still running after this is killed and fails its test
PG_TIMEOUT_S = 10.0  # process-group timeout of the failure test
EXIT_SLACK_S = 20.0  # interpreter teardown after the timeout has fired

IMAGES, BATCH = 256, 32  # global batch: 16 images per rank and step
STEPS_PER_EPOCH = IMAGES // BATCH
COMMON = [f"data.train_subset={IMAGES}", f"train.batch_size={BATCH}", "data.small_crops=1", "train.progress=false",
          "eval.knn_every=0", "eval.knn_train_subset=300", "eval.knn_test_subset=100", "data.workers=0"]
STEPS_1 = 4  # training steps compared in test 1
EPOCHS, EVERY = 2, 2  # the runs of tests 2 and 3: 2 epochs, a checkpoint every 2 steps
RUN = [f"train.epochs={EPOCHS}", f"train.checkpoint_every_steps={EVERY}"]
GROUP_ATOL = 2e-6  # float32 rounding of sums taken in another order, through a few optimiser steps
KILL_STEP = 5  # rank 1 dies in the middle of the step after this many steps


DRIVER = r'''
import json, os, shutil, sys, time
import torch

spec = json.loads(sys.argv[1])
rank = int(os.environ.get("RANK", "0"))
out_dir = spec["out"]
os.makedirs(out_dir, exist_ok=True)

from smog.loop import Trainer


def state(trainer):
    p, m = trainer.progress, trainer.method
    return {"step": p.step, "epoch": p.epoch, "step_in_epoch": p.step_in_epoch,
            "groups": m.grouping.groups.detach().clone(),
            "model": {k: v.detach().clone() for k, v in m.state_dict().items()},
            "params": {k: v.detach().clone() for k, v in m.named_parameters()},
            "bank": m.bank.bank.clone(), "index": m.bank.index.clone(), "position": m.bank.position}


if spec.get("snapshots"):  # every rank's state at every checkpoint; rank 0 keeps each checkpoint file
    _save = Trainer.save
    def save(self):
        _save(self)
        step = self.progress.step
        torch.save(state(self), os.path.join(out_dir, f"rank{rank}-step{step}.pt"))
        if self.dist.world > 1:  # the rank's own file (memory bank, RNG) that a resume reads back
            shutil.copyfile(self.files.rank_path, os.path.join(out_dir, f"rank{rank}-file-step{step}.pt"))
        if self.dist.main:
            shutil.copyfile(self.files.main_path, os.path.join(out_dir, f"checkpoint-step{step}.pt"))
    Trainer.save = save

    _resume = Trainer.resume
    def resume(self, where):
        resumed = _resume(self, where)
        torch.save({"resumed": resumed, **state(self)}, os.path.join(out_dir, f"rank{rank}-loaded.pt"))
        return resumed
    Trainer.resume = resume

if spec.get("kill_step") is not None:  # rank `kill_rank` dies in the middle of step `kill_step` + 1:
    from smog_kernels import Grouping    # after its forward pass and group-statistics reduction,
    _forward = Grouping.forward          # before the backward's gradient all-reduce
    calls = [0]
    def forward(self, *args, **kwargs):
        out = _forward(self, *args, **kwargs)
        calls[0] += 1
        if rank == spec["kill_rank"] and calls[0] == spec["kill_step"] + 1:
            with open(os.path.join(out_dir, "killed"), "w") as marker:
                marker.write(repr(time.time()))
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(spec["kill_code"])
        return out
    Grouping.forward = forward

if spec["mode"] == "cli":
    from smog.cli import main
    sys.exit(main(spec["argv"]))

# mode "steps": bank fill, start of epoch 0, then `steps` training steps, recording every step
from smog.config import load_config

trainer = Trainer(load_config("digits", spec["overrides"]))
if spec.get("freeze_bn"):  # BatchNorm on running statistics: no coupling between a batch's samples
    for module in trainer.method.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
trainer.method.on_fit_start(trainer)
trainer.method.on_epoch_start(trainer, 0)
record = {"start_groups": trainer.method.grouping.groups.clone(), "steps": []}
for batch in trainer.data.batches(0, trainer.batch_size):
    if trainer.progress.step == spec["steps"]:
        break
    before = trainer.method.counts.clone()
    loss = trainer.step(batch)
    record["steps"].append({"index": batch["index"].clone(), "loss": loss,
                            "groups": trainer.method.grouping.groups.clone(), "counts": trainer.method.counts - before})
record["final"] = state(trainer)
torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
'''


# ---- launching ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


class Launch:
    """Processes started together; `wait()` collects (exit code, exit time, stdout+stderr) per process."""

    def __init__(self, commands: list[list[str]], envs: list[dict], logs: Path):
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = [logs / f"proc{i}.log" for i in range(len(commands))]
        self.handles = [open(path, "w") for path in self.logs]
        self.started = time.time()
        self.procs = [subprocess.Popen(cmd, env=env, cwd=logs, stdout=h, stderr=subprocess.STDOUT)
                      for cmd, env, h in zip(commands, envs, self.handles)]

    def wait(self, timeout_s: float = LAUNCH_TIMEOUT_S) -> list[tuple[int, float, str]]:
        deadline = self.started + timeout_s
        ended: dict[int, float] = {}
        while len(ended) < len(self.procs) and time.time() < deadline:
            for i, p in enumerate(self.procs):
                if i not in ended and p.poll() is not None:
                    ended[i] = time.time()
            time.sleep(0.05)
        stuck = [i for i in range(len(self.procs)) if i not in ended]
        for i in stuck:  # only the processes this launch started, by their handle
            self.procs[i].kill()
            self.procs[i].wait()
        for h in self.handles:
            h.close()
        texts = [path.read_text() for path in self.logs]
        assert not stuck, (f"processes {stuck} still running after {timeout_s} s: killed\n" +
                           "\n".join(f"--- process {i}:\n{t[-3000:]}" for i, t in enumerate(texts)))
        return [(p.returncode, ended[i], texts[i]) for i, p in enumerate(self.procs)]


def start_ranks(driver: Path, spec: dict, world: int, logs: Path) -> Launch:
    """`world` driver processes with the environment torchrun would give them (env:// on a free port)."""
    port = free_port()
    envs = []
    for rank in range(world):
        env = base_env()
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        envs.append(env)
    cmd = [sys.executable, str(driver), json.dumps(spec)]
    return Launch([cmd] * world, envs, logs)


def run_ranks(driver: Path, spec: dict, world: int, logs: Path) -> list[tuple[int, float, str]]:
    results = start_ranks(driver, spec, world, logs).wait()
    for rank, (code, _, text) in enumerate(results):
        assert code == 0, f"rank {rank} of {world} exited with {code}:\n{text[-4000:]}"
    return results


def run_torchrun(driver: Path, spec: dict, logs: Path) -> str:
    """The driver under `torchrun --standalone --nproc_per_node=2` (which sets the env:// variables)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(driver), json.dumps(spec)]
    [(code, _, text)] = Launch([cmd], [base_env()], logs).wait()
    assert code == 0, f"torchrun exited with {code}:\n{text[-4000:]}"
    return text


def train_args(run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--config", "digits", f"train.out_dir={run_dir.parent}", f"train.run_name={run_dir.name}",
            *COMMON, *RUN, *extra]


# ---- comparisons -------------------------------------------------------------------------------


def assert_equal_states(a: dict, b: dict, what: str) -> None:
    """Bit-for-bit equality of two recorded states (groups, every model tensor, memory bank)."""
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"], f"{what}: steps {a['step']} vs {b['step']}"
    assert torch.equal(a["groups"], b["groups"]), (
        f"{what}: groups differ (max |diff| {(a['groups'] - b['groups']).abs().max():.3g})")
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), f"{what}: model tensor {name} differs"
    assert_equal_banks(a, b, what)


def assert_equal_banks(a: dict, b: dict, what: str) -> None:
    """Bit-for-bit equality of two recorded memory banks: rows, their dataset indices, write position."""
    assert torch.equal(a["index"], b["index"]) and a["position"] == b["position"], (
        f"{what}: memory-bank samples differ ({int((a['index'] != b['index']).sum())} of {len(a['index'])} rows "
        f"hold another sample; write positions {a['position']} vs {b['position']})")
    assert torch.equal(a["bank"], b["bank"]), f"{what}: memory-bank rows differ"


def load_rank(folder: Path, name: str) -> dict:
    return torch.load(folder / name, map_location="cpu", weights_only=False)


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("driver") / "driver.py"
    path.write_text(DRIVER)
    return path


@pytest.fixture(scope="module")
def reference(driver, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank `smog train` (plain env:// processes): every rank's state at every
    checkpoint, and rank 0's checkpoint file at each, in the returned folder (run directory: run/)."""
    root = tmp_path_factory.mktemp("reference")
    spec = {"mode": "cli", "out": str(root / "snapshots"), "snapshots": True, "argv": train_args(root / "run")}
    run_ranks(driver, spec, WORLD, root / "logs")
    return root


# ---- 1. groups: identical on every rank, equal to one process ----------------------------------


def test_two_ranks_match_one_rank_with_the_same_global_batch(driver, tmp_path):
    # groups from the seeded initialisation (no re-clustering: see the module docstring), momentum 0.5 so
    # that every step moves them far more than the tolerance
    overrides = [f"train.out_dir={tmp_path / 'runs'}", *COMMON, "train.epochs=1", "method.recluster_every=0",
                 "method.beta_start=0.5", "method.beta_end=0.5"]
    spec = {"mode": "steps", "overrides": overrides, "steps": STEPS_1, "freeze_bn": True}
    two, one = tmp_path / "two", tmp_path / "one"
    launches = [start_ranks(driver, {**spec, "out": str(two)}, WORLD, tmp_path / "logs2"),
                start_ranks(driver, {**spec, "out": str(one)}, 1, tmp_path / "logs1")]
    for launch, world in zip(launches, (WORLD, 1)):
        for rank, (code, _, text) in enumerate(launch.wait()):
            assert code == 0, f"rank {rank} of {world} exited with {code}:\n{text[-4000:]}"
    ranks = [load_rank(two, f"rank{r}.pt") for r in range(WORLD)]
    single = load_rank(one, "rank0.pt")
    assert len(ranks[0]["steps"]) == len(single["steps"]) == STEPS_1

    for r in range(1, WORLD):
        for s, (mine, first) in enumerate(zip(ranks[r]["steps"], ranks[0]["steps"])):
            assert torch.equal(mine["groups"], first["groups"]), (
                f"rank {r}: groups after step {s + 1} differ from rank 0's "
                f"(max |diff| {(mine['groups'] - first['groups']).abs().max():.3g})")
            assert torch.equal(mine["counts"], first["counts"]), f"rank {r}: global group counts of step {s + 1} differ"
        for name, value in ranks[0]["final"]["model"].items():
            assert torch.equal(ranks[r]["final"]["model"][name], value), f"rank {r}: {name} differs from rank 0's"

    previous = single["start_groups"]
    for s in range(STEPS_1):
        mine = single["steps"][s]
        shares = [r["steps"][s] for r in ranks]
        union = torch.cat([x["index"] for x in shares])
        assert sorted(union.tolist()) == sorted(mine["index"].tolist()), \
            f"step {s + 1}: the ranks' batches together are not the single process's batch"
        assert len(set(union.tolist())) == len(union), f"step {s + 1}: a sample is in two ranks' batches"
        assert torch.equal(shares[0]["counts"], mine["counts"]), (
            f"step {s + 1}: global group counts differ from one process's "
            f"({shares[0]['counts'].tolist()} vs {mine['counts'].tolist()})")
        torch.testing.assert_close(shares[0]["groups"], mine["groups"], rtol=0, atol=GROUP_ATOL,
                                   msg=lambda m, s=s: f"step {s + 1}: groups differ from one process's: {m}")
        moved = float((mine["groups"] - previous).abs().max())
        assert moved > 100 * GROUP_ATOL, f"step {s + 1} hardly moved the groups ({moved:.3g}): a vacuous comparison"
        previous = mine["groups"]
        loss = sum(x["loss"] for x in shares) / WORLD  # equal shares: the mean of local means is the global mean
        assert loss == pytest.approx(mine["loss"], rel=1e-5, abs=1e-6), \
            f"step {s + 1}: loss {loss} on 2 ranks vs {mine['loss']} on one"
    for name, value in single["final"]["model"].items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(ranks[0]["final"]["model"][name], value), name
            continue
        torch.testing.assert_close(ranks[0]["final"]["model"][name], value, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name} after {STEPS_1} steps differs from one process's: {m}")


def test_ranks_keep_identical_groups_and_weights_through_reclustering(reference):
    """Every checkpoint of the uninterrupted 2-rank run (epoch 1 and 2, each opened by a distributed
    k-means of the rank's own memory bank): groups and every parameter bit-identical on both ranks."""
    snapshots = sorted((reference / "snapshots").glob("rank0-step*.pt"))
    assert len(snapshots) == EPOCHS * STEPS_PER_EPOCH // EVERY, [p.name for p in snapshots]
    for path in snapshots:
        states = [load_rank(path.parent, path.name.replace("rank0", f"rank{r}")) for r in range(WORLD)]
        for r in range(1, WORLD):
            assert torch.equal(states[r]["groups"], states[0]["groups"]), f"{path.name}: rank {r}'s groups differ"
            for name, param in states[0]["params"].items():
                assert torch.equal(states[r]["params"][name], param), f"{path.name}: rank {r}'s {name} differs"
        # the ranks' banks are their own (per-rank memory banks): not compared


def test_sync_batchnorm_option_on_cpu_ranks_trains(driver, tmp_path):
    """model.sync_bn_group=0 (all processes) on 2 CPU (gloo) ranks: `smog train` trains."""
    spec = {"mode": "cli", "out": str(tmp_path / "out"),
            "argv": train_args(tmp_path / "run", "model.sync_bn_group=0", "train.epochs=1")}
    for rank, (code, _, text) in enumerate(start_ranks(driver, spec, WORLD, tmp_path / "logs").wait()):
        assert code == 0, f"rank {rank}: model.sync_bn_group=0 on CPU ranks failed (exit {code}):\n{text[-1500:]}"


def test_a_training_time_budget_on_two_ranks_takes_the_same_steps_on_every_rank(driver, tmp_path):
    """train.minutes on 2 ranks: rank 0's clock decides every step (broadcast), so both ranks stop after the
    same step with bit-identical groups and weights, and the run ends within seconds of its training time."""
    minutes = 0.12
    out, run_dir = tmp_path / "out", tmp_path / "run"
    argv = ["train", "--config", "digits", f"train.out_dir={tmp_path}", "train.run_name=run", *COMMON,
            f"train.minutes={minutes}"]
    run_ranks(driver, {"mode": "cli", "out": str(out), "snapshots": True, "argv": argv}, WORLD, tmp_path / "logs")
    steps = [max(int(p.stem.split("step")[1]) for p in out.glob(f"rank{r}-step*.pt")) for r in range(WORLD)]
    assert steps[0] == steps[1] >= 2, steps
    last = [load_rank(out, f"rank{r}-step{steps[r]}.pt") for r in range(WORLD)]
    assert torch.equal(last[0]["groups"], last[1]["groups"])
    assert all(torch.equal(last[0]["params"][k], last[1]["params"][k]) for k in last[0]["params"])  # BN buffers are per rank
    final = [json.loads(line) for line in open(run_dir / "metrics.jsonl")][-1]
    assert final["kind"] == "epoch" and final["step"] == steps[0]
    assert minutes <= final["minutes"] < minutes + 5 / 60, final["minutes"]


# ---- 2. a rank dies mid-run --------------------------------------------------------------------


def test_killed_rank_stops_its_peer_and_the_last_checkpoint_resumes(driver, reference, tmp_path):
    run_dir = tmp_path / "run"
    spec = {"mode": "cli", "out": str(tmp_path / "killed"),
            "argv": train_args(run_dir, f"train.dist_timeout_s={PG_TIMEOUT_S}"),
            "kill_rank": 1, "kill_step": KILL_STEP, "kill_code": 17}
    results = start_ranks(driver, spec, WORLD, tmp_path / "logs").wait(timeout_s=LAUNCH_TIMEOUT_S)
    (code0, ended0, text0), (code1, _, text1) = results
    assert (tmp_path / "killed" / "killed").is_file(), f"rank 1 never reached step {KILL_STEP + 1}:\n{text1[-3000:]}"
    died = float((tmp_path / "killed" / "killed").read_text())
    assert code1 == 17, f"rank 1 exited with {code1}, not through the injected os._exit:\n{text1[-3000:]}"
    assert code0 != 0, f"rank 0 exited with 0 although its peer died in step {KILL_STEP + 1}:\n{text0[-3000:]}"
    assert ended0 - died <= PG_TIMEOUT_S + EXIT_SLACK_S, (
        f"rank 0 took {ended0 - died:.1f} s to exit after its peer died (process-group timeout {PG_TIMEOUT_S} s)")
    assert "Traceback" in text0 and re.search(r"\b(RuntimeError|DistBackendError|DistNetworkError|DistError)\b", text0), \
        f"rank 0 exited without reporting a distributed error:\n{text0[-3000:]}"

    # the last checkpoint written before the failure: rank 0 wrote it at the last multiple of EVERY
    last = KILL_STEP // EVERY * EVERY
    state = checkpoint.load(str(run_dir / "checkpoint.pt"))
    assert state["step"] == last and state["world"] == WORLD, (state["step"], state["world"])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not [p for p in os.listdir(run_dir) if p.startswith(".tmp-")], "a partial checkpoint was left behind"

    # `smog train --resume auto` on 2 ranks continues it to the end
    out = tmp_path / "resumed"
    run_ranks(driver, {"mode": "cli", "out": str(out), "snapshots": True,
                       "argv": train_args(run_dir, "--resume", "auto")}, WORLD, tmp_path / "logs-resume")
    ref = reference / "snapshots"
    for r in range(WORLD):
        loaded = load_rank(out, f"rank{r}-loaded.pt")
        assert loaded["resumed"] and loaded["step"] == last, f"rank {r} did not load the step-{last} checkpoint"
        assert torch.equal(loaded["groups"], state["model"]["grouping.groups"]), f"rank {r} loaded other groups than the checkpoint's"
        # through the end of the interrupted epoch the resumed run is the uninterrupted one, bit for bit
        for step in range(last + EVERY, STEPS_PER_EPOCH + 1, EVERY):
            resumed, whole = load_rank(out, f"rank{r}-step{step}.pt"), load_rank(ref, f"rank{r}-step{step}.pt")
            assert torch.equal(resumed["groups"], whole["groups"]), f"rank {r}, step {step}: groups differ after the resume"
            assert_equal_banks(resumed, whole, f"rank {r}, step {step} after the mid-epoch resume")
            for name in whole["model"]:
                assert torch.equal(resumed["model"][name], whole["model"][name]), \
                    f"rank {r}, step {step}: {name} differs from the uninterrupted run's after the resume"
    final = checkpoint.load(str(run_dir / "checkpoint.pt"))
    assert final["step"] == EPOCHS * STEPS_PER_EPOCH and final["epoch"] == EPOCHS, (final["step"], final["epoch"])
    epochs = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"epoch"' in line]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == list(range(EPOCHS))
    ranks_final = [load_rank(out, f"rank{r}-step{EPOCHS * STEPS_PER_EPOCH}.pt") for r in range(WORLD)]
    assert torch.equal(ranks_final[0]["groups"], ranks_final[1]["groups"]), "the resumed ranks' groups drifted apart"


# ---- 3. --resume auto after a completed epoch ---------------------------------------------------


def test_resume_auto_after_a_completed_epoch_is_exact(driver, reference, tmp_path):
    ref = reference / "snapshots"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copyfile(ref / f"checkpoint-step{STEPS_PER_EPOCH}.pt", run_dir / "checkpoint.pt")
    for r in range(WORLD):  # each rank's own memory bank and RNG state, written beside the checkpoint
        shutil.copyfile(ref / f"rank{r}-file-step{STEPS_PER_EPOCH}.pt", run_dir / f"rank{r}.pt")
    saved = checkpoint.load(str(run_dir / "checkpoint.pt"))
    assert saved["epoch"] == 1 and saved["step_in_epoch"] == 0, "not an end-of-epoch checkpoint"

    out = tmp_path / "resumed"
    run_torchrun(driver, {"mode": "cli", "out": str(out), "snapshots": True,
                          "argv": train_args(run_dir, "--resume", "auto")}, tmp_path / "logs")
    for r in range(WORLD):  # written by rank 0, loaded by every rank
        loaded = load_rank(out, f"rank{r}-loaded.pt")
        assert loaded["resumed"], f"rank {r} did not find the checkpoint"
        assert (loaded["step"], loaded["epoch"], loaded["step_in_epoch"]) == (saved["step"], 1, 0), f"rank {r}"
        assert torch.equal(loaded["groups"], saved["model"]["grouping.groups"]), f"rank {r} loaded other groups"
    for r in range(WORLD):  # and every rank has its own memory bank back, the one the next k-means clusters
        loaded, own = load_rank(out, f"rank{r}-loaded.pt"), load_rank(ref, f"rank{r}-step{STEPS_PER_EPOCH}.pt")
        assert_equal_banks(loaded, own, f"rank {r}: after the resume its memory bank is not the one it held when "
                                        f"the checkpoint was written, so the epoch-2 re-clustering of a resumed run "
                                        f"would differ from the uninterrupted run's")

    last = EPOCHS * STEPS_PER_EPOCH
    for r in range(WORLD):
        for step in range(STEPS_PER_EPOCH + EVERY, last + 1, EVERY):
            assert_equal_states(
                load_rank(out, f"rank{r}-step{step}.pt"), load_rank(ref, f"rank{r}-step{step}.pt"),
                f"rank {r}, step {step} of the run resumed after epoch 1 vs the uninterrupted run "
                f"(the memory banks the epoch-2 re-clustering used come from the checkpoint)")
    resumed = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    whole = [json.loads(line) for line in open(reference / "run" / "metrics.jsonl")]
    last_epoch = [r for r in whole if r["kind"] == "epoch"][-1]
    got = [r for r in resumed if r["kind"] == "epoch"]
    assert len(got) == 1 and got[0]["epoch"] == last_epoch["epoch"]
    assert (got[0]["loss"], got[0]["nonempty"], got[0]["knn"]) == \
        (last_epoch["loss"], last_epoch["nonempty"], last_epoch["knn"])
