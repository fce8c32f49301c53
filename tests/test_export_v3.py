"""moco-export's timm and moco_v3 formats: what timm and moco-v3's main_lincls.py load."""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from torch import nn

from moco_engine.config.loading import load_config, to_dict
from moco_engine.evaluation.export import export, moco_v3_checkpoint
from moco_engine.method.encoders import MomentumEncoder, build_encoder
from moco_engine.method.step import METHODS

timm = pytest.importorskip("timm")


def v3_state(arch: str, size: int, *extra: str) -> tuple[dict, torch.nn.Module]:
    """A MoCo v3 checkpoint's sections as a run saves them, for ``arch`` at ``size`` px, without
    training (the layout is what is tested; the values are f_q's random start, f_k its copy),
    and f_q."""
    cfg = load_config(["configs/experiment/moco_v3_imagenet_vit_small.yaml"],
                      ["data.name=synthetic", f"model.arch={arch}", f"data.image_size={size}", "model.bn=plain", *extra])
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model, (3, size, size))
    momentum = MomentumEncoder(encoder)
    predictor = METHODS[cfg.method].predictor(cfg)  # the run's: MoCo v3's
    return {"config": to_dict(cfg), "input_shape": (3, size, size), "epoch": 3, "encoder_q": encoder.state_dict(),
            "encoder_k": momentum.state_dict(), "predictor": predictor.state_dict()}, encoder


def as_main_lincls_loads(checkpoint: dict, linear_keyword: str) -> dict:
    """main_lincls.py's renaming: the base encoder's keys without its prefix, its fc/head dropped."""
    prefix = "module.base_encoder."
    return {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items()
            if k.startswith(prefix) and not k.startswith(prefix + linear_keyword)}


def test_a_vit_small_checkpoint_loads_into_main_lincls_model_with_only_its_head_missing():
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    state, encoder = v3_state("vit_small", 224, "model.head=mlp3_bn")
    checkpoint = moco_v3_checkpoint(state)
    assert checkpoint["arch"] == "vit_small" and checkpoint["epoch"] == 3
    keys = checkpoint["state_dict"].keys()
    # The projector numbered as moco-v3's _build_mlp(3, ...): Linear, BN, ReLU, Linear, BN, ReLU, Linear, BN(affine=False)
    head = sorted({k.split(".")[3] for k in keys if k.startswith("module.base_encoder.head.")}, key=int)
    assert head == ["0", "1", "3", "4", "6", "7"] and "module.base_encoder.head.7.weight" not in keys
    assert {k.split(".")[1] for k in keys} == {"base_encoder", "momentum_encoder", "predictor"}
    assert "module.momentum_encoder.blocks.11.attn.qkv.weight" in keys and "module.predictor.0.weight" in keys
    # vits.py's vit_small: timm's VisionTransformer, patch 16, 384 wide, 12 blocks of 12 heads, LayerNorm eps 1e-6
    model = TimmViT(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=12, num_classes=1000,
                    qkv_bias=True, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
    missing, unexpected = model.load_state_dict(as_main_lincls_loads(checkpoint, "head"), strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and unexpected == []
    model.head = nn.Identity()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (model.eval()(x) - encoder.backbone.eval()(x)).abs().max().item() == 0.0


def test_a_resnet50_checkpoint_loads_into_torchvision_resnet50_with_only_fc_missing():
    state, encoder = v3_state("resnet50", 64, "model.head=mlp_bn", "model.predictor_last_bn=false")
    state["input_shape"] = (3, 224, 224)  # the shape is not the ResNet's concern; a small one keeps the test fast
    checkpoint = moco_v3_checkpoint(state)
    keys = checkpoint["state_dict"].keys()
    assert "module.base_encoder.fc.0.weight" in keys and "module.base_encoder.fc.4.running_var" in keys
    model = torchvision.models.resnet50()
    missing, unexpected = model.load_state_dict(as_main_lincls_loads(checkpoint, "fc"), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and unexpected == []
    model.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), encoder.backbone.eval()(x), atol=1e-6)


def test_moco_v3_format_refuses_shapes_main_lincls_does_not_build(tmp_path):
    state, encoder = v3_state("vit_tiny", 32, "model.patch_size=4")
    with pytest.raises(Exception, match=r"main_lincls.py builds .* model.arch=vit_tiny \(patch 4, input \[3, 32, 32\]\)"):
        export(encoder, tmp_path / "x", ["moco_v3"], state)
    assert list(tmp_path.iterdir()) == []


def test_timm_format_of_our_vit_loads_strictly_into_timm_with_equal_features(tmp_path):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    state, encoder = v3_state("vit_tiny", 32, "model.patch_size=8")
    (written,) = export(encoder, tmp_path / "net", ["timm"])
    assert written.name == "net_timm.pth"
    model = TimmViT(img_size=32, patch_size=8, embed_dim=192, depth=12, num_heads=3, num_classes=0)  # ours: ViT-Tiny
    model.load_state_dict(torch.load(written, weights_only=True), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model.eval()(x) - encoder.backbone.eval()(x)).abs().max().item() == 0.0


def test_timm_format_refuses_a_backbone_of_no_timm_shape(tmp_path):
    from moco_engine.method.encoders import Encoder

    encoder = Encoder(nn.Sequential(nn.Flatten(), nn.Linear(12, 8)), nn.Linear(8, 4))
    with pytest.raises(Exception, match="--format timm writes our ViTs, torchvision ResNets and timm: models"):
        export(encoder, tmp_path / "net", ["timm", "torchvision"])
    assert list(tmp_path.iterdir()) == []
