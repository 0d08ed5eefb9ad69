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

import numpy as np
import torch

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
