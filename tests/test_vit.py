"""The Vision Transformer (moco-v3's, in timm's names) and timm backbones through the registry."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY

from moco_engine import Trainer, load_config
from moco_engine.method.vit import VisionTransformer, sincos_position_table

timm = pytest.importorskip("timm")


def test_the_sincos_table_is_moco_v3s_construction_by_hand():
    h, w, d = 2, 3, 8  # a grid that is not square: the axes' order shows
    table = sincos_position_table(h, w, d)
    assert table.shape == (1 + h * w, d) and torch.equal(table[0], torch.zeros(d))  # the class token's row
    omega = [1 / 10000 ** (i / (d // 4)) for i in range(d // 4)]
    row = 1
    for iw in range(w):  # meshgrid(arange(w), arange(h)), "ij": w is the slow axis
        for ih in range(h):
            expected = ([math.sin(iw * o) for o in omega] + [math.cos(iw * o) for o in omega]
                        + [math.sin(ih * o) for o in omega] + [math.cos(ih * o) for o in omega])
            assert torch.allclose(table[row], torch.tensor(expected), atol=1e-6), (iw, ih)
            row += 1


def test_the_initialisation_follows_moco_v3():
    torch.manual_seed(0)
    d, p = 64, 8
    net = VisionTransformer(32, p, d, depth=2, num_heads=4)
    qkv = net.blocks[0].attn.qkv.weight
    assert qkv.abs().max() <= math.sqrt(6 / (d + d)) and qkv.abs().max() > 0.9 * math.sqrt(6 / (d + d))
    fc1 = net.blocks[0].mlp.fc1.weight  # xavier: √(6 / (fan_in + fan_out))
    assert fc1.abs().max() <= math.sqrt(6 / (d + 4 * d))
    proj = net.patch_embed.proj.weight
    assert proj.abs().max() <= math.sqrt(6 / (3 * p * p + d)) and not net.pos_embed.requires_grad
    assert all(torch.count_nonzero(m.bias) == 0 for m in net.modules() if isinstance(m, torch.nn.Linear))
    assert 0 < net.cls_token.std() < 1e-5


def test_a_state_dict_loads_strictly_into_timm_and_gives_the_same_features():
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(0)
    ours = VisionTransformer(32, 8, 64, depth=2, num_heads=4).eval()
    theirs = TimmViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=0).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max().item() == 0.0


def vit_trainer(tmp_path, *extra):
    return Trainer(load_config([], [*TINY, "model.arch=vit_tiny", "model.patch_size=8", "optim.batch_size=8",
                                    f"train.out_dir={tmp_path}", *extra]))


def test_the_frozen_patch_projection_gets_no_gradient_and_never_changes(tmp_path):
    trainer = vit_trainer(tmp_path, "model.freeze_patch_embed=true")
    vit = trainer.encoder_q.backbone
    frozen = {k: v.clone() for k, v in vit.patch_embed.state_dict().items()}
    pos, cls = vit.pos_embed.clone(), vit.cls_token.clone()
    trainer.loaders.sampler.set_epoch(0)
    (x_q, x_k), _, idx = next(iter(trainer.loaders.train))
    for _ in range(2):
        assert torch.isfinite(trainer.train_step(x_q, x_k, idx)["loss"])
    assert vit.patch_embed.proj.weight.grad is None and vit.pos_embed.grad is None
    assert all(torch.equal(v, frozen[k]) for k, v in vit.patch_embed.state_dict().items())
    assert torch.equal(vit.pos_embed, pos) and not torch.equal(vit.cls_token, cls)  # the rest learns
    key_vit = trainer.encoder_k.encoder.backbone  # the EMA of unchanged parameters leaves them unchanged
    assert torch.equal(key_vit.patch_embed.proj.weight, vit.patch_embed.proj.weight)


def test_settings_the_vit_ignores_draw_a_warning_and_a_patch_that_does_not_divide_is_refused(tmp_path, capsys):
    vit_trainer(tmp_path / "a", "model.cifar_stem=true")
    assert "model.arch=vit_tiny ignores model.cifar_stem=True" in capsys.readouterr().err
    with pytest.raises(Exception, match=r"'model.patch_size' = 5: must divide the image size 32"):
        vit_trainer(tmp_path / "b", "model.patch_size=5")


@pytest.mark.parametrize("arch,kwargs", [("timm:resnet18", []),
                                         ("timm:vit_tiny_patch16_224", ["+model.timm_kwargs.img_size=32",
                                                                       "+model.timm_kwargs.patch_size=8"])])
def test_timm_models_of_two_families_train_a_step_and_export(tmp_path, arch, kwargs):
    from moco_engine.evaluation.export import export

    overrides = [k.lstrip("+") for k in kwargs]
    trainer = Trainer(load_config([], [*TINY, f"model.arch={arch}", "optim.batch_size=8", f"train.out_dir={tmp_path}",
                                       *overrides]))
    trainer.loaders.sampler.set_epoch(0)
    (x_q, x_k), _, idx = next(iter(trainer.loaders.train))
    head = [m for m in trainer.encoder_q.head.modules() if isinstance(m, torch.nn.Linear)][0]
    assert head.in_features == trainer.encoder_q.backbone.num_features  # the width read from the model
    before = head.weight.detach().clone()
    assert torch.isfinite(trainer.train_step(x_q, x_k, idx)["loss"]) and not torch.equal(head.weight, before)
    (written,) = export(trainer.encoder_q, tmp_path / "exported", ["torchvision"])
    exported = torch.load(written, weights_only=True)
    assert exported.keys() == trainer.encoder_q.backbone.state_dict().keys()


def test_an_unknown_timm_model_names_close_ones(tmp_path):
    with pytest.raises(Exception, match=r"timm has no model 'resnet17'.*timm:resnet18"):
        Trainer(load_config([], [*TINY, "model.arch=timm:resnet17", f"train.out_dir={tmp_path}"]))
