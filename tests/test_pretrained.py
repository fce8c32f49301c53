"""After pretraining: moco-eval and moco-export on a tiny trained run."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import TINY
from torch import nn

from moco_engine.config.loading import load_config
from moco_engine.config.schema import ModelConfig
from moco_engine.evaluation.export import (
    detectron2_checkpoint,
    detectron2_name,
    torchvision_state_dict,
)
from moco_engine.method.encoders import build_encoder
from moco_engine.run.pretrained import open_checkpoint
from moco_engine.run.trainer import train
from moco_engine.tools.cli import eval_main, export_main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained") / "run"
    train(load_config([], [*TINY, f"train.out_dir={out}", "train.epochs=1"]))
    return out


def test_moco_eval_knn_and_linear_write_json_beside_the_checkpoint(run, capsys):
    assert eval_main(["knn", str(run), "eval.knn_k=5"]) == 0
    assert eval_main(["linear", str(run), "linear.cached=true", "linear.epochs=2"]) == 0
    assert eval_main(["linear", str(run), "linear.epochs=1", "linear.batch_size=32"]) == 0
    folder = run / "checkpoints"
    knn = json.loads(next(folder.glob("*.knn.json")).read_text())
    assert knn["mode"] == "knn" and knn["knn_k"] == 5 and 0 <= knn["knn_top1"] <= 100
    cached = json.loads(next(folder.glob("*.linear.json")).read_text())
    augmented = json.loads(next(folder.glob("*.linear-1.json")).read_text())  # the first is kept
    assert cached["variant"] == "cached" and augmented["variant"] == "augmented"
    assert 0 <= augmented["top1"] <= augmented["top5"] <= 100
    assert "knn: top-1" in capsys.readouterr().out


def test_moco_eval_takes_a_probe_protocol_file_under_its_overrides(run, capsys):
    protocol = str(Path(__file__).parents[1] / "configs" / "linear" / "moco_v3_resnet.yaml")
    assert eval_main(["linear", str(run), protocol, "linear.cached=true", "linear.epochs=2"]) == 0
    out = capsys.readouterr().out.split("(")[-1].rstrip(")\n")
    result = json.loads(Path(out).read_text())
    assert (result["schedule"], result["lr_scaling"], result["batch_size"], result["epochs"]) == ("cosine", "linear",
                                                                                                  1024, 2)


def test_moco_eval_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys):
    assert eval_main(["knn", str(tmp_path / "missing.pt")]) == 2
    assert eval_main(["knn", str(run), "model.dim=7"]) == 2  # the weights no longer fit
    assert eval_main(["knn", str(run), "eval.knn_kk=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "missing.pt" in err[0] and "does not fit" in err[1] and "eval.knn_k" in err[2]


@pytest.mark.parametrize("cifar_stem", [False, True])
def test_exported_backbone_loads_into_torchvision_resnet(cifar_stem):
    encoder = build_encoder(ModelConfig(arch="resnet18", cifar_stem=cifar_stem, head="mlp", dim=16, bn_splits=2), (3, 32, 32))
    net = torchvision.models.resnet18()
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    missing, unexpected = net.load_state_dict(torchvision_state_dict(encoder), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    net.fc = nn.Identity()
    encoder.eval()
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(net(x), encoder.backbone(x), atol=1e-5)  # the same function


def test_detectron2_names_follow_the_conversion_rules():
    assert detectron2_name("conv1.weight") == "stem.conv1.weight"
    assert detectron2_name("bn1.running_mean") == "stem.conv1.norm.running_mean"
    assert detectron2_name("layer1.0.conv2.weight") == "res2.0.conv2.weight"
    assert detectron2_name("layer3.1.bn3.bias") == "res4.1.conv3.norm.bias"
    assert detectron2_name("layer2.0.downsample.0.weight") == "res3.0.shortcut.weight"
    assert detectron2_name("layer4.0.downsample.1.weight") == "res5.0.shortcut.norm.weight"
    encoder = build_encoder(ModelConfig(arch="resnet50", head="linear", dim=8), (3, 32, 32))
    model = detectron2_checkpoint(encoder)["model"]
    assert len(model) == len([k for k in encoder.backbone.state_dict() if "num_batches" not in k])
    assert not any(k.startswith("layer") or "fc" in k for k in model)


def test_moco_export_writes_both_formats_and_never_overwrites(run, tmp_path, capsys):
    stem = tmp_path / "exported" / "r18"
    assert export_main([str(run), "--out", str(stem)]) == 0
    pth, pkl = stem.with_name("r18_torchvision.pth"), stem.with_name("r18_detectron2.pkl")
    before = pth.read_bytes()
    assert "conv1.weight" in torch.load(pth, weights_only=True)
    with open(pkl, "rb") as f:
        assert "stem.conv1.weight" in pickle.load(f)["model"]
    assert export_main([str(run), "--out", str(stem), "--format", "torchvision"]) == 2
    assert pth.read_bytes() == before
    assert "exists" in capsys.readouterr().err


def test_moco_export_timm_loads_strictly_into_timm_resnet_with_equal_features(run, tmp_path):
    timm = pytest.importorskip("timm")
    assert export_main([str(run), "--format", "timm", "--out", str(tmp_path / "net")]) == 0
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    model.load_state_dict(torch.load(tmp_path / "net_timm.pth", weights_only=True), strict=True)
    _, encoder, _ = open_checkpoint(run)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model.eval()(x) - encoder.backbone.eval()(x)).abs().max().item() == 0.0


def test_moco_export_moco_v3_of_another_method_is_one_line(run, capsys):
    assert export_main([str(run), "--format", "moco_v3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "method=moco_v3" in err and "'moco'" in err and "\n" not in err
    assert not list((run / "checkpoints").glob("*moco_v3*"))


@pytest.mark.fault("tools")
def test_moco_export_to_a_path_under_a_file_is_one_line(run, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert export_main([str(run), "--out", str(blocker / "r18")]) == 2
    err = capsys.readouterr().err.strip()
    assert "a_file" in err and "cannot make the folder" in err and "\n" not in err and blocker.read_text() == ""


@pytest.mark.fault("tools")
def test_moco_eval_refuses_pickled_objects_in_one_short_line(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"config": {}, "encoder_q": {}, "extra": nn.ReLU()}, path)  # a module: pickled code, not tensors
    assert eval_main(["knn", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds pickled Python objects" in err and "refused without running them" in err and "\n" not in err
