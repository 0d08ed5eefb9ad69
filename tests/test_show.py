"""`smog show groups`: the grid has --groups x --members cells of the run's images, its rows hold members of
the groups nearest first, and the group sizes over the memory bank are counted as assignment defines them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from smog import checkpoint, cli
from smog.commands.show import bank_sizes, nearest, pick_groups
from smog.config import config_from_dict
from smog.data import clean_set, data_info
from smog.method import build_model
from tests.training import make_trainer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    """A digits run of 4 epochs (16 steps): its checkpoint holds the memory bank of the last epoch."""
    trainer = make_trainer(tmp_path_factory.mktemp("show"), "train.epochs=4", "eval.knn_every=0")
    trainer.fit()
    trainer.log.close()
    return trainer.run_dir


@pytest.mark.parametrize("groups, members, scale", [(3, 4, 2), (5, 2, 3)])
def test_grid_has_the_requested_cells(run_dir, tmp_path, capsys, groups, members, scale):
    out = tmp_path / "grid.png"
    argv = ["show", "groups", run_dir, "--groups", str(groups), "--members", str(members), "--scale", str(scale),
            "--out", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    cell = 8 * scale + 2  # digits are 8 x 8 pixels; 2 pixels of padding between and around cells
    assert Image.open(out).size == (members * cell + 2, groups * cell + 2)  # (width, height)
    assert Image.open(tmp_path / "grid_sizes.png").format == "PNG"


def test_default_cells_are_64_pixels_and_files_go_beside_the_checkpoint(run_dir, capsys):
    assert cli.main(["show", "groups", run_dir, "--groups", "2", "--members", "3"]) == 0, capsys.readouterr().err
    assert Image.open(f"{run_dir}/group_members.png").size == (3 * 66 + 2, 2 * 66 + 2)


def test_bad_input_ends_with_one_line(run_dir, tmp_path, capsys):
    for argv, words in ((["show", "groups", str(tmp_path)], f"no checkpoint at {tmp_path}/checkpoint.pt"),
                        (["show", "groups", run_dir, "--groups", "11"], "--groups 11 is more than the 10 groups"),
                        (["show", "groups", run_dir, "--head", "3"], "--head 3: the run has heads 0..2")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err


def test_pick_groups_draws_full_groups_then_the_fullest_others():
    index = torch.tensor([0, 0, 0, 2, 2, 2, 2, 3, 4, 4, 5])  # sizes: 3, 0, 4, 1, 2, 1 (6 groups)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        chosen = pick_groups(index, 6, 5, 3, generator).tolist()
        assert sorted(chosen[:2]) == [0, 2]  # the groups with >= 3 members, in random order
        assert chosen[2] == 4 and sorted(chosen[3:]) == [3, 5]  # then non-empty ones by size; group 1 is empty
    assert len(pick_groups(index, 6, 1, 3, generator)) == 1


def test_nearest_takes_a_groups_members_by_score():
    index = torch.tensor([1, 0, 1, 1, 1])
    score = torch.tensor([0.2, 0.9, 0.7, 0.1, 0.5])
    assert nearest(index, score, 1, 3).tolist() == [2, 4, 0]
    assert nearest(index, score, 0, 3).tolist() == [1]
    assert nearest(index, score, 2, 3).tolist() == []


def test_bank_sizes_count_each_heads_view_by_the_nearest_group():
    generator = torch.Generator().manual_seed(4)
    rows = F.normalize(torch.randn(2, 50, 6, generator=generator), dim=2)
    index = torch.arange(50).masked_fill(torch.arange(50) >= 40, -1)  # the last 10 rows are empty
    groups = F.normalize(torch.randn(3, 7, 6, generator=generator), dim=2)
    counts = bank_sizes({"bank": rows, "index": index, "position": 0}, groups)
    for h in range(3):
        nearest_group = (rows[h % 2, :40] @ groups[h].T).argmax(dim=1)  # head h reads view h mod 2
        assert counts[h].tolist() == [int((nearest_group == k).sum()) for k in range(7)]


def test_rows_hold_the_members_nearest_to_the_printed_groups(run_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    argv = ["show", "groups", run_dir, "--groups", "3", "--members", "4", "--scale", "1", "--images", "100000",
            "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out.split("sample): ")[1].splitlines()[0]
    chosen = [int(pair.split(":")[0]) for pair in printed.split(", ")]
    state = checkpoint.load(f"{run_dir}/checkpoint.pt")
    cfg = config_from_dict(state["config"])
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    images = clean_set(cfg.data, "train", cfg.data.train_subset)
    x = torch.stack([images[i][0] for i in range(len(images))])
    model.eval()  # BatchNorm with its running statistics
    with torch.no_grad():
        z = F.normalize(model.online.projector(model.online.backbone(x)), dim=1)  # online z, by hand
    scores = z @ model.grouping.groups[0].T
    best = scores.argmax(dim=1)
    grid = torch.from_numpy(np.array(Image.open(out)))[..., 0].float()  # grey images: every channel is equal
    mean, std = data_info(cfg.data).mean[0], data_info(cfg.data).std[0]
    assert len(chosen) == 3
    for r, g in enumerate(chosen):
        members = (best == g).nonzero().squeeze(1)
        order = members[scores[members, g].argsort(descending=True)][:4]
        assert len(order) == 4  # drawn among the groups holding at least --members images
        for c, i in enumerate(order.tolist()):
            cell = grid[2 + 10 * r: 10 + 10 * r, 2 + 10 * c: 10 + 10 * c]  # 8-pixel cells, 2 pixels apart
            expected = ((images[i][0][0] * std + mean).clamp(0, 1) * 255 + 0.5).floor()
            assert (cell - expected).abs().max() <= 1, (r, c)
