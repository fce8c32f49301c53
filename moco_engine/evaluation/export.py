"""Exporting a trained backbone, in the layout each consumer loads:

- ``torchvision``: its state dict as torchvision's ResNets name it (any backbone's own otherwise);
- ``detectron2``: detectron2's pickle of a ResNet (MoCo's conversion rules);
- ``timm``: the state dict of the timm model of the same shape (our ViTs carry timm's names,
  torchvision's ResNets share them with timm's, a ``timm:`` backbone is a timm model);
- ``moco_v3``: moco-v3's own checkpoint (``main_moco.py``'s ``save_checkpoint``: ``state_dict``
  of its DDP-wrapped builder, ``module.base_encoder.*``, ``module.momentum_encoder.*``,
  ``module.predictor.*``), for the shapes its ``main_lincls.py`` builds.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
import torchvision

from moco_engine.config.schema import UserError
from moco_engine.method.encoders import Encoder
from moco_engine.method.vit import VisionTransformer

SUFFIXES = {"torchvision": "_torchvision.pth", "detectron2": "_detectron2.pkl", "timm": "_timm.pth",
            "moco_v3": "_moco_v3.pth.tar"}
# The backbones moco-v3's main_lincls.py builds (vits.py's vit_small and vit_base are ViT-S/16 and
# ViT-B/16 at 224 px; torchvision's resnet50), and the name of the layer it replaces by its fc.
MOCO_V3_ARCHS = {"vit_small": "head", "vit_base": "head", "resnet50": "fc"}


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


def timm_state_dict(encoder: Encoder) -> dict[str, torch.Tensor]:
    """The query backbone as the timm model of its shape names it: our ViT loads strictly into
    ``timm.models.vision_transformer.VisionTransformer(img_size, patch_size, embed_dim, depth,
    num_heads, num_classes=0)``, a torchvision ResNet into ``timm.create_model("resnetXX",
    num_classes=0)`` (a CIFAR stem: after replacing ``conv1`` and ``maxpool`` as it was trained), a
    ``timm:`` backbone into the model it names.

    Raises:
        UserError: a backbone of none of these kinds (its names are its own).
    """
    backbone = encoder.backbone
    if not (isinstance(backbone, (VisionTransformer, torchvision.models.ResNet))
            or type(backbone).__module__.startswith("timm.")):
        raise UserError(f"--format timm writes our ViTs, torchvision ResNets and timm: models, and this backbone is a "
                        f"{type(backbone).__name__}; --format torchvision writes its state dict as it is")
    return torchvision_state_dict(encoder)


def moco_v3_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of ours (``run/snapshot.py``'s sections) in moco-v3's layout: its
    ``main_lincls.py --pretrained`` loads the base encoder from it, and its ``main_moco.py
    --resume`` the three networks (not our optimizer: the file's ``optimizer`` is absent).

    f_q's backbone and projector become ``module.base_encoder.*`` (the projector under ``head``
    for a ViT, ``fc`` for a ResNet, its layers numbered as moco-v3's ``_build_mlp`` numbers them,
    which ``heads.v3_mlp`` follows), f_k's ``module.momentum_encoder.*``, the predictor's
    ``module.predictor.*``.

    Raises:
        UserError: a run of another method, or a backbone main_lincls.py does not build.
    """
    model = state["config"]["model"]
    arch, patch, size = model["arch"], model.get("patch_size"), tuple(state.get("input_shape") or ())
    if state["config"].get("method") != "moco_v3":
        raise UserError(f"--format moco_v3 writes MoCo v3 runs (method=moco_v3), and this run's method is "
                        f"{state['config'].get('method')!r}")
    shape_ok = (arch == "resnet50" and not model["cifar_stem"]) or (
        arch in ("vit_small", "vit_base") and patch == 16 and size == (3, 224, 224))
    if not shape_ok:
        raise UserError(f"--format moco_v3 writes the backbones moco-v3's main_lincls.py builds (vit_small and "
                        f"vit_base with patch 16 at 224 px, resnet50 with its ImageNet stem), and this run's is "
                        f"model.arch={arch} (patch {patch}, input {list(size)}); --format timm or "
                        "torchvision writes any")
    head = MOCO_V3_ARCHS[arch]

    def renamed(section: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in section.items():
            part, rest = name.split(".", 1)  # "backbone" or "head", then the module's own name
            out[f"{prefix}{rest}" if part == "backbone" else f"{prefix}{head}.{rest}"] = t.detach().clone().cpu()
        return out

    state_dict = {**renamed(state["encoder_q"], "module.base_encoder."),
                  **renamed({k.split(".", 1)[1]: v for k, v in state["encoder_k"].items()}, "module.momentum_encoder."),
                  **{f"module.predictor.{k}": v.detach().clone().cpu() for k, v in state["predictor"].items()}}
    return {"epoch": state["epoch"], "arch": arch, "state_dict": state_dict}


def export(encoder: Encoder, out_stem: Path, formats: list[str], state: dict[str, Any] | None = None) -> list[Path]:
    """Write the backbone in each of ``formats`` (the keys of :data:`SUFFIXES`, its file names)
    next to ``out_stem``; refuses to overwrite an existing file. ``moco_v3`` needs the run's
    checkpoint ``state`` (it writes f_k and the predictor too)."""
    targets = {fmt: out_stem.with_name(out_stem.name + suffix) for fmt, suffix in SUFFIXES.items()}
    chosen = [targets[f] for f in formats]
    if "detectron2" in formats and not isinstance(encoder.backbone, torchvision.models.ResNet):
        raise UserError(f"--format detectron2 renames a ResNet's keys, and this backbone is a "
                        f"{type(encoder.backbone).__name__}; --format torchvision writes its state dict as it is")
    # Every refusal comes before the first file is written.
    contents = {}
    if "timm" in formats:
        contents["timm"] = timm_state_dict(encoder)
    if "moco_v3" in formats:
        if state is None:
            raise UserError("--format moco_v3 needs the run's checkpoint (f_k and the predictor), not only its encoder")
        contents["moco_v3"] = moco_v3_checkpoint(state)
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
        elif fmt in contents:
            torch.save(contents[fmt], target)
        else:
            with open(target, "wb") as f:
                pickle.dump(detectron2_checkpoint(encoder), f)
        written.append(target)
    return written
