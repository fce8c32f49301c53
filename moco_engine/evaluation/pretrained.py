"""Evaluating a pretrained encoder as ``moco-eval`` does: the weighted kNN (the monitor training
runs) and MoCo's linear probe on the frozen backbone, over the loaders of the data layer."""

from __future__ import annotations

from typing import Any

from torch import nn

from moco_engine.config.schema import Config, UserError
from moco_engine.data.sources import DataSource, open_source
from moco_engine.evaluation.knn import extract_features, knn_monitor
from moco_engine.evaluation.probe import linear_probe, linear_probe_cached
from moco_engine.method.encoders import Encoder
from moco_engine.method.itc import TwoTowers
from moco_engine.runtime.precision import autocast_dtype, resolve_device


def labelled_source(cfg: Config, why: str) -> DataSource:
    """The data source, refused in one line unless it has a labelled test split."""
    source = open_source(cfg)
    splits = source.splits
    if splits.test is None or not splits.train.labelled:
        raise UserError(f"config key 'data.name' = {cfg.data.name!r} (test split {cfg.data.test_split!r}): {why}")
    return source


def image_encoder(encoder: nn.Module) -> Encoder:
    """What kNN and the probe judge: an image–text run's image tower (``itc.TwoTowers.image``), or
    the encoder itself."""
    return encoder.image if isinstance(encoder, TwoTowers) else encoder


def evaluate_knn(cfg: Config, encoder: Encoder) -> dict[str, float]:
    """Weighted kNN (``eval.knn_k``, ``eval.knn_t``) of the test split against the train split:
    the monitor training runs (``evaluation.knn_monitor``), at the run's ``train.precision``."""
    device = resolve_device(cfg.train.device)
    encoder = image_encoder(encoder)
    source = labelled_source(cfg, "kNN needs a labelled test split to classify")
    splits = source.splits
    loader = lambda split: source.plain_loader(split, cfg.eval.batch_size)  # noqa: E731
    model = (encoder.backbone if cfg.eval.knn_features == "backbone" else encoder).to(device)
    result = knn_monitor(model, loader(splits.train), loader(splits.test), len(splits.train), len(splits.test),
                         len(splits.train.classes), cfg.eval.knn_k, cfg.eval.knn_t, device,
                         autocast_dtype(cfg.train.precision, device))
    return {**result, "knn_k": cfg.eval.knn_k, "knn_t": cfg.eval.knn_t, "features": cfg.eval.knn_features}


def evaluate_linear(cfg: Config, encoder: Encoder) -> dict[str, Any]:
    """The linear probe of ``linear.*`` on the backbone (its output before the head)."""
    device = resolve_device(cfg.train.device)
    encoder = image_encoder(encoder)
    dtype = autocast_dtype(cfg.train.precision, device)
    source = labelled_source(cfg, "the linear probe needs a labelled test split")
    splits = source.splits
    num_classes = len(splits.train.classes)
    backbone: nn.Module = encoder.backbone.to(device)
    lin = cfg.linear
    test_loader = source.plain_loader(splits.test, lin.batch_size)
    if lin.cached:
        train = extract_features(backbone, source.plain_loader(splits.train, lin.batch_size), device,
                                 normalize=False, dtype=dtype)
        test = extract_features(backbone, test_loader, device, normalize=False, dtype=dtype)
        result = linear_probe_cached(train, test, num_classes, lin, seed=cfg.train.seed)
    else:
        result = linear_probe(backbone, source.probe_loader(lin.batch_size), test_loader, encoder.width,
                              num_classes, lin, device, seed=cfg.train.seed, dtype=dtype)
    return {**result, "variant": "cached" if lin.cached else "augmented", "epochs": lin.epochs, "lr": lin.lr,
            "lr_scaling": lin.lr_scaling, "schedule": lin.schedule, "batch_size": lin.batch_size}
