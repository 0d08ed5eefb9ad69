"""Checkpoint files: atomic writes that keep the previous file, a header with the step and a content
checksum, refusal (naming the file) of empty, truncated, foreign and corrupted files, `--resume auto`
falling back to the previous good checkpoint, and a write the file system refuses (disk full, a file
size limit, an out_dir under a regular file) stopping the run with the previous checkpoint intact."""
from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess

import pytest
import torch

from smog import checkpoint
from smog.cli import main as smog_main
from smog.config import load_config
from smog.loop import Trainer

SMALL = ["data.train_subset=256", "train.batch_size=32", "data.small_crops=1", "eval.knn_every=0",
         "train.checkpoint_every_steps=1", "train.progress=false"]


def trainer_for(out_dir, *overrides: str) -> Trainer:
    return Trainer(load_config("digits", [f"train.out_dir={out_dir}", *SMALL, *overrides]))


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


# ---- the file format -----------------------------------------------------------------------------


def test_a_file_holds_the_step_and_the_sha256_of_its_payload(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save({"step": 7, "epoch": 1, "world": 2, "w": torch.arange(5.0)}, str(path))
    raw = path.read_bytes()
    first, _, payload = raw.split(b"\n", 2)
    assert first == b"SMOG-CHECKPOINT 1"
    head = checkpoint.header(str(path))
    assert (head["step"], head["epoch"], head["world"], head["bytes"]) == (7, 1, 2, len(payload))
    assert head["sha256"] == hashlib.sha256(payload).hexdigest()  # hashlib on the bytes after the header line
    torch.testing.assert_close(checkpoint.load(str(path))["w"], torch.arange(5.0), rtol=0, atol=0)


@pytest.mark.parametrize("damage, reason", [
    ("empty", "empty"),
    ("truncated", "truncated"),
    ("header_cut", "header line is cut short"),
    ("flipped", "checksum mismatch"),
    ("foreign", "not a smog checkpoint"),
])
def test_a_damaged_or_foreign_file_is_refused_naming_it(tmp_path, damage, reason):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save({"step": 3, "w": torch.randn(100)}, str(path))
    raw = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(raw[: len(raw) - 50])
    elif damage == "header_cut":
        path.write_bytes(raw[: len(checkpoint.MAGIC) + 10])
    elif damage == "flipped":  # one bit of the payload, past the header
        at = len(raw) - 200
        path.write_bytes(raw[:at] + bytes([raw[at] ^ 1]) + raw[at + 1:])
    else:  # a checkpoint of another program: a plain torch.save file
        torch.save({"step": 3, "w": torch.randn(100)}, path)
    with pytest.raises(checkpoint.CheckpointError, match=reason) as error:
        checkpoint.load(str(path))
    assert str(path) in str(error.value)


def test_a_save_keeps_the_file_it_replaces_and_a_failed_save_leaves_both(tmp_path):
    path = str(tmp_path / "run" / "checkpoint.pt")
    checkpoint.save({"step": 1}, path)
    checkpoint.save({"step": 2}, path)
    assert checkpoint.load(path)["step"] == 2
    assert checkpoint.load(checkpoint.previous_path(path))["step"] == 1
    with pytest.raises(RuntimeError, match="cannot pickle"):
        checkpoint.save({"step": 3, "bad": Unpicklable()}, path)
    assert checkpoint.load(path)["step"] == 2 and checkpoint.load(checkpoint.previous_path(path))["step"] == 1
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint.prev.pt", "checkpoint.pt"]


def test_rng_state_round_trip():
    state = checkpoint.rng_state()
    first = torch.rand(4)
    checkpoint.set_rng_state(state)
    torch.testing.assert_close(torch.rand(4), first, rtol=0, atol=0)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        checkpoint.load(str(tmp_path / "nope.pt"))


# ---- resume --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """A run directory after 3 steps with a checkpoint every step: checkpoint.pt (step 3), .prev (step 2)."""
    root = tmp_path_factory.mktemp("three")
    trainer = trainer_for(root, "train.epochs=2")
    trainer.fit(stop_after_steps=3)
    return root


def test_resume_auto_falls_back_to_the_previous_checkpoint(three_steps, tmp_path, capsys):
    for damage in ("empty", "truncated", "flipped"):
        root = tmp_path / damage
        shutil.copytree(three_steps, root)
        bad = root / "digits" / "checkpoint.pt"
        raw = bad.read_bytes()
        damaged = {"empty": b"", "truncated": raw[:1000], "flipped": raw[:-10] + bytes([raw[-10] ^ 0x80]) + raw[-9:]}
        bad.write_bytes(damaged[damage])
        trainer = trainer_for(root, "train.epochs=2")
        assert trainer.resume("auto")
        assert (trainer.progress.epoch, trainer.progress.step) == (0, 2), damage
        reported = capsys.readouterr().err
        assert f"{bad} is refused" in reported, (damage, reported)
        assert (root / "digits" / "checkpoint.pt.set-aside").read_bytes() == damaged[damage]
        assert not bad.exists(), "the refused file was left where the next save would keep it as the previous"
        # the next save writes step 3 again and keeps step 2 as the previous checkpoint
        trainer.fit(stop_after_steps=1)
        assert checkpoint.header(str(bad))["step"] == 3
        assert checkpoint.header(checkpoint.previous_path(str(bad)))["step"] == 2


def test_resume_without_a_usable_checkpoint_is_refused(three_steps, tmp_path):
    root = tmp_path / "both"
    shutil.copytree(three_steps, root)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (root / "digits" / name).write_bytes(b"")
    trainer = trainer_for(root, "train.epochs=2")
    with pytest.raises(checkpoint.CheckpointError, match="no usable checkpoint"):
        trainer.resume("auto")
    code = smog_main(["train", "--config", "digits", f"train.out_dir={root}", *SMALL, "--resume", "auto"])
    assert code == 2


# ---- a write the file system refuses -------------------------------------------------------------


def _mount_tmpfs(folder, size: str) -> bool:
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True)
    return done.returncode == 0


@pytest.mark.parametrize("how", ["tmpfs_full", "file_size_limit"])
def test_a_refused_checkpoint_write_stops_the_run_and_keeps_the_previous(tmp_path, how, capsys):
    """tmpfs_full: out_dir on a 4 MB tmpfs that a filler file fills after the first checkpoints (a real
    ENOSPC; needs the right to mount). file_size_limit: RLIMIT_FSIZE below a checkpoint's size (a real
    EFBIG from the kernel, SIGXFSZ ignored), on any Linux. `smog train --resume auto` must then stop
    with exit 1 and a message naming the file, and leave both earlier checkpoints as they were."""
    out = tmp_path / "out"
    if how == "tmpfs_full" and not _mount_tmpfs(out, "4m"):
        pytest.skip("mounting a tmpfs needs CAP_SYS_ADMIN, absent here")
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.getsignal(signal.SIGXFSZ)
    try:
        trainer_for(out, "train.epochs=2").fit(stop_after_steps=2)
        run = out / "digits"
        path = run / "checkpoint.pt"
        before = {name: (run / name).read_bytes() for name in ("checkpoint.pt", "checkpoint.prev.pt")}
        if how == "tmpfs_full":
            with open(out / "filler", "wb") as filler:
                filler.write(b"\0" * (shutil.disk_usage(out).free - path.stat().st_size // 4))
        else:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size // 2, limits[1]))
        code = smog_main(["train", "--config", "digits", f"train.out_dir={out}", *SMALL, "--resume", "auto"])
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        message = capsys.readouterr().err
        expected = "No space left on device" if how == "tmpfs_full" else "File too large"
        assert code == 1 and f"cannot write checkpoint {path}: {expected}" in message, (code, message)
        assert "Traceback" not in message
        for name, raw in before.items():
            assert (run / name).read_bytes() == raw, f"{name} changed by the failed write"
        assert checkpoint.header(str(path))["step"] == 2
        assert not [p for p in os.listdir(run) if p.startswith(".tmp-")], "a temp file was left behind"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
        if how == "tmpfs_full":
            subprocess.run(["umount", str(out)], check=True)


def test_an_out_dir_under_a_regular_file_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = smog_main(["train", "--config", "digits", f"train.out_dir={blocker / 'runs'}", *SMALL])
    message = capsys.readouterr().err
    assert code == 2 and "train.out_dir=" in message and "cannot write the run directory" in message, message
    assert "Traceback" not in message
