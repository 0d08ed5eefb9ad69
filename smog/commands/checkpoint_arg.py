"""The checkpoint a user names on the command line: a checkpoint file, or a run directory (its checkpoint.pt)."""
from __future__ import annotations

from smog import checkpoint
from smog.config import Config, config_from_dict
from smog.method import SMoG, build_model


class NotACheckpoint(ValueError):
    """A checkpoint whose model does not match its own config."""


def load(path: str) -> tuple[str, dict, dict]:
    """path -> (checkpoint file, its header (step, epoch, world, bytes, sha256), its training state), read
    without running code (smog.checkpoint.read). FileNotFoundError or checkpoint.CheckpointError, each naming
    the file in one line, otherwise."""
    return checkpoint.read_with_header(path)


def build(file: str, state: dict, overrides: list[str] | None = None) -> tuple[Config, SMoG]:
    """The run's config (with `section.key=value` overrides) and its model holding the checkpoint's weights
    (state from load(file))."""
    cfg = config_from_dict(state["config"], overrides)
    model = build_model(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise NotACheckpoint(f"{file}: its model does not match its config: {str(error).splitlines()[0]}") from None
    return cfg, model
