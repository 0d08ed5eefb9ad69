"""The `smog` command: train, eval, bench, check, export, show. Each subcommand lives in its own module."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("smog.commands.train", "pretrain with SMoG: smog train [--config FILE] [key=value ...]"),
    "eval": ("smog.commands.eval", "evaluate a checkpoint: smog eval {knn,linear} CHECKPOINT_OR_RUN_DIR"),
    "bench": ("smog.benchmarks", "kernel benchmarks and auto's tuning: smog bench {kernels,tune}"),
    "check": ("smog.commands.check", "numerical parity of every op and backend against the reference"),
    "export": ("smog.commands.export", "a checkpoint's backbone for torchvision, timm or smog: smog export RUN"),
    "show": ("smog.commands.show", "pictures of a run: smog show groups RUN (images nearest to its groups)"),
}


def usage() -> str:
    lines = ["usage: smog COMMAND [ARGS ...]", "", "commands:"]
    lines += [f"  {name:<6} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"smog: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
