"""Checkpoint files that can be trusted, and the RNG states that make a resume exact.

A file is `SMOG-CHECKPOINT 1\\n`, one JSON header line (step, epoch, world, payload bytes, sha256 of the
payload), then the torch.save payload. It is written to a temp file, fsynced and renamed over the old one
(os.replace), and the file it replaces is kept as `<name>.prev.pt`: a crash at any moment leaves the last
two complete checkpoints. A file that is empty, cut short, foreign or whose payload fails its checksum is
refused with a CheckpointError naming it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tempfile
from typing import Callable

import numpy as np
import torch

from smog.config import ConfigError

MAGIC = b"SMOG-CHECKPOINT 1\n"
HEADER_LIMIT = 4096  # the header line is far shorter; a file without a newline before this is not ours


class CheckpointError(ValueError):
    """A checkpoint file that must not be loaded (empty, truncated, foreign, checksum mismatch)."""


class CheckpointWriteError(RuntimeError):
    """The file system refused a checkpoint write (disk full, unwritable folder); the previous file is intact."""


def previous_path(path: str) -> str:
    """checkpoint.pt -> checkpoint.prev.pt: where save() keeps the file it replaces."""
    stem, ext = os.path.splitext(path)
    return f"{stem}.prev{ext}"


def _fsync_folder(folder: str) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _keep_previous(path: str, folder: str) -> None:
    """path -> previous_path(path) as a hard link (a copy where links are not supported), atomically."""
    tmp = os.path.join(folder, f".tmp-prev-{os.getpid()}-{os.path.basename(path)}")
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, previous_path(path))


def save(state: dict, path: str, keep_previous: bool = True) -> None:
    """Write `state` (a dict with "step", and "epoch"/"world" when known) to `path`; a reader never sees a
    partial file. With keep_previous the file it replaces stays as previous_path(path)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    header = {"step": int(state["step"]), "epoch": state.get("epoch"), "world": state.get("world"),
              "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
        with os.fdopen(handle, "wb") as out:
            out.write(MAGIC + json.dumps(header).encode() + b"\n")
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        if keep_previous and os.path.isfile(path):
            _keep_previous(path, folder)
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(folder)
    except OSError as error:
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {error.strerror or error}; the previous "
                                   f"checkpoint, if any, is left intact") from error
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _read(path: str) -> tuple[dict, memoryview]:
    """(header, payload) of a checked file; CheckpointError naming `path` otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as handle:
        data = handle.read()
    if not data:
        raise CheckpointError(f"checkpoint {path} is refused: it is empty (0 bytes)")
    if not data.startswith(MAGIC):
        raise CheckpointError(f"checkpoint {path} is refused: not a smog checkpoint (it does not start with "
                              f"the {MAGIC.strip().decode()!r} header)")
    end = data.find(b"\n", len(MAGIC), HEADER_LIMIT)
    try:
        header = json.loads(data[len(MAGIC):end]) if end > 0 else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or not {"step", "bytes", "sha256"} <= header.keys():
        raise CheckpointError(f"checkpoint {path} is refused: its header line is cut short or unreadable")
    payload = memoryview(data)[end + 1:]
    if len(payload) != header["bytes"]:
        raise CheckpointError(f"checkpoint {path} is refused: truncated or padded, it holds {len(payload)} "
                              f"payload bytes where its header says {header['bytes']} (step {header['step']})")
    digest = hashlib.sha256(payload).hexdigest()
    if digest != header["sha256"]:
        raise CheckpointError(f"checkpoint {path} is refused: content checksum mismatch (sha256 {digest[:12]}... "
                              f"vs {header['sha256'][:12]}... in its header, step {header['step']})")
    return header, payload


def header(path: str) -> dict:
    """The header (step, epoch, world, bytes, sha256) of a file whose whole payload passed its checksum."""
    return _read(path)[0]


def load(path: str, device: torch.device | str = "cpu") -> dict:
    """The state saved at `path`, after the checks of header(); CheckpointError or FileNotFoundError otherwise."""
    _, payload = _read(path)
    return torch.load(io.BytesIO(payload), map_location=device, weights_only=False)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def upgrade_layout(state: dict) -> dict:
    """A checkpoint or rank file of the layout written before the method owned its state (model groups at
    "groups", the memory bank and RNG states at the top) in today's layout; others unchanged."""
    if "rank" in state or "bank" not in state:
        return state
    state = dict(state)
    rank = {"rng": state.pop("rng"), "method": {"bank": state.pop("bank")}}
    if not state.pop("bank_ready", True):
        rank["method"] = None
    state["rank"] = rank
    if "model" in state:  # a main checkpoint (rank files hold no model)
        model = dict(state["model"])
        model["grouping.groups"] = model.pop("groups")
        state["model"] = model
        meter = dict(state["meter"])
        state["method"] = {"counts": meter.pop("counts")}
        state["meter"] = meter
    return state


class RunFiles:
    """The checkpoint files of a run directory and the resume policy across processes.

    checkpoint.pt (written by rank 0) holds everything, rank 0's own state included; with several
    processes every rank also writes its own state (memory bank, RNG) to rank{r}.pt first. Each write keeps
    the file it replaces (*.prev.pt), so a crash at any moment leaves a position (epoch, step) that the
    checkpoint and every rank file hold.
    """

    def __init__(self, run_dir: str, rank: int, world: int, say: Callable[[str], None]):
        self.rank, self.world, self.say = rank, world, say
        self.main_path = os.path.join(run_dir, "checkpoint.pt")
        self.rank_path = os.path.join(run_dir, f"rank{rank}.pt")

    def _barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def save(self, state: dict, own: dict) -> None:
        """state: the whole checkpoint (rank 0 writes it); own: this rank's part ({"step", "epoch", "world",
        "rank": ...}), written by every rank when there are several."""
        if self.world > 1:
            save(own, self.rank_path)
            self._barrier()
        if self.rank == 0:
            save(state, self.main_path)
        self._barrier()

    def _usable(self, paths: list[str], world: int | None = None, report: bool = True) -> tuple[dict, list[str]]:
        """({(epoch, step): path} of the files among `paths` that pass their checks (and were written by
        `world` processes, if given), refused paths); with `report` each refusal is said."""
        usable, refused = {}, []
        for path in paths:
            if not os.path.exists(path):
                continue
            try:
                head = header(path)
            except CheckpointError as error:
                if report:
                    self.say(str(error))
                refused.append(path)
                continue
            if world is None or head["world"] == world:
                usable.setdefault((head["epoch"], head["step"]), path)
        return usable, refused

    def _set_aside(self, usable: dict, refused: list[str], position: tuple) -> None:
        """Rename refused files and files newer than the resumed `position` (another timeline) to *.set-aside,
        so that the next saves cannot rotate them back in."""
        for path in refused + [p for pos, p in usable.items() if pos > position]:
            os.replace(path, path + ".set-aside")
            self.say(f"set aside {path} as {path}.set-aside")

    def restore(self, where: str, device: torch.device, steps_per_epoch: int) -> tuple[dict, dict | None] | None:
        """where: "" (fresh), "auto" (this run's newest usable checkpoint, if any) or a path. Returns None for a
        fresh start, else (the checkpoint's state, this rank's own state or None when no rank file holds the
        resumed position: the memory bank is then refilled).

        auto tries checkpoint.pt, then checkpoint.prev.pt, and resumes the newest position (epoch, step) that
        the checkpoint and every rank's own file hold; a refused file is reported and set aside. A checkpoint
        written by another number of processes resumes only with the same steps per epoch.
        """
        if not where:
            return None
        paths = [self.main_path, previous_path(self.main_path)] if where == "auto" else [where]
        if where == "auto" and not any(os.path.exists(p) for p in paths):
            return None
        if where != "auto" and not os.path.isfile(where):
            raise FileNotFoundError(f"checkpoint not found: {where}")
        mains, refused = self._usable(paths, report=self.rank == 0)
        if not mains:
            raise CheckpointError(f"no usable checkpoint to resume: {', '.join(refused)} refused "
                                  f"(see above); start afresh without --resume or pass another path")
        owns, own_refused = ({}, [])
        every: list[set] = []
        if self.world > 1:
            owns, own_refused = self._usable([self.rank_path, previous_path(self.rank_path)], self.world)
            every = [set()] * self.world
            torch.distributed.all_gather_object(every, set(owns))
        common = set(mains).intersection(*every)
        position = max(common) if common else max(mains)
        state = upgrade_layout(load(mains[position], device))
        if state["world"] != self.world and state["steps_per_epoch"] != steps_per_epoch:
            raise ConfigError(f"{mains[position]} was written by {state['world']} processes with "
                              f"{state['steps_per_epoch']} steps per epoch; this run has {self.world} processes "
                              f"and {steps_per_epoch}: resume it with {state['world']} processes")
        if self.rank == 0:
            self._set_aside(mains, refused, position)
        if self.world > 1:
            self._set_aside(owns, own_refused, position)
        own = state["rank"]
        if state["world"] != self.world:
            if self.rank == 0:
                self.say(f"{mains[position]} was written by {state['world']} processes, this run has {self.world}: "
                         f"resuming at epoch {state['epoch']}, step {state['step']} with the memory bank refilled "
                         f"by the fill pass (not bit-identical to a run that kept {state['world']})")
            own = {"rng": own["rng"], "method": None}
        elif self.world > 1 and position in owns:
            own = upgrade_layout(load(owns[position], device))["rank"]
        elif self.world > 1:
            lag = [r for r, held in enumerate(every) if position not in held]
            if self.rank == 0:
                self.say(f"{mains[position]} holds epoch {position[0]}, step {position[1]}, but the rank files of "
                         f"ranks {lag} hold {[sorted(every[r]) for r in lag]} (they lag or lead): resuming that "
                         f"step with the memory bank refilled by the fill pass")
            own = {"rng": own["rng"], "method": None}
        return state, own
