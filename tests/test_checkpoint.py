"""Checkpoint files: atomic writes that keep the previous file, a header with the step and a content
checksum, refusal (naming the file) of empty, truncated, foreign and corrupted files, `--resume auto`
falling back to the previous good checkpoint, and a write the file system refuses (disk full, a file
size limit, an out_dir under a regular file) stopping the run with the previous checkpoint intact.

Loading runs no code: a payload that would call a function is refused before any of it runs; every
file smog writes loads back whole; files of format version 1 (tests/data/*_v1.pt, written by commit
cc8dd0b: a 1-process digits run's checkpoint.pt and a 2-process run's rank0.pt, 743 KB together) load
upgraded; another program's torch file gets one line saying what it is, in every command."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from smog import checkpoint
from smog.cli import main as smog_main
from smog.config import config_from_dict, load_config
from smog.loop import Trainer

DATA = Path(__file__).parent / "data"
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
    assert first == b"SMOG-CHECKPOINT 3"
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


# ---- loading runs no code ------------------------------------------------------------------------


class MakesFolder:
    """Pickles as a call of os.mkdir(path): what a hostile payload does (a side effect a test can see)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def with_header(path, payload: bytes, version: int = checkpoint.VERSION) -> None:
    """`payload` behind a valid smog header (the magic of `version`, step, size and sha256)."""
    head = {"step": 1, "epoch": 0, "world": 1, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    path.write_bytes(f"SMOG-CHECKPOINT {version}\n".encode() + json.dumps(head).encode() + b"\n" + payload)


def payload_of(path) -> bytes:
    return path.read_bytes().split(b"\n", 2)[2]


@pytest.mark.parametrize("pickling", ["torch.save", "pickle protocol 2", "pickle protocol 5"])
@pytest.mark.parametrize("version", [1, checkpoint.VERSION])
def test_a_payload_calling_a_function_of_os_is_refused_and_never_runs(tmp_path, capsys, pickling, version):
    marker = tmp_path / "it-ran"
    state = {"step": 1, "config": {}, "model": MakesFolder(str(marker))}
    buffer = io.BytesIO()
    if pickling == "torch.save":
        torch.save(state, buffer)
    else:
        pickle.dump(state, buffer, protocol=int(pickling[-1]))
    path = tmp_path / "checkpoint.pt"
    with_header(path, buffer.getvalue(), version)
    name = f"{os.mkdir.__module__}.{os.mkdir.__name__}"
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.load(str(path))
    assert str(path) in str(error.value) and name in str(error.value)
    assert smog_main(["eval", "knn", str(path)]) == 2
    resume = ["train", "--config", "digits", f"train.out_dir={tmp_path}", *SMALL, "--resume", str(path)]
    assert smog_main(resume) == 2
    for line in capsys.readouterr().err.strip().splitlines():  # one line per command, naming file and global
        assert str(path) in line and name in line and "Traceback" not in line
    assert not marker.exists(), "loading the checkpoint ran the function in it"
    live = io.BytesIO(payload_of(path))  # the payload is live: read without restriction, it runs
    torch.load(live, weights_only=False) if pickling == "torch.save" else pickle.load(live)
    assert marker.is_dir()


def test_a_state_that_would_need_code_to_load_is_never_written(tmp_path):
    path = tmp_path / "c.pt"
    with pytest.raises(TypeError, match="numpy") as error:
        checkpoint.save({"step": 1, "x": np.zeros(3)}, str(path))
    assert str(path) in str(error.value) and not path.exists()


def _same(a, b, where: str = "state") -> None:
    """Exact equality of two loaded states: tensors bit for bit, containers by type and content."""
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_every_file_a_run_writes_loads_back_whole_weights_only(three_steps):
    run = three_steps / "digits"
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        assert checkpoint.header(str(run / name))["version"] == checkpoint.VERSION
        # the reference: the same payload read without any restriction
        _same(checkpoint.load(str(run / name)), torch.load(io.BytesIO(payload_of(run / name)), weights_only=False))
    assert checkpoint.read(str(run))["step"] == 3  # a run directory: its checkpoint.pt


def test_rng_states_round_trip_through_a_file_exactly(tmp_path):
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    np.random.standard_normal()  # leaves numpy a cached gaussian: part of the state
    path = str(tmp_path / "rng.pt")
    checkpoint.save({"step": 0, "rng": checkpoint.rng_state()}, path)

    def draws():
        return torch.rand(3), np.random.random_sample(3), np.random.standard_normal(), random.random()

    expected = draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(checkpoint.load(path)["rng"])
    got = draws()
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2:] == expected[2:]


# ---- format version 1 ----------------------------------------------------------------------------


def _version_1(path: Path) -> dict:
    """A version 1 fixture read as version 1 code read it (no restriction: these files are known)."""
    return torch.load(io.BytesIO(payload_of(path)), weights_only=False)


@pytest.mark.parametrize("name", ["checkpoint_v1.pt", "rank0_v1.pt"])
def test_a_version_1_file_loads_upgraded_with_its_rng_state_exact(name):
    """Version 1 (the layout before the method owned its state, numpy's RNG state as an ndarray): every tensor
    where today's layout keeps it (groups in the grouping module, bank and RNG states in the rank's own part,
    the group counts in the method's), numpy's state exact."""
    path = DATA / name
    assert checkpoint.header(str(path))["version"] == 1
    state, old = checkpoint.load(str(path)), _version_1(path)
    numpy_name, keys, position, has_gauss, gauss = old["rng"]["numpy"]
    assert isinstance(keys, np.ndarray) and keys.dtype == np.uint32
    _same(state["rank"]["method"]["bank"], old["bank"])
    if "model" in old:
        model = dict(old["model"])
        model["grouping.groups"] = model.pop("groups")
        _same(state["model"], model)
        _same(state["optimizer"], old["optimizer"])
        _same(state["method"]["counts"], old["meter"]["counts"])
        assert state["meter"] == {k: v for k, v in old["meter"].items() if k != "counts"}
    rng = state["rank"]["rng"]
    _same(rng["torch"], old["rng"]["torch"])
    assert rng["python"] == old["rng"]["python"]
    checkpoint.set_rng_state(rng)
    now = np.random.get_state()
    assert now[0] == numpy_name and np.array_equal(now[1], keys) and now[2:] == (position, has_gauss, gauss)


def test_a_version_1_checkpoint_evaluates_and_resumes_bit_for_bit_as_the_code_that_wrote_it(tmp_path, capsys):
    """checkpoint_v1.pt and checkpoint_v1_next.pt: a 2-epoch digits run of the code before this layout, at the
    end of epoch 1 and of epoch 2. Resumed from epoch 1, today's code ends epoch 2 with the same weights,
    optimiser state, groups and memory bank, bit for bit; its checkpoints are written in today's format."""
    assert smog_main(["eval", "knn", str(DATA / "checkpoint_v1.pt")]) == 0
    assert json.loads(capsys.readouterr().out)["epoch"] == 1
    old = _version_1(DATA / "checkpoint_v1.pt")
    cfg = config_from_dict(old["config"], [f"train.out_dir={tmp_path}", "train.progress=false",
                                           "train.tensorboard=false"])
    trainer = Trainer(cfg)
    assert trainer.resume(str(DATA / "checkpoint_v1.pt"))
    assert (trainer.progress.epoch, trainer.progress.step) == (1, 8)
    assert np.array_equal(np.random.get_state()[1], old["rng"]["numpy"][1])
    trainer.fit()
    assert checkpoint.header(trainer.files.main_path)["version"] == checkpoint.VERSION
    ours, theirs = checkpoint.load(trainer.files.main_path), checkpoint.load(str(DATA / "checkpoint_v1_next.pt"))
    assert (ours["epoch"], ours["step"]) == (theirs["epoch"], theirs["step"]) == (2, 16)
    for key in ("model", "optimizer", "method"):
        _same(ours[key], theirs[key])
    _same(ours["rank"]["method"], theirs["rank"]["method"])
    _same(ours["rank"]["rng"]["torch"], theirs["rank"]["rng"]["torch"])


def test_a_file_of_a_newer_format_says_to_upgrade_smog(tmp_path):
    buffer = io.BytesIO()
    torch.save({"step": 1}, buffer)
    with_header(tmp_path / "c.pt", buffer.getvalue(), checkpoint.VERSION + 1)
    with pytest.raises(checkpoint.CheckpointError, match=f"format version {checkpoint.VERSION + 1}.*upgrade smog"):
        checkpoint.load(str(tmp_path / "c.pt"))


# ---- another program's file ----------------------------------------------------------------------


def test_a_torchvision_state_dict_gets_one_line_in_every_command(tmp_path, capsys):
    torchvision = pytest.importorskip("torchvision")
    weights = torchvision.models.squeezenet1_1().state_dict()
    path = tmp_path / "squeezenet1_1.pth"
    torch.save(weights, path)
    for command in (["eval", "knn", str(path)], ["eval", "linear", str(path)],
                    ["train", "--config", "digits", f"train.out_dir={tmp_path}", *SMALL, "--resume", str(path)]):
        assert smog_main(command) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        assert str(path) in lines[0] and f"a state dict of {len(weights)} tensors" in lines[0]
        assert "smog expected a file written by smog train" in lines[0]


def test_a_lightning_checkpoint_and_a_smog_rank_file_are_named_for_what_they_are(tmp_path):
    lightning = pytest.importorskip("pytorch_lightning")

    class Tiny(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 2)

        def training_step(self, batch, _):
            return self.net(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
    fit = lightning.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path))
    fit.fit(Tiny(), data)
    fit.save_checkpoint(tmp_path / "tiny.ckpt")
    with pytest.raises(checkpoint.CheckpointError, match="a PyTorch Lightning checkpoint of epoch"):
        checkpoint.read(str(tmp_path / "tiny.ckpt"))
    with pytest.raises(checkpoint.CheckpointError, match=r"rank file of a 2-process run\), not a training checkpoint"):
        checkpoint.read(str(DATA / "rank0_v1.pt"))
