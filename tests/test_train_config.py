"""Configs: packaged recipes load and check; `base` inheritance; bad keys/values and missing
data give clear errors."""
from __future__ import annotations

import dataclasses
import os

import pytest
import yaml

from smog.cli import main as smog_main
from smog.config import ConfigError, load_config, merge, packaged_configs
from smog.data import DatasetNotFound, load_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGED = os.path.join(REPO, "smog", "configs")


@pytest.mark.parametrize("name", packaged_configs())
def test_every_packaged_recipe_loads(name):
    assert load_config(name).name == name


@pytest.mark.parametrize("name", packaged_configs())
def test_a_recipe_loaded_by_path_is_the_recipe_loaded_by_name(name):
    """A YAML path resolves its `base` too (a bare name is the packaged recipe) and gives the same config."""
    assert load_config(os.path.join(PACKAGED, name + ".yaml")) == load_config(name)


def _flat(values: dict) -> dict:
    """{'train': {'epochs': 3}, 'name': 'x'} -> {'train.epochs': 3, 'name': 'x'}"""
    return {f"{section}.{key}" if isinstance(inner, dict) else section: value
            for section, inner in values.items()
            for key, value in (inner.items() if isinstance(inner, dict) else [(None, inner)])}


def test_quickstart_is_fashion_mnist_with_only_what_it_sets_changed():
    with open(os.path.join(PACKAGED, "quickstart.yaml")) as handle:
        raw = yaml.safe_load(handle)
    assert raw.pop("base") == "fashion_mnist"
    sets = _flat(raw)
    quick = _flat(dataclasses.asdict(load_config("quickstart")))
    fashion = _flat(dataclasses.asdict(load_config("fashion_mnist")))
    assert {key for key in quick if quick[key] != fashion[key]} == set(sets)  # each set field really differs
    assert all(quick[key] == value for key, value in sets.items())
    # the benchmark recipe on 20k images for 6 epochs, two small crops with per-resolution BatchNorm and no
    # momentum small crops, features on a 2 x 2 grid, kNN on the full 60k / 10k split
    assert (quick["train.epochs"], quick["data.train_subset"], quick["data.small_crops"]) == (6, 20000, 2)
    assert (quick["model.bn_crops"], quick["method.momentum_small"]) == ("per_resolution", False)
    assert (quick["eval.knn_train_subset"], quick["eval.knn_test_subset"]) == (0, 0)
    assert (quick["optim.name"], quick["optim.lr"], quick["model.width"], quick["model.grid"]) == ("sgd", 0.06, 16, 2)


def _write(path, values) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_base_chain_merges_sections_key_by_key(tmp_path, monkeypatch):
    _write(tmp_path / "a.yaml", {"name": "a", "data": {"large_size": 12, "small_size": 6, "blur": False},
                                 "model": {"width": 8}, "eval": {"knn_k": [5, 3], "knn_t": [0.1, 0.2]}})
    _write(tmp_path / "b.yaml", {"base": "a.yaml", "data": {"small_size": 4},
                                 "eval": {"knn_k": [7], "knn_t": [0.3]}})
    c = _write(tmp_path / "sub" / "c.yaml", {"base": "../b.yaml", "model": {"dim": 8}})
    monkeypatch.chdir(tmp_path / "sub")  # relative bases are read from the including file's folder, not the cwd
    os.mkdir("elsewhere")
    monkeypatch.chdir("elsewhere")
    cfg = load_config(c, ["train.epochs=5"])
    assert (cfg.data.large_size, cfg.data.small_size, cfg.data.blur) == (12, 4, False)  # a, b over a, a
    assert (cfg.model.width, cfg.model.dim) == (8, 8)  # a, c
    assert (cfg.eval.knn_k, cfg.eval.knn_t) == ((7,), (0.3,))  # lists replaced, not merged
    assert cfg.train.epochs == 5 and cfg.data.flip is True  # overrides on top; untouched fields keep defaults
    assert cfg.name == "c"  # the name is the file's own, never the base's


def test_base_by_packaged_name(tmp_path):
    path = _write(tmp_path / "mine.yaml", {"base": "digits", "train": {"epochs": 1}, "model": {"dim": 8}})
    expected = dataclasses.replace(load_config("digits", ["train.epochs=1", "model.dim=8"]), name="mine")
    assert load_config(path) == expected


def test_merge_is_key_by_key_and_leaves_its_inputs_alone():
    base = {"data": {"a": 1, "b": {"x": 1, "y": 2}}, "l": [1, 2]}
    assert merge(base, {"data": {"b": {"y": 3}}, "l": [9]}) == {"data": {"a": 1, "b": {"x": 1, "y": 3}}, "l": [9]}
    assert base == {"data": {"a": 1, "b": {"x": 1, "y": 2}}, "l": [1, 2]}


def test_base_cycle_names_the_file_and_key(tmp_path):
    a = _write(tmp_path / "a.yaml", {"base": "b.yaml"})
    _write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match=r"b\.yaml: base .*a\.yaml.* makes a cycle"):
        load_config(a)
    selfish = _write(tmp_path / "self.yaml", {"base": "self.yaml"})
    with pytest.raises(ConfigError, match=r"self\.yaml: base .* makes a cycle"):
        load_config(selfish)


@pytest.mark.parametrize("base, message", [
    ("nowhere.yaml", r"mine\.yaml: base 'nowhere\.yaml' is neither a file .* nor a packaged recipe"),
    ("no_such_recipe", r"mine\.yaml: base 'no_such_recipe' is neither"),
    (3, r"mine\.yaml: base must be a recipe name or a YAML path, got 3"),
])
def test_missing_or_bad_base_names_the_file_and_key(tmp_path, base, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path / "mine.yaml", {"base": base}))


def test_unknown_key_in_a_base_names_that_file(tmp_path):
    _write(tmp_path / "parent.yaml", {"train": {"epoch": 3}})
    child = _write(tmp_path / "child.yaml", {"base": "parent.yaml", "train": {"epochs": 3}})
    with pytest.raises(ConfigError, match=r"parent\.yaml: unknown config key 'train\.epoch'"):
        load_config(child)
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.base'"):  # `base` only at the top
        load_config(_write(tmp_path / "nested.yaml", {"data": {"base": "digits"}}))


def test_imagenet_recipe_is_the_papers():
    cfg = load_config("imagenet_resnet50")
    assert (cfg.method.heads, cfg.method.groups, cfg.data.small_crops, cfg.data.large_size) == (3, 3000, 4, 224)
    assert (cfg.optim.name, cfg.optim.lr, cfg.train.epochs, cfg.model.backbone) == ("lars", 4.8, 400, "resnet50")
    # the authors' crop roles: unified BatchNorm, whole-set swap, crops_for_assign = crops_for_q = [0, 1]
    assert (cfg.model.bn_crops, cfg.method.swap, cfg.method.momentum_small) == ("pooled", "all", True)
    assert (cfg.method.target_crops, cfg.method.update_crops) == ((0, 1), (0, 1))
    # apex SyncBatchNorm in groups of 8 processes, float32
    assert (cfg.model.sync_bn_group, cfg.train.bf16) == (8, False)


def test_model_sync_bn_of_older_recipes_is_model_sync_bn_group(tmp_path):
    """true: all processes (0); false: none (1); with model.sync_bn_group also set, or not a boolean: an error
    naming both keys."""
    for old, new in ((True, 0), (False, 1)):
        assert load_config(_write(tmp_path / f"{old}.yaml", {"model": {"sync_bn": old}})).model.sync_bn_group == new
        assert load_config("digits", [f"model.sync_bn={str(old).lower()}"]).model.sync_bn_group == new
    from smog.config import config_from_dict  # a checkpoint's resolved config
    assert config_from_dict({"model": {"sync_bn": True}}).model.sync_bn_group == 0
    both = _write(tmp_path / "both.yaml", {"model": {"sync_bn": True, "sync_bn_group": 8}})
    with pytest.raises(ConfigError, match="model.sync_bn and model.sync_bn_group are both set"):
        load_config(both)
    with pytest.raises(ConfigError, match=r"model.sync_bn \(now model.sync_bn_group\) must be one of true, false"):
        load_config("digits", ["model.sync_bn=8"])


def test_sync_bn_group_must_divide_the_processes():
    from smog.config import check_processes
    for group in (0, 1, 2, 4):
        check_processes(load_config("digits", [f"model.sync_bn_group={group}"]), 4, "cpu")
    with pytest.raises(ConfigError, match="model.sync_bn_group=3 must divide the 4 processes"):
        check_processes(load_config("digits", ["model.sync_bn_group=3"]), 4, "cpu")


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown config key 'train.epoch'"),
    ("train.epochs=three", "train.epochs must be an integer"),
    ("model.backbone=vgg", "model.backbone must be one of"),
    ("method.beta_end=1.5", r"method.beta_end must lie in \[0, 1\]"),
    ("method.groups=0", "method.groups must be positive"),
    ("data.large_scale=[0.2]", "data.large_scale must have 2 entries"),
    ("train", "must look like section.key=value"),
    ("model.bn_crops=mixed", "model.bn_crops must be one of pooled, per_resolution"),
    ("method.swap=small", "method.swap must be one of all, large"),
    ("method.target_crops=[2]", r"method.target_crops must list distinct large-crop indices in \[0, 1\]"),
    ("method.target_crops=[]", "method.target_crops must list distinct"),
    ("method.update_crops=[0, 0]", "method.update_crops must list distinct"),
    ("method.update_crops=[-1]", "method.update_crops must list distinct"),
    ("model.sync_bn_group=-1", "model.sync_bn_group must be >= 0"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("digits", [override])


def test_unknown_recipe_lists_the_packaged_ones():
    with pytest.raises(ConfigError, match="quickstart"):
        load_config("no_such_recipe")


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOG_DEBIAN_FASHION_MNIST", str(tmp_path / "debian"))
    cfg = load_config("quickstart", [f"data.root={tmp_path}", "data.download=never"])
    with pytest.raises(DatasetNotFound, match=f"(?s){tmp_path / 'debian'}.*{tmp_path}.*data.download=never.*"
                                              f"apt-get install dataset-fashion-mnist.*data.root.*data.download=auto"):
        load_split(cfg.data, "train")
    cfg = load_config("quickstart", [f"data.root={tmp_path}", "data.name=cifar10", "data.download=never"])
    with pytest.raises(DatasetNotFound, match="data.download=auto"):
        load_split(cfg.data, "train")


def test_cli_reports_config_errors_without_a_traceback(capsys):
    assert smog_main(["train", "train.epochs=-1"]) == 2
    assert "train.epochs must be positive" in capsys.readouterr().err


def test_too_many_groups_for_the_data(tmp_path):
    from smog.loop import Trainer

    with pytest.raises(ConfigError, match="method.groups=5000 exceeds"):
        Trainer(load_config("digits", ["method.groups=5000", f"train.out_dir={tmp_path}"]))
