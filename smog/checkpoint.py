"""Checkpoint files that can be trusted, and the RNG states that make a resume exact.

A file is `SMOG-CHECKPOINT <version>\\n`, one JSON header line (step, epoch, world, payload bytes, sha256 of
the payload), then the torch.save payload. It is written to a temp file, fsynced and renamed over the old
one (os.replace), and the file it replaces is kept as `<name>.prev.pt`: a crash at any moment leaves the
last two complete checkpoints. A file that is empty, cut short, foreign or whose payload fails its checksum
is refused with a CheckpointError naming it.

Loading runs no code from the file. The sha256 proves the payload whole, not who wrote it, so the payload's
pickle is first read for the globals it would import (pickletools reads its opcodes, running none) and
refused, naming them, unless each is one that smog writes (GLOBALS: tensors, their storages, OrderedDict);
then torch.load(weights_only=True) rebuilds it. What smog saves is tensors, numbers, strings and plain
containers; numpy's RNG state is held as a tensor. Version 1 files held that state as an ndarray: they load
with exactly numpy's uint32-array globals allowed besides, and upgrade() brings them to the current layout.
A change of layout bumps VERSION and adds UPGRADES[the old version].

read(path) is the entry for a file a user names (`smog eval`, `smog train --resume PATH`): anything but a
smog training checkpoint is refused in one line saying what the file is.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickletools
import random
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from smog.config import ConfigError

VERSION = 3
MAGIC = f"SMOG-CHECKPOINT {VERSION}\n".encode()
_MAGIC = re.compile(rb"SMOG-CHECKPOINT (\d+)\n")
HEADER_LIMIT = 4096  # the header line is far shorter; a file without a newline before this is not ours
STORAGES = ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
GLOBALS = frozenset({"collections.OrderedDict", "torch._utils._rebuild_tensor_v2",
                     *(f"torch.{kind}Storage" for kind in STORAGES)})
_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]  # the function numpy arrays are pickled through
# version 1 held numpy's RNG state (a uint32 array): its payloads also import these, and only these
_V1_GLOBALS = GLOBALS | {"_codecs.encode", "numpy.ndarray", "numpy.dtype", "numpy.core.multiarray._reconstruct",
                         f"{_RECONSTRUCT.__module__}.{_RECONSTRUCT.__name__}"}
_V1_SAFE = [_RECONSTRUCT, (_RECONSTRUCT, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]
_TRAINING = ("config", "model")  # what every command that takes a training checkpoint reads


class CheckpointError(ValueError):
    """A checkpoint file that must not be loaded (empty, truncated, foreign, checksum mismatch, code in it)."""


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
    partial file. With keep_previous the file it replaces stays as previous_path(path). A state holding an
    object that would need code to rebuild (anything outside GLOBALS) is a TypeError, nothing written."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    foreign = sorted(set(_imports(_pickle_of(buffer))) - GLOBALS)
    if foreign:
        raise TypeError(f"cannot checkpoint to {path}: the state holds {', '.join(foreign)}, which a smog checkpoint "
                        f"may not hold (loading would run code); store tensors, numbers, strings and plain containers")
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


# ----------------------------------------------------------------- reading without running code
def _pickle_of(stream: io.BytesIO) -> bytes:
    """The pickle of a torch.save payload: its archive's data.pkl, or the payload itself when it is not an
    archive (a bare pickle)."""
    if not zipfile.is_zipfile(stream):
        return stream.getvalue()
    with zipfile.ZipFile(stream) as archive:
        names = [name for name in archive.namelist() if name.endswith("/data.pkl") or name == "data.pkl"]
        return archive.read(names[0]) if names else b""


def _imports(data: bytes) -> list[str]:
    """module.name of every global the pickle `data` would import, read from its opcodes without running any
    (GLOBAL and INST name theirs; STACK_GLOBAL takes the two strings pushed last, directly or from the memo).
    ValueError when `data` is not a whole pickle."""
    found: list[str] = []
    pushed: list[Any] = []  # the value each push left on the stack: a string, or None for anything else
    memo: dict[int, Any] = {}
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("GLOBAL", "INST"):
            found.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            found.append(".".join(str(s) for s in pushed[-2:]))
        if op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1] if pushed else None
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        elif op.stack_after and op.name not in ("FRAME", "PROTO"):
            pushed.append(arg if isinstance(arg, str) and op.name not in ("GLOBAL", "INST") else None)
    return found


def _read(path: str) -> tuple[int, dict, memoryview]:
    """(format version, header, payload) of a checked file; CheckpointError naming `path` otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as handle:
        start = handle.read(HEADER_LIMIT)
        magic = _MAGIC.match(start)
        if magic is None:
            if not start:
                raise CheckpointError(f"checkpoint {path} is refused: it is empty (0 bytes)")
            raise CheckpointError(f"checkpoint {path} is refused: not a smog checkpoint, it is {describe(path)}; "
                                  f"smog expected a file written by smog train, starting with 'SMOG-CHECKPOINT'")
        data = start + handle.read()
    version = int(magic[1])
    if not 1 <= version <= VERSION:
        raise CheckpointError(f"checkpoint {path} is refused: it has format version {version}, this smog reads "
                              f"versions 1 to {VERSION} (a newer smog wrote it: upgrade smog)")
    end = data.find(b"\n", magic.end(), HEADER_LIMIT)
    try:
        header = json.loads(data[magic.end():end]) if end > 0 else None
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
    return version, header, payload


def header(path: str) -> dict:
    """The header (step, epoch, world, bytes, sha256; and version, its format) of a file whose whole payload
    passed its checksum."""
    version, head, _ = _read(path)
    return {**head, "version": version}


def load(path: str, device: torch.device | str = "cpu") -> dict:
    """The state saved at `path` (any file save() wrote), in the current layout, after the checks of header()
    and with nothing in it run: a payload importing anything but what smog writes is a CheckpointError naming
    the file and the globals. FileNotFoundError when there is no file."""
    return _load(path, device)[1]


def _load(path: str, device: torch.device | str) -> tuple[dict, dict]:
    """(header(path), load(path))."""
    version, head, payload = _read(path)
    allowed = GLOBALS if version >= 2 else _V1_GLOBALS
    stream = io.BytesIO(payload)
    try:
        imports = _imports(_pickle_of(stream))
    except (ValueError, zipfile.BadZipFile, EOFError) as error:
        raise CheckpointError(f"checkpoint {path} is refused: its payload is not a readable torch.save archive "
                              f"({error})") from None
    foreign = sorted(set(imports) - allowed)
    if foreign:
        raise CheckpointError(f"checkpoint {path} is refused: its payload would import {', '.join(foreign)}, which "
                              f"no smog checkpoint holds (loading would run code); nothing in it was run")
    stream.seek(0)
    try:
        with torch.serialization.safe_globals([] if version >= 2 else _V1_SAFE):
            state = torch.load(stream, map_location=device, weights_only=True)
    except Exception as error:  # noqa: BLE001 (torch's weights-only unpickler refusing it, or a malformed archive)
        lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        reason = next((line for line in lines if "WeightsUnpickler error" in line), lines[0])
        raise CheckpointError(f"checkpoint {path} is refused: its payload cannot be rebuilt from tensors and "
                              f"plain containers alone ({reason[:200]}); nothing in it was run") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is refused: its payload holds a {type(state).__name__}, not a "
                              f"dict of training state")
    return {**head, "version": version}, upgrade(state, version)


def read(path: str, device: torch.device | str = "cpu") -> dict:
    """The training state in the checkpoint a user named (a run directory means its checkpoint.pt), as load()
    gives it. A file that is not a smog training checkpoint (another program's torch file, a smog rank file,
    damage, code in the payload) is a CheckpointError whose one-line message says what the file is and what
    smog expected; FileNotFoundError when there is no file."""
    return read_with_header(path, device)[2]


def read_with_header(path: str, device: torch.device | str = "cpu") -> tuple[str, dict, dict]:
    """(the checkpoint file, its header, its training state) of the checkpoint a user named, as read()."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    head, state = _load(path, device)
    if not all(key in state for key in _TRAINING):
        if "rank" in state:
            what = f"one process's memory bank and RNG state (a rank file of a {state.get('world')}-process run)"
        else:
            what = f"a smog file holding only {', '.join(map(str, state))}"
        raise CheckpointError(f"checkpoint {path} is refused: it is {what}, not a training checkpoint; smog "
                              f"expected checkpoint.pt of a run directory, written by smog train")
    return path, head, state


_LEGACY_TORCH = bytes.fromhex("80028a0a6cfc9c46f9206aa85019")  # the pickled magic number torch < 1.6 wrote first


def describe(path: str) -> str:
    """What a file that is not a smog checkpoint holds, in a few words, found without running any of it."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            start = handle.read(len(_LEGACY_TORCH))
        if start == _LEGACY_TORCH:
            return "a torch file in the format before torch 1.6"
        return "a Python pickle, not a torch file" if start[:1] == b"\x80" else "not a torch file either"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [name for name in names if name.endswith("data.pkl")]
            imports = set(_imports(archive.read(pickles[0]))) if pickles else set()
    except (zipfile.BadZipFile, ValueError, EOFError):
        return "a damaged zip archive or torch file"
    if any(name.endswith("/constants.pkl") for name in names):
        return "a TorchScript model"
    if not pickles:
        return "a zip archive, not a torch file"
    if any(name.startswith(("pytorch_lightning.", "lightning.")) for name in imports):
        return "a PyTorch Lightning checkpoint (lightly trains with Lightning)"
    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 (it needs code to rebuild, a pickled model or other objects, or is damaged)
        usual = ("torch", "builtins", "__builtin__", "collections", "_codecs")  # the telling names first
        foreign = sorted(imports - GLOBALS, key=lambda name: (name.split(".")[0] in usual, name))
        return (f"a torch file of pickled objects that need code to load ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''})")
    return _kind(content)


def _kind(content: Any) -> str:
    """describe() of a torch file's loaded content."""
    if isinstance(content, torch.Tensor):
        return f"a torch file holding one tensor of shape {tuple(content.shape)}"
    if not isinstance(content, dict):
        return f"a torch file holding a {type(content).__name__}"
    if "pytorch-lightning_version" in content:
        return (f"a PyTorch Lightning checkpoint of epoch {content.get('epoch')} with "
                f"{len(content.get('state_dict', {}))} tensors in its state_dict (lightly trains with Lightning)")
    if content and all(isinstance(value, torch.Tensor) for value in content.values()):
        return (f"a state dict of {len(content)} tensors (a model's weights, as torchvision, timm or "
                f"torch.save(model.state_dict()) write them)")
    keys = [str(key) for key in list(content)[:6]]
    return f"a torch file holding a dict of {', '.join(keys)}{', ...' if len(content) > 6 else ''}"


# ----------------------------------------------------------------- versions
def _numpy_state(state: tuple) -> tuple:
    """numpy's RNG state with its uint32 key array held as an int64 tensor (an array needs code to rebuild)."""
    name, keys, position, has_gauss, gauss = state
    return name, torch.from_numpy(np.asarray(keys).astype(np.int64)), position, has_gauss, gauss


def _from_version_1(state: dict) -> dict:
    if "rng" in state:
        state["rng"]["numpy"] = _numpy_state(state["rng"]["numpy"])
    return state


def _from_version_2(state: dict) -> dict:
    """Before the method owned its state: the groups at model "groups", the memory bank and the RNG states at
    the top, the group counts in the meter."""
    rank = {"rng": state.pop("rng"), "method": {"bank": state.pop("bank")}}
    if not state.pop("bank_ready", True):
        rank["method"] = None
    state["rank"] = rank
    if "model" in state:  # a main checkpoint (rank files hold no model)
        state["model"]["grouping.groups"] = state["model"].pop("groups")
        state["method"] = {"counts": state["meter"].pop("counts")}
    return state


UPGRADES: dict[int, Callable[[dict], dict]] = {1: _from_version_1, 2: _from_version_2}  # version n -> n + 1


def upgrade(state: dict, version: int) -> dict:
    """A state loaded from a file of format `version`, in the current version's layout."""
    for old in range(version, VERSION):
        state = UPGRADES[old](state)
    return state


# ----------------------------------------------------------------- RNG
def rng_state() -> dict:
    """The RNG states of torch (and CUDA), numpy and Python, as tensors and plain containers."""
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(np.random.get_state()),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned (its tensors on any device)."""
    torch.set_rng_state(state["torch"].cpu())
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class RunFiles:
    """The checkpoint files of a run directory and the resume policy across processes.

    checkpoint.pt (written by rank 0) holds everything, rank 0's own state included; with several
    processes every rank also writes its own state (memory bank, RNG) to rank{r}.pt first. Each write keeps
    the file it replaces (*.prev.pt), so a crash at any moment leaves a position (epoch, step) that the
    checkpoint and every rank file hold.
    """

    def __init__(self, run_dir: str, rank: int, world: int, say: Callable[[str], None]):
        """say: prints a line from this process (what concerns every rank is said by rank 0 only)."""
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
        if where == "auto":
            paths = [self.main_path, previous_path(self.main_path)]
            if not any(os.path.exists(p) for p in paths):
                return None
            mains, refused = self._usable(paths, report=self.rank == 0)
        else:  # a file the user named: anything but a smog checkpoint is refused in one line
            if not os.path.isfile(where):
                raise FileNotFoundError(f"no checkpoint at {where}")
            head = header(where)
            mains, refused = {(head["epoch"], head["step"]): where}, []
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
        state = read(mains[position], device)
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
            own = load(owns[position], device)["rank"]
        elif self.world > 1:
            lag = [r for r, held in enumerate(every) if position not in held]
            if self.rank == 0:
                self.say(f"{mains[position]} holds epoch {position[0]}, step {position[1]}, but the rank files of "
                         f"ranks {lag} hold {[sorted(every[r]) for r in lag]} (they lag or lead): resuming that "
                         f"step with the memory bank refilled by the fill pass")
            own = {"rng": own["rng"], "method": None}
        return state, own
