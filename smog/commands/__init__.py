"""The `smog` subcommands, one module each (smog.cli dispatches to them)."""
