"""After pretraining: open a checkpoint's query encoder, evaluate it, export its backbone.

Used by ``moco-eval`` and ``moco-export`` (cli.py); each function also works from Python::

    cfg, encoder, path = open_checkpoint("runs/cifar10_demo")     # the run's latest checkpoint
    torch.save(torchvision_state_dict(encoder), "r18.pth")
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from .config import Config, UserError, load_config
from .data import build_splits
from .encoders import Encoder, build_encoder
from .evaluation import extract_features, knn_monitor
from .precision import autocast_dtype, resolve_device
from .probe import linear_probe, linear_probe_cached
from .recipes import eval_transform, probe_transform
from .sampling import EpochSampler, Indexed, make_loader


def open_checkpoint(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, Encoder, Path]:
    """The query encoder f_q of a checkpoint (a file, or a run folder: its latest checkpoint).

    The config is the one saved in the checkpoint with ``overrides`` on top (e.g. ``data.root``
    where the data lives on this machine, ``eval.knn_k``, ``linear.epochs``).

    Raises:
        CheckpointError: no readable checkpoint there.
        UserError: an override changes the model so the weights no longer fit.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        found = ckpt.latest_checkpoint(path)
        if found is None:
            raise ckpt.CheckpointError(f"no checkpoint in {path / ckpt.CHECKPOINT_DIR}")
        path, state = found
    else:
        state = ckpt.load_checkpoint(path)
    cfg = load_config([], list(overrides), base=state["config"])
    encoder = build_encoder(cfg.model)
    try:
        encoder.load_state_dict(state["encoder_q"])
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"checkpoint {path} does not fit the model these overrides describe: {first}") from None
    return cfg, encoder, path


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def torchvision_state_dict(encoder: Encoder) -> dict[str, torch.Tensor]:
    """The query backbone as a torchvision ResNet state_dict: it loads into
    ``torchvision.models.resnetXX()`` with only ``fc.weight`` and ``fc.bias`` missing (for a
    CIFAR-stem model, after replacing ``conv1`` by a 3×3 stride-1 conv and ``maxpool`` by
    ``nn.Identity()``, as the model was trained)."""
    return {name: t.detach().clone().cpu() for name, t in encoder.backbone.state_dict().items()}


def detectron2_name(name: str) -> str:
    """A torchvision ResNet key as detectron2's ResNet names it (the renames MoCo's
    conversion script applies): the stem under ``stem.``, layerN as res(N+1), bnK as convK.norm,
    the downsample conv and BN as ``shortcut`` and ``shortcut.norm``."""
    if not name.startswith("layer"):
        name = "stem." + name
    for i in range(1, 5):
        name = name.replace(f"layer{i}", f"res{i + 1}")
    for k in range(1, 4):
        name = name.replace(f"bn{k}", f"conv{k}.norm")
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def detectron2_checkpoint(encoder: Encoder) -> dict[str, Any]:
    """The backbone as detectron2 loads a pickled pretrained model: numpy arrays under renamed
    keys (``num_batches_tracked`` dropped), ``matching_heuristics`` on."""
    model = {
        detectron2_name(name): t.numpy()
        for name, t in torchvision_state_dict(encoder).items()
        if not name.endswith("num_batches_tracked")
    }
    return {"model": model, "__author__": "moco_engine", "matching_heuristics": True}


def export(encoder: Encoder, out_stem: Path, formats: list[str]) -> list[Path]:
    """Write the backbone in each of ``formats`` (torchvision: ``.pth``, detectron2: ``.pkl``)
    next to ``out_stem``; refuses to overwrite an existing file."""
    targets = {"torchvision": out_stem.with_name(out_stem.name + "_torchvision.pth"),
               "detectron2": out_stem.with_name(out_stem.name + "_detectron2.pkl")}
    chosen = [targets[f] for f in formats]
    for target in chosen:
        if target.exists():
            raise UserError(f"{target} exists; remove it or pass --out elsewhere")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out {out_stem}: cannot make the folder {target.parent}: {e.strerror}") from None
    written = []
    for fmt, target in zip(formats, chosen):
        if fmt == "torchvision":
            torch.save(torchvision_state_dict(encoder), target)
        else:
            with open(target, "wb") as f:
                pickle.dump(detectron2_checkpoint(encoder), f)
        written.append(target)
    return written


# ---------------------------------------------------------------------------------------------
# Evaluation of a checkpoint
# ---------------------------------------------------------------------------------------------
def evaluate_knn(cfg: Config, encoder: Encoder) -> dict[str, float]:
    """Weighted kNN (``eval.knn_k``, ``eval.knn_t``) of the test split against the train split:
    the monitor training runs (``evaluation.knn_monitor``), at the run's ``train.precision``."""
    device = resolve_device(cfg.train.device)
    splits = build_splits(cfg.data, seed=cfg.train.seed)
    if splits.test is None:
        raise UserError("config key 'data.test_split' is empty: kNN needs a test split to classify")
    plain = eval_transform(cfg.data.augmentation, cfg.data.image_size)
    loader = lambda images: make_loader(Indexed(images, plain), cfg.eval.batch_size, cfg.data.num_workers)  # noqa: E731
    model = (encoder.backbone if cfg.eval.knn_features == "backbone" else encoder).to(device)
    result = knn_monitor(model, loader(splits.train), loader(splits.test), len(splits.train), len(splits.test),
                         len(splits.train.classes), cfg.eval.knn_k, cfg.eval.knn_t, device,
                         autocast_dtype(cfg.train.precision, device))
    return {**result, "knn_k": cfg.eval.knn_k, "knn_t": cfg.eval.knn_t, "features": cfg.eval.knn_features}


def evaluate_linear(cfg: Config, encoder: Encoder) -> dict[str, Any]:
    """The linear probe of ``linear.*`` on the backbone (its output before the head)."""
    device = resolve_device(cfg.train.device)
    dtype = autocast_dtype(cfg.train.precision, device)
    splits = build_splits(cfg.data, seed=cfg.train.seed)
    if splits.test is None:
        raise UserError("config key 'data.test_split' is empty: the linear probe needs a test split")
    num_classes = len(splits.train.classes)
    backbone: nn.Module = encoder.backbone.to(device)
    plain = eval_transform(cfg.data.augmentation, cfg.data.image_size)
    bs, workers = cfg.linear.batch_size, cfg.data.num_workers
    test_loader = make_loader(Indexed(splits.test, plain), bs, workers)
    lin = cfg.linear
    if lin.cached:
        train = extract_features(backbone, make_loader(Indexed(splits.train, plain), bs, workers), device, normalize=False,
                                 dtype=dtype)
        test = extract_features(backbone, test_loader, device, normalize=False, dtype=dtype)
        result = linear_probe_cached(train, test, num_classes, lin, seed=cfg.train.seed)
    else:
        sampler = _ShuffledEpochs(len(splits.train), cfg.train.seed)
        augmented = Indexed(splits.train, probe_transform(cfg.data.augmentation, cfg.data.image_size), cfg.train.seed)
        train_loader = make_loader(augmented, bs, workers, sampler)
        width = next(m for m in encoder.head.modules() if isinstance(m, nn.Linear)).in_features
        result = linear_probe(backbone, train_loader, test_loader, width, num_classes, lin, device, seed=cfg.train.seed,
                              dtype=dtype)
    return {**result, "variant": "cached" if lin.cached else "augmented", "epochs": lin.epochs, "lr": lin.lr}


class _ShuffledEpochs(EpochSampler):
    """A fresh seeded shuffle each time it is iterated: one pass of the loader is one probe epoch."""

    def __iter__(self):
        keys = list(super().__iter__())
        self.epoch += 1
        return iter(keys)
