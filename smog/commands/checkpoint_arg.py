"""The checkpoint a user names on the command line: a checkpoint file, or a run directory (its checkpoint.pt)."""
from __future__ import annotations

import os

from smog import checkpoint
from smog.config import Config, config_from_dict
from smog.method import SMoG, build_model


class NotACheckpoint(ValueError):
    """The path names no checkpoint, or a file that is not a whole smog checkpoint of a run."""


def load(path: str) -> tuple[str, dict, dict]:
    """path -> (checkpoint file, its header (step, epoch, world, bytes, sha256), its state in today's layout).
    NotACheckpoint or checkpoint.CheckpointError, each naming the file, otherwise."""
    file = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise NotACheckpoint(f"no checkpoint at {file}")
    header = checkpoint.header(file)
    state = checkpoint.upgrade_layout(checkpoint.load(file))
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys():
        raise NotACheckpoint(f"{file} holds no model and config: it is not a run's checkpoint (a rank file?)")
    return file, header, state


def build(file: str, state: dict) -> tuple[Config, SMoG]:
    """The run's config and its model holding the checkpoint's weights (state from load(file))."""
    cfg = config_from_dict(state["config"])
    model = build_model(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise NotACheckpoint(f"{file}: its model does not match its config: {str(error).splitlines()[0]}") from None
    return cfg, model
