"""`smog eval linear --protocol paper` on digits: one process end to end, and two torchrun (gloo) processes
of 32 images each that reproduce one process of 64 (the same images per step, the same augmentations)."""
from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from smog.cli import main as smog_main
from smog.config import load_config
from smog.evaluation.paper_linear import views
from smog.loop import Trainer
from tests.test_train_distributed import Launch, base_env

ARGS = ["--protocol", "paper", "--epochs", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A digits checkpoint after one short epoch (trained BatchNorm statistics)."""
    out = tmp_path_factory.mktemp("pretrain")
    Trainer(load_config("digits", [f"train.out_dir={out}", "data.train_subset=256", "train.batch_size=32",
                                   "data.small_crops=1", "eval.knn_every=0", "train.epochs=1"])).fit()
    return out / "digits" / "checkpoint.pt"


def _copy(checkpoint, folder):
    folder.mkdir()
    return shutil.copy(checkpoint, folder / "checkpoint.pt")


@pytest.fixture(scope="module")
def one_process(trained, tmp_path_factory):
    """(printed report, linear_paper.json) of one process with 64 images per step."""
    ckpt = _copy(trained, tmp_path_factory.mktemp("one") / "run")
    capture = tmp_path_factory.mktemp("out") / "stdout.json"
    saved = sys.stdout
    with open(capture, "w") as sys.stdout:
        code = smog_main(["eval", "linear", str(ckpt), *ARGS, "--batch-size", "64", "train.threads=1"])
    sys.stdout = saved
    assert code == 0
    return json.loads(capture.read_text()), json.loads((ckpt.parent / "linear_paper.json").read_text())


def test_views_at_the_recipe_size_and_the_authors_256_over_224_ratio():
    train, test = views(8, (0.5,), (0.5,))
    image = torch.arange(100, dtype=torch.uint8).view(1, 10, 10)
    assert train(image).shape == test(image).shape == (1, 8, 8)
    # an image of exactly 9 px (round(8 * 256 / 224)) is only centre-cropped: rows/cols 0 dropped
    nine = torch.arange(81, dtype=torch.uint8).view(1, 9, 9)
    torch.testing.assert_close(test(nine), (nine[:, :8, :8].float() / 255 - 0.5) / 0.5)


def test_one_process_end_to_end_on_digits(one_process):
    printed, saved = one_process
    assert printed == saved
    assert (saved["protocol"], saved["processes"], saved["epochs"], saved["batch_per_process"]) == ("paper", 1, 2, 64)
    assert (saved["lr"], saved["weight_decay"]) == (0.3, 1e-6)  # the digits recipe's eval.linear_* (paper values)
    assert saved["authors_figure"] == "best"
    last, best, per_epoch = saved["last"], saved["best"], saved["top1_per_epoch"]
    assert last["epoch"] == 2 and len(per_epoch) == 2 and last["top1"] == per_epoch[-1]
    assert best["top1"] == max(per_epoch) and best["epoch"] == per_epoch.index(max(per_epoch)) + 1
    assert 25.0 < last["top1"] <= last["top5"] <= 100.0  # well above chance (10 classes) after two epochs


def test_each_epoch_is_scored_as_a_run_ending_there(trained, one_process, tmp_path):
    """Epoch 1 of the 2-epoch run trains at the same learning rate as a 1-epoch run (the cosine steps after
    each epoch), so its test top-1 / top-5 are that run's last."""
    ckpt = _copy(trained, tmp_path / "run")
    args = ["eval", "linear", str(ckpt), "--protocol", "paper", "--epochs", "1", "--batch-size", "64", "train.threads=1"]
    assert smog_main(args) == 0
    single = json.loads((tmp_path / "run" / "linear_paper.json").read_text())
    _, two_epochs = one_process
    assert single["best"] == single["last"]
    assert single["last"]["top1"] == two_epochs["top1_per_epoch"][0]


def test_two_torchrun_processes_equal_one_process(trained, one_process, tmp_path):
    ckpt = _copy(trained, tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "smog.cli",
           "eval", "linear", str(ckpt), *ARGS, "--batch-size", "32", "train.threads=1"]
    [(code, _, text)] = Launch([cmd], [base_env()], tmp_path / "logs").wait()
    assert code == 0, text[-4000:]
    two = json.loads((tmp_path / "run" / "linear_paper.json").read_text())
    _, one = one_process
    assert two["processes"] == 2
    # digits' 1500 training images split evenly: each step's 2 x 32 images are the one process's 64
    assert (two["best"], two["last"], two["top1_per_epoch"]) == (one["best"], one["last"], one["top1_per_epoch"])
    assert two["train_loss"] == pytest.approx(one["train_loss"], abs=1e-5)  # sums taken in another order
