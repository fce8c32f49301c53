"""Exporting a trained backbone: its state dict as torchvision's ResNets name it (any backbone's
own state dict otherwise), and detectron2's pickle of a ResNet (MoCo's conversion rules)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
import torchvision

from moco_engine.config.schema import UserError
from moco_engine.method.encoders import Encoder


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
    if "detectron2" in formats and not isinstance(encoder.backbone, torchvision.models.ResNet):
        raise UserError(f"--format detectron2 renames a ResNet's keys, and this backbone is a "
                        f"{type(encoder.backbone).__name__}; --format torchvision writes its state dict as it is")
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
