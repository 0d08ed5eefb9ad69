"""Image folders with broken and odd files: every odd mode decodes to RGB by rule, every unreadable file
(truncated, empty, not an image, a decompression bomb) is replaced in its batch by the next readable
image, named once and counted in metrics.jsonl, the same with loader workers as without, across a
resume and over 2 real processes (torchrun, gloo: the count pools both ranks' files); past
data.max_bad_fraction the run stops naming examples."""
from __future__ import annotations

import io
import json
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tools.faults import environment, free_port, torchrun
from smog.cli import main as smog_main
from smog.config import load_config
from smog.data import (SkippedImages, UnreadableData, UnreadableImage, UnreadableImageWarning,
                       load_split)
from smog.loop import Trainer

SIDE = 12


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 20000) -> bytes:
    """A 1-bit greyscale PNG whose header claims side x side pixels (Pillow refuses it at open)."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    rows = b"".join(b"\x00" + bytes(side // 8) for _ in range(16))  # a few rows: the header alone is judged
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows))
            + _png_chunk(b"IEND", b""))


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def odd_files() -> dict[str, tuple[bytes, np.ndarray]]:
    """name -> (file bytes, the RGB uint8 [H, W, 3] it must decode to, derived by hand)."""
    files = {}
    cmyk = np.zeros((SIDE, SIDE, 4), np.uint8)
    cmyk[..., 0] = 255  # full cyan, no black: RGB (0, 255, 255)
    files["cmyk.tif"] = (encoded(Image.fromarray(cmyk, "CMYK"), "TIFF"), np.full((SIDE, SIDE, 3), (0, 255, 255), np.uint8))
    grey16 = np.array([[0, 255, 256, 511, 32768, 65535] * 2] * SIDE, np.uint16)
    files["grey16.png"] = (encoded(Image.fromarray(grey16), "PNG"), np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, 2))
    palette = np.arange(SIDE * SIDE, dtype=np.uint8).reshape(SIDE, SIDE) % 3
    colours = [(200, 10, 20), (30, 40, 250), (0, 0, 0)]
    image = Image.fromarray(palette, "P")
    image.putpalette([c for rgb in colours for c in rgb])
    files["palette_alpha.png"] = (encoded(image, "PNG", transparency=2), np.array(colours, np.uint8)[palette])
    grey = (np.arange(SIDE * SIDE).reshape(SIDE, SIDE) % 256).astype(np.uint8)
    files["grey.png"] = (encoded(Image.fromarray(grey, "L"), "PNG"), np.repeat(grey[..., None], 3, 2))
    alpha = np.stack([grey, 255 - grey], -1)
    files["grey_alpha.png"] = (encoded(Image.fromarray(alpha, "LA"), "PNG"), np.repeat(grey[..., None], 3, 2))
    return files


def bad_files() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, a word of the reason it is refused with)."""
    rng = np.random.default_rng(0)
    jpeg = encoded(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    return {"truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
            "empty.jpg": (b"", "empty"),
            "not_an_image.jpg": (b"<html>404 Not Found</html>\n", "cannot identify"),
            "bomb.png": (bomb_png(), "decompression bomb")}


def make_folder(root: Path, good: int, with_bad: bool = True) -> dict[str, list[Path]]:
    """root/train/{a,b}/ with `good` plain RGB images, the odd files and (with_bad) the bad ones; root/val/
    with 4 good images and one truncated file. Returns {"good": [...], "odd": [...], "bad": [...]}."""
    rng = np.random.default_rng(1)
    made: dict[str, list[Path]] = {"good": [], "odd": [], "bad": []}
    for i in range(good):
        path = root / "train" / "ab"[i % 2] / f"good{i:02d}.{'png' if i % 3 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (SIDE + i % 5, SIDE + 2, 3), dtype=np.uint8)
        path.write_bytes(encoded(Image.fromarray(pixels), "PNG" if i % 3 else "JPEG"))
        made["good"].append(path)
    for name, (data, _) in odd_files().items():
        (root / "train" / "a" / name).write_bytes(data)
        made["odd"].append(root / "train" / "a" / name)
    if with_bad:
        for name, (data, _) in bad_files().items():
            (root / "train" / "b" / name).write_bytes(data)
            made["bad"].append(root / "train" / "b" / name)
    (root / "train" / "b" / "README.txt").write_text("not an image: ImageFolder does not list it")
    for i in range(4):
        path = root / "val" / "ab"[i % 2] / f"v{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoded(Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)), "PNG"))
    (root / "val" / "a" / "broken.jpg").write_bytes(bad_files()["truncated.jpg"][0])
    return made


def folder_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["data.name=folder", f"data.root={root}", "data.large_size=16", "data.small_size=8",
            "data.small_crops=1", "train.batch_size=16", "method.groups=4", "eval.knn_every=0", "eval.knn_k=[3]",
            "eval.knn_t=[0.1]", "train.progress=false", "train.tensorboard=false", f"train.out_dir={out}", *extra]


# ---- decoding by rule --------------------------------------------------------------------------------


def test_every_odd_mode_decodes_to_the_rgb_derived_by_hand(tmp_path):
    make_folder(tmp_path, good=2, with_bad=False)
    images = load_split(load_config("digits", folder_args(tmp_path, tmp_path)).data, "train")
    paths = images.images.paths
    assert not [p for p in paths if p.endswith("README.txt")]  # ImageFolder lists images by extension only
    for name, (_, expected) in odd_files().items():
        decoded = images.image(next(i for i, p in enumerate(paths) if p.endswith(name)))
        assert decoded.dtype == torch.uint8 and decoded.shape == (3, SIDE, SIDE), name
        assert torch.equal(decoded.permute(1, 2, 0), torch.from_numpy(expected)), name


def test_every_unreadable_kind_is_refused_with_its_reason_and_the_next_image_stands_in(tmp_path):
    make_folder(tmp_path, good=4)
    images = load_split(load_config("digits", folder_args(tmp_path, tmp_path)).data, "train")
    paths = images.images.paths
    for name, (_, reason) in bad_files().items():
        index = next(i for i, p in enumerate(paths) if p.endswith(name))
        with pytest.raises(UnreadableImage, match=reason) as error:
            images.image(index)
        assert error.value.path == paths[index]
        _, source = images.first_readable(index)
        following = [(index + k) % len(paths) for k in range(1, len(paths))]
        readable = [i for i in following if not any(paths[i].endswith(bad) for bad in bad_files())]
        assert source == readable[0], name
    val = load_split(load_config("digits", folder_args(tmp_path, tmp_path)).data, "test")
    broken = next(i for i, p in enumerate(val.images.paths) if p.endswith("broken.jpg"))
    with pytest.warns(UnreadableImageWarning, match="broken.jpg"):  # evaluation: the stand-in, with its label
        image, label = val[broken]
    assert torch.equal(image, val.image(broken + 1)) and label == int(val.labels[broken + 1])


# ---- one epoch on a folder with every bad kind ----------------------------------------------------------


def _spy(monkeypatch) -> list[tuple[list[int], list[int]]]:
    """Records (index, source) of every batch the trainer notes."""
    seen = []
    original = SkippedImages.note

    def note(self, batch):
        seen.append((batch["index"].tolist(), batch["source"].tolist()))
        return original(self, batch)

    monkeypatch.setattr(SkippedImages, "note", note)
    return seen


def test_one_epoch_names_and_counts_the_bad_files_and_trains_every_good_one_alike_in_workers(
        tmp_path, monkeypatch, capsys):
    made = make_folder(tmp_path / "data", good=23)  # 23 + 5 odd + 4 bad = 32 files: two batches of 16
    bad = {str(p) for p in made["bad"]}
    seen = _spy(monkeypatch)
    runs = {}
    for workers in (0, 2):
        trainer = Trainer(load_config("digits", folder_args(tmp_path / "data", tmp_path / f"out{workers}",
                                                            "train.epochs=1", "data.max_bad_fraction=0.2",
                                                            f"data.workers={workers}")))
        paths = trainer.data.dataset.images.images.paths
        assert len(paths) == 32
        record = trainer.fit()
        named = sorted(x for x in capsys.readouterr().err.splitlines() if x.startswith("smog train"))
        for path in bad:  # named once, with its reason, though the fill pass and the epoch both met it
            lines = [x for x in named if f"skipped unreadable image {path}:" in x]
            assert len(lines) == 1 and bad_files()[Path(path).name][1] in lines[0], named
        assert record["bad_images"] == len(bad) == 4
        epoch = [r for r in trainer.log.records() if r["kind"] == "epoch"][-1]
        assert epoch["bad_images"] == 4 and "knn" in epoch
        pairs = [(i, s) for index, source in seen[-2:] for i, s in zip(index, source)]  # the epoch's 2 batches
        assert sorted(i for i, _ in pairs) == list(range(32))  # every position, in full batches
        assert all((s == i) == (paths[i] not in bad) for i, s in pairs)
        assert {s for _, s in pairs} == {i for i, p in enumerate(paths) if p not in bad}  # every good and odd file
        runs[workers] = (record, named, trainer.method.state_dict())
    (record0, named0, state0), (record2, named2, state2) = runs[0], runs[2]
    assert named0 == named2 and record0["loss"] == record2["loss"]
    for name in state0:  # loader workers trained exactly what the main process trained
        assert torch.equal(state0[name], state2[name]), name


def test_a_resume_mid_epoch_on_a_folder_with_bad_files_is_exact(tmp_path):
    make_folder(tmp_path / "data", good=23)
    args = ["train.epochs=2", "data.max_bad_fraction=0.2", "train.checkpoint_every_steps=1"]
    whole = Trainer(load_config("digits", folder_args(tmp_path / "data", tmp_path / "whole", *args)))
    final_whole = whole.fit()
    first = Trainer(load_config("digits", folder_args(tmp_path / "data", tmp_path / "cut", *args)))
    first.fit(stop_after_steps=3)  # mid-epoch 2 (2 steps per epoch)
    resumed = Trainer(load_config("digits", folder_args(tmp_path / "data", tmp_path / "cut", *args)))
    assert resumed.resume("auto") and resumed.progress.step == 3
    final_resumed = resumed.fit()
    for (name, a), b in zip(resumed.method.state_dict().items(), whole.method.state_dict().values()):
        assert torch.equal(a, b), name
    banks = resumed.method.bank, whole.method.bank
    assert torch.equal(banks[0].bank, banks[1].bank) and torch.equal(banks[0].index, banks[1].index)
    assert final_resumed["loss"] == final_whole["loss"]


# ---- over the limit ----------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["0.1", None])
def test_past_max_bad_fraction_the_run_stops_naming_examples(tmp_path, capsys, limit):
    made = make_folder(tmp_path / "data", good=23)  # 4 unreadable of 32: 12.5 %
    extra = [f"data.max_bad_fraction={limit}"] if limit else []  # None: the default, 0.001
    code = smog_main(["train", "--config", "digits", *folder_args(tmp_path / "data", tmp_path / "out", *extra)])
    err = capsys.readouterr().err
    assert code == 2
    line = next(x for x in err.splitlines() if x.startswith("smog train: error:"))
    assert f"more than data.max_bad_fraction={float(limit or 0.001):g}" in line and "of the 32 training images" in line
    assert any(str(p) in line for p in made["bad"])
    with pytest.raises(UnreadableData):
        Trainer(load_config("digits", folder_args(tmp_path / "data", tmp_path / "again", *extra))).fit()


def test_two_processes_pool_their_bad_files_into_one_count(tmp_path):
    made = make_folder(tmp_path / "data", good=23)
    run_dir = tmp_path / "out" / "digits"
    args = folder_args(tmp_path / "data", tmp_path / "out", "train.epochs=1", "data.max_bad_fraction=0.2",
                       "train.dist_timeout_s=60")
    done = subprocess.run(torchrun(2, 0, free_port(), ["--config", "digits", *args]), env=environment(),
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    named = {rank: {str(p) for p in made["bad"] if f"smog train (rank {rank}): skipped unreadable image {p}:"
                    in done.stderr} for rank in (0, 1)}
    assert named[0] and named[1] and named[0] | named[1] == {str(p) for p in made["bad"]}, named  # each met some
    epoch = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"epoch"' in x][-1]
    assert epoch["bad_images"] == 4
