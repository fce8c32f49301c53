"""Every setting of moco_engine as one dataclass schema, and the strict loader.

A run's configuration is built in three layers: the schema's defaults, then YAML files, then
``key=value`` overrides from the command line (OmegaConf dotlist syntax)::

    cfg = load_config(["configs/experiment/cifar10_demo.yaml"], ["optim.lr=0.1", "queue.size=8192"])

Loading is strict: an unknown key names the closest valid key, a value of the wrong type names
key and value, and an invalid value (``queue.size=0``) names the rule it breaks. All of these raise
:class:`ConfigError`, which the command-line tools turn into one line and exit code 2.

The schema's defaults are the embedded default run (``moco-train`` with no arguments): a short
pretraining of a ResNet-18 (standard stem, cheap at 32 px) on the CIFAR-10 sample shipped inside
the package, sized to finish in minutes on 2 CPU cores. Recipes set every key they rely on.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    InterpolationResolutionError,
    OmegaConfBaseException,
    ValidationError,
)


class UserError(Exception):
    """An error the user can fix (bad config, missing data, incompatible checkpoint).

    The command-line tools print its message as one line and exit with code 2, no traceback.
    """


class ConfigError(UserError):
    """A configuration key or value is wrong."""


@dataclass
class DataConfig:
    name: str = "embedded"  # embedded | cifar10 | imagefolder | synthetic
    root: str = ""  # cifar10: torchvision root; imagefolder: a folder or a .tar/.tar.gz/.tar.xz
    test_root: str = ""  # where the test split lives when not under `root` (imagefolder)
    train_split: str = "train"  # imagefolder: sub-folder of the pretraining images
    test_split: str = "test"  # imagefolder: sub-folder of the kNN query images ("" = none)
    download: bool = False  # cifar10 only: let torchvision download it
    augmentation: str = "cifar"  # cifar | moco_v1 | moco_v2
    image_size: int = 32  # crop size of the augmentations
    num_workers: int = 2  # DataLoader worker processes (0 = load in the main process)
    on_bad_image: str = "fail"  # fail (stop, naming the file) | skip (leave unreadable images out, count and warn)
    drop_last: bool = True  # drop each epoch's last partial batch (off: a ragged last batch is trained on)
    pipeline: str = "cpu"  # cpu (PIL augmentations in loader workers) | device (decoded once, augmented batched on train.device)
    synthetic_size: int = 512  # synthetic: number of training images (test: a quarter)
    synthetic_classes: int = 4  # synthetic: number of classes


@dataclass
class ModelConfig:
    arch: str = "resnet18"  # resnet18 | resnet34 | resnet50 (torchvision)
    cifar_stem: bool = False  # conv1 3x3 stride 1 and no max-pool (for 32 px; 16x the FLOPs)
    # linear (MoCo v1, the CIFAR-10 demo) | mlp (MoCo v2) | mlp_bn (MoCo v3's projector). Linear by
    # default: in the short embedded run the MLP head stays on MoCo's collapsed start (BENCHMARKS.md).
    head: str = "linear"
    hidden_dim: int = 0  # width of the MLP head's hidden layer (0 = the backbone's width)
    dim: int = 128  # D, the embedding size of queries, keys and negatives
    momentum: float = 0.99  # m of the key encoder's EMA
    momentum_schedule: str = "constant"  # constant | cosine (m rises to 1 over training)
    bn: str = "shuffle"  # shuffle (key batch permuted across all ranks before f_k) | sync (SyncBN, CUDA) | plain
    norm: str = "batch"  # batch | group (GroupNorm, 32 groups: no statistics shared between samples)
    bn_splits: int = 4  # split-BN: BN statistics over this many slices of each batch
    bn_split_form: str = "auto"  # how split-BN is computed: auto | per_slice | one_pass | strided (encoders.SplitBatchNorm)


@dataclass
class LossConfig:
    name: str = "infonce"  # infonce | nt_xent | nce | pair | triplet | lifted | npair | debiased | mochi (moco_engine.losses.LOSSES)
    temperature: float = 0.1  # T
    symmetric: bool = False  # each crop is once the query (two key passes, both keys enqueued)
    pair_margin: float = 1.0  # pair: margin on the squared distance of negative pairs
    triplet_margin: float = 0.2  # triplet: alpha
    lifted_margin: float = 1.0  # lifted: alpha
    tau_plus: float = 0.1  # debiased: the class prior of a false negative
    mochi_hardest: int = 1024  # mochi: the pool of hardest negatives mixed from
    mochi_mix: int = 1024  # mochi: synthetic negatives mixed from two hard negatives
    mochi_mix_query: int = 256  # mochi: synthetic negatives mixed from the query and a hard negative
    byol_hidden_dim: int = 4096  # byol: width of the predictor MLP


@dataclass
class NegativesConfig:
    kind: str = "queue"  # queue | memory_bank | in_batch


@dataclass
class QueueConfig:
    size: int = 1024  # K, the number of negatives (the queue's length; the bank's samples per step)
    mask_same_instance: bool = False  # drop a query's own older key from its negatives
    dtype: str = "float32"  # float32 | bfloat16 | float16 storage (logits are always float32)


@dataclass
class MemoryBankConfig:
    init: str = "random"  # random | encode (one encoding pass of the data set before training)
    positive: str = "bank"  # bank (Wu et al.'s v_i) | key (the key encoder's output)
    update: str = "refresh"  # refresh (re-encode all items each epoch) | momentum | both
    momentum: float = 0.5  # m of the proximal update v_i <- normalize(m v_i + (1 - m) f_i)
    exclude_own: bool = True  # drop a query's own item from its sampled negatives
    replacement: bool = True  # sample the K negatives with replacement


@dataclass
class OptimConfig:
    lr: float = 0.06
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128  # per process
    lr_scaling: str = "none"  # none | linear (lr = optim.lr x global batch / 256)
    schedule: str = "cosine"  # cosine | step | constant (after the warm-up)
    warmup_epochs: float = 0.0  # linear warm-up from 0
    milestones: list[int] = field(default_factory=lambda: [120, 160])  # step: epochs of lr x gamma
    gamma: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 12  # the embedded default run: about 3.5 minutes on 2 CPU cores
    out_dir: str = "runs/default"  # the run folder: config, checkpoints, metrics
    resume: str = ""  # "" (start fresh) | auto (latest checkpoint in out_dir, if any) | a path
    overwrite: bool = False  # allow starting fresh in a folder that holds checkpoints
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    steps_per_epoch: int = 0  # stop each epoch after this many steps (0 = the whole epoch)
    log_every: int = 10  # steps between metrics.jsonl lines
    keep_checkpoints: int = 2  # the newest k epoch checkpoints are kept
    max_nonfinite_skips: int = 0  # skip up to this many steps whose loss is NaN/inf (checked every step) before stopping
    save_every: int = 1  # epochs between checkpoints (the last epoch and a stop signal always save)
    channels_last: bool = True  # NHWC memory format: faster convolutions on CPU and on tensor cores
    compile: bool = False  # torch.compile the encoders (first steps pay the compilation)


@dataclass
class EvalConfig:
    at_start: bool = False  # also run kNN before the first step (the random-init baseline)
    knn_every: int = 3  # epochs between kNN evaluations (the last epoch always runs one; 0 = only it)
    knn_k: int = 200
    knn_t: float = 0.1
    knn_features: str = "backbone"  # backbone | head (normalised either way)
    batch_size: int = 512


@dataclass
class LinearConfig:
    """The linear probe of ``moco-eval linear``: MoCo's protocol (a fc on the frozen backbone)."""

    epochs: int = 100
    lr: float = 30.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: list[int] = field(default_factory=lambda: [60, 80])  # epochs of lr x gamma
    gamma: float = 0.1
    batch_size: int = 256
    cached: bool = False  # train on features extracted once, without augmentation (fast variant)


@dataclass
class WandbConfig:
    # "" (not set: the WANDB_MODE environment variable, else disabled; online under `wandb agent`) |
    # online | offline | disabled. A mode set here wins over WANDB_MODE, as wandb.init(mode=...) does.
    mode: str = ""
    project: str = "moco_engine"
    entity: str = ""  # W&B user or team ("" = the account's default)
    group: str = ""  # runs of one sweep share a group (moco-sweep sets it)
    name: str = ""  # "" = the run folder's name
    tags: list[str] = field(default_factory=list)
    log_checkpoints: bool = False  # upload each checkpoint as a W&B artifact


@dataclass
class TrackConfig:
    progress: bool = True  # tqdm progress bar on the console
    preview: int = 8  # query/key view pairs drawn to augmentations.png at the start (0 = none)
    # Warn when embed_std·sqrt(D) falls below this (uniform on the sphere: 1). A run stuck on
    # MoCo's collapsed start sat at 0.018-0.05 for 150 steps; learning runs stayed above 0.11.
    collapse_threshold: float = 0.05
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    method: str = "moco"  # moco (a contrastive loss over negatives) | byol (a predictor, no negatives)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    memory_bank: MemoryBankConfig = field(default_factory=MemoryBankConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    track: TrackConfig = field(default_factory=TrackConfig)


# Values a key may take, where the set is closed. Checked after merging, so the error names the key.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": ("embedded", "cifar10", "imagefolder", "synthetic"),
    "data.augmentation": ("cifar", "moco_v1", "moco_v2"),
    "data.pipeline": ("cpu", "device"),
    "data.on_bad_image": ("fail", "skip"),
    "model.arch": ("resnet18", "resnet34", "resnet50"),
    "model.head": ("linear", "mlp", "mlp_bn"),
    "model.momentum_schedule": ("constant", "cosine"),
    "model.bn": ("shuffle", "sync", "plain"),
    "model.norm": ("batch", "group"),
    "model.bn_split_form": ("auto", "per_slice", "one_pass", "strided"),
    "method": ("moco", "byol"),
    "loss.name": ("infonce", "nt_xent", "nce", "pair", "triplet", "lifted", "npair", "debiased", "mochi"),
    "negatives.kind": ("queue", "memory_bank", "in_batch"),
    "queue.dtype": ("float32", "bfloat16", "float16"),
    "memory_bank.init": ("random", "encode"),
    "memory_bank.positive": ("bank", "key"),
    "memory_bank.update": ("refresh", "momentum", "both"),
    "optim.schedule": ("cosine", "step", "constant"),
    "optim.lr_scaling": ("none", "linear"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "eval.knn_features": ("backbone", "head"),
    "track.wandb.mode": ("", "online", "offline", "disabled"),
}


def valid_keys(node: Any = None, prefix: str = "") -> list[str]:
    """All dotted keys of the schema, e.g. ``["data.name", ..., "track.progress"]``."""
    node = OmegaConf.structured(Config) if node is None else node
    keys = []
    for key, value in node.items_ex(resolve=False) if isinstance(node, DictConfig) else []:
        full = f"{prefix}{key}"
        if isinstance(value, DictConfig):
            keys += valid_keys(value, full + ".")
        else:
            keys.append(full)
    return keys


def _unknown_key_message(full_key: str, source: str) -> str:
    close = difflib.get_close_matches(full_key, valid_keys(), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown config key '{full_key}' in {source}{hint}"


def _groups() -> dict[str, list[str]]:
    """Each group of settings (``optim``, ``track.wandb``, ...) and its keys."""
    out: dict[str, list[str]] = {}
    for key in valid_keys():
        parts = key.split(".")
        for i in range(1, len(parts)):
            out.setdefault(".".join(parts[:i]), []).append(key)
    return out


def _check_groups(layer: Any, source: str, prefix: str = "") -> None:
    """A group given a plain value (``optim=5``) is named with its keys (OmegaConf would say
    "config key 'None'")."""
    groups = _groups()
    for key, value in (layer.items_ex(resolve=False) if isinstance(layer, DictConfig) else []):
        full = f"{prefix}{key}"
        if full in groups and not isinstance(value, DictConfig):
            keys = groups[full]
            raise ConfigError(f"config key '{full}' in {source} is a group of settings, not a value: set one of its "
                              f"keys ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")
        if isinstance(value, DictConfig):
            _check_groups(value, source, full + ".")


def _merge(base: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    """Merge one layer into the structured config, turning OmegaConf's errors into one line."""
    _check_groups(layer, source)
    try:
        return OmegaConf.merge(base, layer)
    except ConfigKeyError as e:
        raise ConfigError(_unknown_key_message(str(e.full_key or e.key), source)) from None
    except ValidationError as e:
        value = OmegaConf.select(layer, str(e.full_key), default=getattr(e, "value", "?"))
        expected = type(OmegaConf.select(base, str(e.full_key))).__name__
        raise ConfigError(
            f"config key '{e.full_key}' in {source}: value {value!r} is not a valid {expected}"
        ) from None
    except OmegaConfBaseException as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"invalid config in {source}: {first}") from None


def _read_yaml(path: str) -> DictConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        layer = OmegaConf.load(p)
    except Exception as e:  # yaml.YAMLError and friends: report the file, the line and the problem
        raise ConfigError(f"cannot parse config file {yaml_problem(e, path)}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not a list")
    return layer


def yaml_problem(e: BaseException, path: str | Path) -> str:
    """``<file>, line N: <problem>`` of a YAML error (a duplicate key, bad indentation, ...)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is not None and problem:
        return f"{path}, line {mark.line + 1}: {problem}"
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"{path}: {first}"


def _parse_dotlist(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"cannot parse overrides {' '.join(overrides)}: {first}") from None


def validate(cfg: Config) -> None:
    """Reject values that type-check but make no sense, naming the key and the rule."""

    def need(ok: bool, key: str, value: Any, rule: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}' = {value!r}: {rule}")

    # No setting takes NaN or ±inf: none is meaningful there, and each would poison the run.
    for key in valid_keys():
        value = setting(cfg, key)
        if isinstance(value, float):
            need(math.isfinite(value), key, value, "must be a finite number")
    need(DEVICE.match(cfg.train.device) is not None, "train.device", cfg.train.device, "not a device (auto, cpu, cuda or cuda:N)")
    need(cfg.train.seed >= 0, "train.seed", cfg.train.seed, "must be >= 0")
    for group in ("optim", "linear"):
        opt = getattr(cfg, group)
        need(0 <= opt.momentum <= 1, f"{group}.momentum", opt.momentum, "SGD momentum must lie in [0, 1]")
        need(opt.weight_decay >= 0, f"{group}.weight_decay", opt.weight_decay, "must be >= 0")
        need(opt.gamma > 0, f"{group}.gamma", opt.gamma, "must be > 0")
        need(all(m >= 0 for m in opt.milestones), f"{group}.milestones", opt.milestones, "epochs must be >= 0")
    need(cfg.track.collapse_threshold >= 0, "track.collapse_threshold", cfg.track.collapse_threshold, "must be >= 0")
    for key in ("pair_margin", "triplet_margin", "lifted_margin"):
        need(getattr(cfg.loss, key) >= 0, f"loss.{key}", getattr(cfg.loss, key), "must be >= 0")
    for key, choices in CHOICES.items():
        value = setting(cfg, key)
        need(value in choices, key, value, f"must be one of {', '.join(choices)}")
    need(
        cfg.loss.name != "nce" or cfg.negatives.kind == "memory_bank",
        "loss.name",
        cfg.loss.name,
        f"NCE needs negatives.kind=memory_bank (uniform noise over the items), not {cfg.negatives.kind}",
    )
    need(cfg.queue.size >= 1, "queue.size", cfg.queue.size, "K must be >= 1")
    need(0.0 <= cfg.memory_bank.momentum <= 1.0, "memory_bank.momentum", cfg.memory_bank.momentum, "must lie in [0, 1]")
    need(cfg.model.dim >= 1, "model.dim", cfg.model.dim, "must be >= 1")
    need(cfg.model.hidden_dim >= 0, "model.hidden_dim", cfg.model.hidden_dim, "must be >= 0")
    need(0.0 <= cfg.model.momentum <= 1.0, "model.momentum", cfg.model.momentum, "m must lie in [0, 1]")
    need(cfg.model.bn_splits >= 1, "model.bn_splits", cfg.model.bn_splits, "must be >= 1")
    need(cfg.model.bn != "sync" or cfg.model.bn_splits == 1, "model.bn_splits", cfg.model.bn_splits,
         "must be 1 with model.bn=sync (SyncBN normalises over the global batch)")
    need(cfg.loss.temperature > 0, "loss.temperature", cfg.loss.temperature, "T must be > 0")
    need(0 <= cfg.loss.tau_plus < 1, "loss.tau_plus", cfg.loss.tau_plus, "must lie in [0, 1)")
    for key in ("mochi_hardest", "mochi_mix", "mochi_mix_query"):
        need(getattr(cfg.loss, key) >= 0, f"loss.{key}", getattr(cfg.loss, key), "must be >= 0")
    need(cfg.loss.byol_hidden_dim >= 1, "loss.byol_hidden_dim", cfg.loss.byol_hidden_dim, "must be >= 1")
    need(cfg.optim.lr >= 0, "optim.lr", cfg.optim.lr, "must be >= 0")
    need(cfg.optim.batch_size >= 1, "optim.batch_size", cfg.optim.batch_size, "must be >= 1")
    need(
        cfg.optim.batch_size >= cfg.model.bn_splits,
        "model.bn_splits",
        cfg.model.bn_splits,
        f"cannot exceed optim.batch_size ({cfg.optim.batch_size})",
    )
    need(cfg.optim.warmup_epochs >= 0, "optim.warmup_epochs", cfg.optim.warmup_epochs, "must be >= 0")
    need(cfg.train.epochs >= 1, "train.epochs", cfg.train.epochs, "must be >= 1")
    need(cfg.train.steps_per_epoch >= 0, "train.steps_per_epoch", cfg.train.steps_per_epoch, "must be >= 0")
    need(cfg.train.log_every >= 1, "train.log_every", cfg.train.log_every, "must be >= 1")
    need(cfg.train.max_nonfinite_skips >= 0, "train.max_nonfinite_skips", cfg.train.max_nonfinite_skips, "must be >= 0")
    need(cfg.train.save_every >= 1, "train.save_every", cfg.train.save_every, "must be >= 1")
    need(cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints", cfg.train.keep_checkpoints, "must be >= 1")
    need(bool(cfg.train.out_dir), "train.out_dir", cfg.train.out_dir, "must name a folder")
    need(cfg.data.image_size >= 8, "data.image_size", cfg.data.image_size, "must be >= 8")
    need(cfg.data.num_workers >= 0, "data.num_workers", cfg.data.num_workers, "must be >= 0")
    need(cfg.data.synthetic_size >= 2, "data.synthetic_size", cfg.data.synthetic_size, "must be >= 2")
    need(cfg.data.synthetic_classes >= 2, "data.synthetic_classes", cfg.data.synthetic_classes, "must be >= 2")
    need(
        cfg.data.name not in ("cifar10", "imagefolder") or bool(cfg.data.root),
        "data.root",
        cfg.data.root,
        f"data.name={cfg.data.name} needs a data folder",
    )
    need(cfg.eval.knn_every >= 0, "eval.knn_every", cfg.eval.knn_every, "must be >= 0")
    need(cfg.eval.knn_k >= 1, "eval.knn_k", cfg.eval.knn_k, "must be >= 1")
    need(cfg.eval.knn_t > 0, "eval.knn_t", cfg.eval.knn_t, "must be > 0")
    need(cfg.eval.batch_size >= 1, "eval.batch_size", cfg.eval.batch_size, "must be >= 1")
    need(cfg.track.preview >= 0, "track.preview", cfg.track.preview, "must be >= 0")
    need(cfg.linear.epochs >= 1, "linear.epochs", cfg.linear.epochs, "must be >= 1")
    need(cfg.linear.lr > 0, "linear.lr", cfg.linear.lr, "must be > 0")
    need(cfg.linear.batch_size >= 1, "linear.batch_size", cfg.linear.batch_size, "must be >= 1")


DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def setting(cfg: Any, key: str) -> Any:
    """The value of a dotted key (``queue.size``) of a :class:`Config`."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def ignored_settings(cfg: Config) -> list[str]:
    """Settings changed from their defaults that this config's method or negatives ignore,
    as ``key=value`` (a warning, not an error: a sweep may share them across methods)."""
    defaults = Config()
    ignored: list[str] = []
    if cfg.method == "byol":
        groups = ("negatives", "queue", "memory_bank")
        ignored += [f"{k}={setting(cfg, k)}" for k in valid_keys() if k.startswith(groups) and setting(cfg, k) != setting(defaults, k)]
        if cfg.loss.name != defaults.loss.name:
            ignored.append(f"loss.name={cfg.loss.name}")
    elif cfg.negatives.kind == "in_batch":
        ignored += [f"{k}={setting(cfg, k)}" for k in valid_keys() if k.startswith(("queue", "memory_bank"))
                    and setting(cfg, k) != setting(defaults, k)]
    elif cfg.negatives.kind == "queue":
        ignored += [f"{k}={setting(cfg, k)}" for k in valid_keys() if k.startswith("memory_bank") and setting(cfg, k) != setting(defaults, k)]
    return ignored


def load_config(
    yaml_files: list[str] | tuple[str, ...] = (),
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> Config:
    """Build the run's :class:`Config`: defaults, then ``base`` (a checkpoint's saved config), then
    each YAML file in order, then overrides.

    Raises:
        ConfigError: an unknown key, a wrong type, an unreadable file or an invalid value.
    """
    merged = OmegaConf.structured(Config)
    if base is not None:
        merged = _merge(merged, OmegaConf.create(base), "the checkpoint's config")
    for path in yaml_files:
        merged = _merge(merged, _read_yaml(path), path)
    if overrides:
        merged = _merge(merged, _parse_dotlist(list(overrides)), "the command-line overrides")
    try:
        cfg = OmegaConf.to_object(merged)
    except InterpolationResolutionError as e:
        cause = str(e).splitlines()[0]
        env = re.search(r"Environment variable '([^']+)' not found", cause)
        what = f"environment variable {env[1]} is not set" if env else cause
        raise ConfigError(f"config key '{e.full_key}': {what}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config: {str(e).splitlines()[0]}") from None
    assert isinstance(cfg, Config)
    validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (saved in the run folder and read back by :func:`from_dict`)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain Python containers (stored inside every checkpoint)."""
    out = OmegaConf.to_container(OmegaConf.structured(cfg))
    assert isinstance(out, dict)
    return out


def from_dict(data: dict[str, Any], source: str = "a checkpoint") -> Config:
    """Rebuild a :class:`Config` from :func:`to_dict`'s output, strictly."""
    cfg = OmegaConf.to_object(_merge(OmegaConf.structured(Config), OmegaConf.create(data), source))
    assert isinstance(cfg, Config)
    return cfg
