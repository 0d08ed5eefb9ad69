"""Typed training configuration: YAML files over dataclasses, with `section.key=value` overrides.

A config is data: `load_config(name_or_path, overrides)` reads a YAML recipe (a file path, or the name
of a packaged recipe in smog/configs/), applies `key=value` overrides (values parsed as YAML) and
checks every field's type and range, raising ConfigError naming the key.

A recipe may start from another one: a top-level `base: <name-or-path>` (a packaged name, or a file
path, relative paths taken from the including file's directory) loads that recipe first and merges this
file over it key by key (sections merged, values and lists replaced); bases may have bases. The `name`
is never inherited: it is the file's own `name` key or, failing that, its file name.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A bad config file, key or value; the message names the key."""


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # fashion_mnist, mnist, cifar10, cifar100, stl10, folder, digits
    root: str = ""  # where to look for / download the data ("" = the dataset's default place)
    download: str = "auto"  # auto: fetch a dataset found nowhere on disk; never: only look on disk
    train_subset: int = 0  # use only the first N training images for pretraining (0 = all)
    small_crops: int = 0
    large_size: int = 28
    small_size: int = 14
    large_scale: tuple[float, float] = (0.2, 1.0)
    small_scale: tuple[float, float] = (0.05, 0.2)
    color: bool = True  # colour jitter / grayscale / solarise (off for grey images is fine too)
    blur: bool = True
    flip: bool = True
    augment_on: str = "loader"  # loader: per image in the DataLoader workers; device: whole batches on the device
    workers: int = 0
    pin_memory: bool = True
    max_bad_fraction: float = 0.001  # image folders: stop once more than this share of the files is unreadable


@dataclass
class ModelConfig:
    backbone: str = "small_cnn"  # small_cnn, resnet18, resnet50, resnet50w2, swin_t, vit_b_16, timm/<name>
    small_stem: bool = False  # 3x3 stride-1 stem without max-pool for small images (ResNets)
    width: int = 32  # base channel count of small_cnn
    grid: int = 1  # small_cnn's output: average pool to grid x grid cells, flattened (1 = global average pool)
    proj_hidden: int = 2048
    pred_hidden: int = 2048
    dim: int = 128  # D: projector output / group feature dimension
    sync_bn: bool = False  # SyncBatchNorm when running on several processes
    channels_last: bool = False
    compile: bool = False  # torch.compile the backbones
    checkpoint: bool = False  # activation checkpointing of the backbone's stages (recomputed in backward)
    bn_crops: str = "pooled"  # pooled: one set of BatchNorm statistics over all crop sizes; per_resolution: one per size


@dataclass
class MethodConfig:
    heads: int = 3  # H
    groups: int = 3000  # K
    temperature: float = 0.1
    beta_start: float = 1.0  # group momentum at the first iteration ...
    beta_end: float = 0.99  # ... falling linearly to this at the last (equal values: constant)
    ema_start: float = 0.999  # momentum-network EMA rate, cosine from ema_start ...
    ema_end: float = 0.999  # ... to ema_end
    grad_into_groups: bool = False  # lightly's variant: gradient through the (1 - beta) * mean term
    recluster_every: int = 1  # epochs between spherical k-means re-clusterings (0 = never)
    kmeans_iters: int = 10
    reset_momentum_each_epoch: bool = True
    backend: str = "auto"  # smog_kernels backend
    cuda_graphs: bool = False  # replay each head's grouping step from CUDA graphs (one CUDA process only)
    step_dtype: str = "auto"  # rows of the grouping step: auto = bfloat16 under bf16 autocast, else float32
    swap: str = "all"  # odd iterations swap the q and k crop sets: all crops, or only the large ones
    target_crops: tuple[int, ...] = (0, 1)  # large k crops whose momentum z give the targets
    update_crops: tuple[int, ...] = (0, 1)  # head h's update rows: online z of large q crop update_crops[h % len]
    momentum_small: bool = True  # the momentum network also forwards the small k crops (their BN statistics)
    collapse_fraction: float = 0.1  # warn when a head's groups in use per step stay under this share of the fillable
    collapse_steps: int = 100  # ... for this many steps in a row (smog.health; fraction 0 = never warn)


@dataclass
class OptimConfig:
    name: str = "lars"  # lars (SGD + LARS), sgd, adamw
    lr: float = 4.8  # base learning rate (not scaled by batch size)
    warmup_epochs: float = 10.0
    warmup_start_lr: float = 0.01
    final_lr: float = 0.0048
    weight_decay: float = 1e-6
    momentum: float = 0.9
    trust_coefficient: float = 0.001
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 0.0  # max gradient norm (0 = off)
    exclude_bn_bias: bool = True  # BN/norm weights, biases, position tables: no weight decay, no LARS


@dataclass
class EvalConfig:
    knn_every: int = 1  # epochs between kNN evaluations during training (0 = only at the end)
    knn_every_minutes: float = 0.0  # also every this many minutes of training time (0 = off)
    knn_k: tuple[int, ...] = (200, 20)
    knn_t: tuple[float, ...] = (0.1, 0.07)
    knn_train_subset: int = 0  # kNN memory: first N training images (0 = all)
    knn_test_subset: int = 0  # kNN queries: first N test images (0 = all)
    baselines: bool = False  # at the end also score random-init features and raw pixels
    batch_size: int = 512
    linear_epochs: int = 100
    linear_lr: float = 0.3
    linear_weight_decay: float = 1e-6


@dataclass
class TrainConfig:
    epochs: int = 100
    minutes: float = 0.0  # train for this much training time instead of train.epochs, the schedules laid over it
    batch_size: int = 256  # global batch of one optimiser step, split evenly over the processes
    # A: each process forwards its share in A sub-batches, one optimiser step per A (the authors' multi_forward;
    # 1 as their scripts run: they pass --multi-forward, which parse_known_args ignores)
    accumulate: int = 1
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda
    bf16: bool = True  # bf16 autocast where the device supports it (CUDA)
    out_dir: str = "runs"
    run_name: str = ""  # "" = the config's name
    resume: str = ""  # "" (fresh), "auto" (latest checkpoint of the run, if any) or a path
    checkpoint_every_steps: int = 0  # also checkpoint mid-epoch every N steps (0 = epoch ends only)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    progress: bool = True
    log_every: int = 50  # steps between step records (loss, lr, group health) in metrics.jsonl
    profile: int = 0  # profile this many steps (after 2 warm-up steps) into <run>/profile (0 = off)
    tensorboard: bool = True  # TensorBoard event files beside metrics.jsonl (when tensorboard is installed)
    wandb: bool = False  # also log to Weights & Biases (needs the wandb package)
    wandb_project: str = "smog"
    dist_timeout_s: float = 600.0  # how long a process waits for a peer in a collective before failing


@dataclass
class Config:
    name: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


CHOICES = {
    "data.name": ("fashion_mnist", "mnist", "cifar10", "cifar100", "stl10", "folder", "digits"),
    "data.augment_on": ("loader", "device"),
    "data.download": ("auto", "never"),
    "method.step_dtype": ("auto", "float32", "bfloat16", "float16"),
    "method.swap": ("all", "large"),
    "model.bn_crops": ("pooled", "per_resolution"),
    "model.backbone": ("small_cnn", "resnet18", "resnet50", "resnet50w2", "swin_t", "vit_b_16"),
    "optim.name": ("lars", "sgd", "adamw"),
    "train.device": ("auto", "cpu", "cuda"),
}
POSITIVE = ("data.large_size", "data.small_size", "model.width", "model.grid", "model.proj_hidden",
            "model.pred_hidden", "model.dim", "method.heads", "method.groups", "method.temperature",
            "method.kmeans_iters", "train.epochs", "train.batch_size", "train.accumulate", "eval.batch_size", "optim.lr")
LARGE_CROPS = 2  # large crops per view set (the q and k sets each hold 2 large + data.small_crops small)
UNIT = ("method.beta_start", "method.beta_end", "method.ema_start", "method.ema_end", "method.collapse_fraction")


def packaged_configs() -> list[str]:
    """Names of the recipes shipped in smog/configs/."""
    folder = resources.files("smog") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _find_recipe(name_or_path: str, folder: str = "") -> str | None:
    """The YAML file `name_or_path` (relative paths from `folder`), else the packaged recipe of that
    name, else None."""
    candidate = os.path.join(folder, name_or_path)
    if os.path.isfile(candidate):
        return candidate
    packaged = resources.files("smog") / "configs" / f"{name_or_path}.yaml"
    return str(packaged) if packaged.is_file() else None


def config_path(name_or_path: str) -> str:
    """A YAML path, or the packaged recipe of that name."""
    if found := _find_recipe(name_or_path):
        return found
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a packaged recipe "
                      f"(packaged: {', '.join(packaged_configs())})")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = get_args(hint)
        kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(kinds) != len(value):
            raise ConfigError(f"{key} must have {len(kinds)} entries, got {value!r}")
        return tuple(_coerce(key, v, k) for v, k in zip(value, kinds))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {hint}")  # pragma: no cover - a dataclass bug


def _apply(obj: Any, values: dict, prefix: str = "") -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        full = prefix + str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {full!r} (known under {prefix.rstrip('.') or 'top level'}: "
                              f"{', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(full, value, hints[key]))


def parse_overrides(items: list[str]) -> dict:
    """['train.epochs=3', 'model.dim=64'] -> nested dict, values parsed as YAML."""
    nested: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({error})") from None
    return nested


def validate(cfg: Config) -> None:
    """Range and choice checks; raises ConfigError naming the key."""
    def get(key: str) -> Any:
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    for key, allowed in CHOICES.items():
        if key == "model.backbone" and get(key).startswith("timm/") and len(get(key)) > len("timm/"):
            continue  # any timm model by name; timm checks the name when the model is built
        if get(key) not in allowed:
            extra = " or timm/<name>" if key == "model.backbone" else ""
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}{extra}, got {get(key)!r}")
    for key in POSITIVE:
        if get(key) <= 0:
            raise ConfigError(f"{key} must be positive, got {get(key)!r}")
    for key in UNIT:
        if not 0.0 <= get(key) <= 1.0:
            raise ConfigError(f"{key} must lie in [0, 1], got {get(key)!r}")
    if cfg.model.checkpoint and cfg.model.backbone == "small_cnn":
        raise ConfigError("model.checkpoint=true needs a backbone with stages (resnet18, resnet50, resnet50w2, "
                          "swin_t, vit_b_16), got model.backbone='small_cnn'")
    if cfg.model.grid != 1 and cfg.model.backbone != "small_cnn":
        raise ConfigError(f"model.grid={cfg.model.grid} is small_cnn's output grid; model.backbone="
                          f"{cfg.model.backbone!r} pools its own features (leave model.grid at 1)")
    if cfg.data.small_crops < 0:
        raise ConfigError(f"data.small_crops must be >= 0, got {cfg.data.small_crops}")
    if len(cfg.eval.knn_k) != len(cfg.eval.knn_t):
        raise ConfigError(f"eval.knn_k and eval.knn_t must have the same length, got {cfg.eval.knn_k} and {cfg.eval.knn_t}")
    for key in ("method.target_crops", "method.update_crops"):
        crops = get(key)
        if not crops or len(set(crops)) != len(crops) or not all(0 <= c < LARGE_CROPS for c in crops):
            raise ConfigError(f"{key} must list distinct large-crop indices in [0, {LARGE_CROPS - 1}] (there are "
                              f"{LARGE_CROPS} large crops per set), got {list(crops)}")
    if not 0.0 <= cfg.data.max_bad_fraction < 1.0:
        raise ConfigError(f"data.max_bad_fraction must lie in [0, 1) (the share of unreadable training images "
                          f"that stops a run), got {cfg.data.max_bad_fraction!r}")
    for key in ("method.recluster_every", "eval.knn_every", "train.checkpoint_every_steps", "data.workers",
                "train.minutes", "eval.knn_every_minutes", "train.profile"):
        if get(key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {get(key)!r}")
    for key in ("train.log_every", "method.collapse_steps"):
        if get(key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {get(key)!r}")
    accumulate = cfg.train.accumulate
    if accumulate > 1 and (cfg.method.cuda_graphs or cfg.method.grad_into_groups):
        raise ConfigError(f"train.accumulate={accumulate} needs method.cuda_graphs=false and "
                          f"method.grad_into_groups=false (got {cfg.method.cuda_graphs} and "
                          f"{cfg.method.grad_into_groups}): a cycle runs the grouping step over sub-batches, outside "
                          f"a CUDA graph and without a gradient into the groups")


def check_processes(cfg: Config, world: int, device_type: str) -> None:
    """The checks that depend on the processes and the device (before any data loads)."""
    if cfg.method.cuda_graphs and (device_type != "cuda" or world > 1):
        raise ConfigError(f"method.cuda_graphs=true needs one CUDA process (this run: {device_type}, {world} "
                          f"processes): the statistics cannot be reduced across processes inside a graph; set "
                          f"method.cuda_graphs=false")
    accumulate = cfg.train.accumulate
    if cfg.train.batch_size % (world * accumulate):
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} (the global batch of one optimiser step) must "
                          f"split evenly into train.accumulate={accumulate} sub-batches on each of {world} "
                          f"processes: a multiple of {world * accumulate}")
    if cfg.model.sync_bn and world > 1 and device_type != "cuda":
        raise ConfigError("model.sync_bn=true needs CUDA devices: torch's SyncBatchNorm does not run on CPU (gloo) "
                          "processes; set model.sync_bn=false")


def check_shard(cfg: Config, images_per_process: int, world: int) -> None:
    """The checks that depend on the data: a full batch per epoch, and enough memory-bank rows for k-means."""
    batch = cfg.train.batch_size // world
    if images_per_process < batch:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} exceeds the {images_per_process} images per "
                          f"process: no full batch per epoch")
    bank_rows = images_per_process // batch * batch * world
    if cfg.method.groups > bank_rows:
        raise ConfigError(f"method.groups={cfg.method.groups} exceeds the {bank_rows} rows of the memory banks "
                          f"(one epoch's batches): k-means cannot seed that many groups")


def config_from_dict(values: dict, overrides: list[str] | None = None) -> Config:
    """A checked Config from a nested dict (e.g. a checkpoint's resolved config) plus overrides."""
    cfg = Config()
    _apply(cfg, values)
    _apply(cfg, parse_overrides(overrides or []))
    validate(cfg)
    return cfg


def _base_path(path: str, base: Any) -> str:
    """The file that `base: <base>` in the recipe at `path` names (read like config_path, relative paths
    from the recipe's own directory)."""
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base must be a recipe name or a YAML path, got {base!r}")
    if found := _find_recipe(base, os.path.dirname(path)):
        return found
    candidate = os.path.join(os.path.dirname(path), base)
    raise ConfigError(f"{path}: base {base!r} is neither a file (looked for {candidate}) nor a packaged recipe "
                      f"(packaged: {', '.join(packaged_configs())})")


def recipe_layers(path: str, _chain: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """(path, values) of a recipe file and its `base` chain, the deepest base first, `base` keys removed."""
    chain = (*_chain, os.path.realpath(path))
    with open(path) as handle:
        try:
            values = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {values!r}")
    if "base" not in values:
        return [(path, values)]
    values = dict(values)
    base = _base_path(path, values.pop("base"))
    if os.path.realpath(base) in chain:
        loop = " -> ".join([*chain[chain.index(os.path.realpath(base)):], os.path.realpath(base)])
        raise ConfigError(f"{path}: base {base!r} makes a cycle ({loop})")
    return [*recipe_layers(base, chain), (path, values)]


def merge(base: dict, over: dict) -> dict:
    """`over` merged into a copy of `base` key by key: dicts merged recursively, anything else replaced."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(name_or_path: str = "quickstart", overrides: list[str] | None = None) -> Config:
    """Read a recipe (with its `base` chain) and apply overrides; returns a checked Config."""
    path = config_path(name_or_path)
    layers = recipe_layers(path)
    values: dict = {}
    for layer_path, layer in layers:
        try:  # each file checked on its own, so that an error names the file it is in
            _apply(Config(), layer)
        except ConfigError as error:
            raise ConfigError(f"{layer_path}: {error}") from None
        values = merge(values, layer)
    values["name"] = layers[-1][1].get("name", os.path.splitext(os.path.basename(path))[0])  # not inherited
    cfg = Config()
    _apply(cfg, values)
    _apply(cfg, parse_overrides(overrides or []))
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists), ready for YAML."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value
    return plain(dataclasses.asdict(cfg))
