"""`smog export RUN_OR_CHECKPOINT [--format torchvision|timm|smog] [--out FILE]`: the online backbone of a
checkpoint as a plain state dict (projector, predictor, momentum network and groups left out) that loads with
strict=True into the matching torchvision or timm model built without classifier, or into smog's own backbone.

Beside FILE, FILE's .json: the run's resolved config, the checkpoint's path, step, epoch and sha256, the input
the backbone expects (channels, size, normalisation), FILE's sha256 and the Python lines that load it.
--format defaults to the backbone's own library (smog for small_cnn and resnet50w2), --out to
backbone_<format>.pt beside the checkpoint."""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile

import torch

from smog import checkpoint
from smog.commands import checkpoint_arg
from smog.config import ConfigError, to_dict
from smog.data import data_info
from smog.export import FORMATS, ExportError, backbone_state, formats, loading_code


def write_atomic(path: str, data: bytes) -> None:
    """`data` into `path` through a temporary file in its folder: a reader sees the old file or the whole new one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smog export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint file or a run directory (its checkpoint.pt)")
    parser.add_argument("--format", choices=FORMATS, default=None, help="key names of torchvision, timm or smog")
    parser.add_argument("--out", default=None, help="the state dict file (default: backbone_<format>.pt beside "
                                                    "the checkpoint)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        file, header, state = checkpoint_arg.load(args.checkpoint)
        cfg, model = checkpoint_arg.build(file, state)
        fmt = args.format or formats(cfg.model)[0]
        weights = backbone_state(model.encoder(), cfg.model, fmt)
        out = args.out or os.path.join(os.path.dirname(file), f"backbone_{fmt}.pt")
        recipe = os.path.splitext(out)[0] + ".json"
        buffer = io.BytesIO()
        torch.save(weights, buffer)
        payload = buffer.getvalue()
        info = data_info(cfg.data)
        about = {"format": fmt, "weights": out, "sha256": hashlib.sha256(payload).hexdigest(),
                 "backbone": cfg.model.backbone, "features": model.encoder().out_features,
                 "input": {"channels": info.channels, "size": info.size, "mean": list(info.mean), "std": list(info.std)},
                 "load": loading_code(cfg, fmt, out, recipe).splitlines(),
                 "checkpoint": {"path": file, "step": header["step"], "epoch": header.get("epoch"),
                                "sha256": header["sha256"]},
                 "config": to_dict(cfg)}
        for path, data in ((out, payload), (recipe, (json.dumps(about, indent=1) + "\n").encode())):
            try:
                write_atomic(path, data)
            except OSError as error:
                raise ExportError(f"cannot write {path}: {error.strerror or error}") from None
    except (FileNotFoundError, checkpoint_arg.NotACheckpoint, checkpoint.CheckpointError, ConfigError,
            ExportError) as error:
        print(f"smog export: error: {error}", file=sys.stderr)
        return 2
    print(f"{file} (step {header['step']}): {cfg.model.backbone} as {fmt} -> {out}, {recipe}\n"
          f"load it with:\n" + "\n".join(about["load"]))
    return 0
