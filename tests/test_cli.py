"""The `smog` command's dispatch and `smog check` on this machine's backends."""
from __future__ import annotations

import json

from smog import cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_command_fails(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_check_reports_every_op_for_the_cpu_backend(tmp_path, capsys):
    out_file = tmp_path / "check.json"
    rc = cli.main(["check", "--backends", "cpu", "--shape", "67", "45", "19", "--json", str(out_file)])
    rows = json.loads(out_file.read_text())
    assert rc == 0, capsys.readouterr().out
    ops = {r["op"] for r in rows}
    step_ops = {f"{step} {what}" for step in ("step", "step f32 groups") for what in ("loss", "groups", "dloss/dp")}
    assert ops == {"assign score gap", "group_stats", "momentum_update", "loss", "dloss/dp",
                   "dloss/dgroups", "spherical_kmeans"} | step_ops
    assert not any(r["op"].startswith("step f32") for r in rows if r["dtype"] == "float32")
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16", "float16"}
    assert all(r["ok"] for r in rows)
