"""Configs: packaged recipes mirror configs/, load and check; bad keys/values and missing data give clear errors."""
from __future__ import annotations

import os

import pytest

from smog.cli import main as smog_main
from smog.config import ConfigError, load_config, packaged_configs
from smog.data import DatasetNotFound, load_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGED = os.path.join(REPO, "smog", "configs")


def test_configs_folder_mirrors_the_packaged_recipes():
    """smog/configs/ is the source of truth (shipped in the wheel); configs/ holds identical copies."""
    names = sorted(n for n in os.listdir(os.path.join(REPO, "configs")) if n.endswith(".yaml"))
    assert names == sorted(n + ".yaml" for n in packaged_configs())
    for name in names:
        with open(os.path.join(REPO, "configs", name)) as a, open(os.path.join(PACKAGED, name)) as b:
            assert a.read() == b.read(), f"configs/{name} differs from smog/configs/{name}: copy it over"


@pytest.mark.parametrize("name", packaged_configs())
def test_every_packaged_recipe_loads(name):
    assert load_config(name).name == name


def test_imagenet_recipe_is_the_papers():
    cfg = load_config("imagenet_resnet50")
    assert (cfg.method.heads, cfg.method.groups, cfg.data.small_crops, cfg.data.large_size) == (3, 3000, 4, 224)
    assert (cfg.optim.name, cfg.optim.lr, cfg.train.epochs, cfg.model.backbone) == ("lars", 4.8, 400, "resnet50")


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown config key 'train.epoch'"),
    ("train.epochs=three", "train.epochs must be an integer"),
    ("model.backbone=vgg", "model.backbone must be one of"),
    ("method.beta_end=1.5", r"method.beta_end must lie in \[0, 1\]"),
    ("method.groups=0", "method.groups must be positive"),
    ("data.large_scale=[0.2]", "data.large_scale must have 2 entries"),
    ("train", "must look like section.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("digits", [override])


def test_unknown_recipe_lists_the_packaged_ones():
    with pytest.raises(ConfigError, match="quickstart"):
        load_config("no_such_recipe")


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(tmp_path):
    cfg = load_config("quickstart", [f"data.root={tmp_path}"])
    with pytest.raises(DatasetNotFound, match=f"(?s){tmp_path}.*download=true"):
        load_split(cfg.data, "train")
    cfg = load_config("quickstart", [f"data.root={tmp_path}", "data.name=cifar10"])
    with pytest.raises(DatasetNotFound, match="data.download=true"):
        load_split(cfg.data, "train")


def test_cli_reports_config_errors_without_a_traceback(capsys):
    assert smog_main(["train", "train.epochs=-1"]) == 2
    assert "train.epochs must be positive" in capsys.readouterr().err


def test_too_many_groups_for_the_data(tmp_path):
    from smog.trainer import Trainer

    with pytest.raises(ConfigError, match="method.groups=5000 exceeds"):
        Trainer(load_config("digits", ["method.groups=5000", f"train.out_dir={tmp_path}"]))
