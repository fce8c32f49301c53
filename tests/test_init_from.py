"""model.init_from: a fresh run's backbone starts from a weights file in the layouts pretrained
weights come in (torchvision, MoCo v1/v2's and v3's checkpoints, this engine's); bad files are
one line and exit 2; a resumed run never reads the file again."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import TINY

from moco_engine import Trainer, load_config
from moco_engine.tools.cli import train_main


def fresh(tmp_path, *extra) -> Trainer:
    trainer = Trainer(load_config([], [*TINY, f"train.out_dir={tmp_path / 'run'}", *extra]))
    trainer.prepare_run_dir()
    return trainer


def assert_starts_from(trainer: Trainer, weights: dict[str, torch.Tensor]) -> None:
    for encoder in (trainer.encoder_q, trainer.encoder_k.encoder):  # f_k starts as f_q's copy
        own = encoder.backbone.state_dict()
        assert all(torch.equal(own[k], v) for k, v in weights.items() if k in own and "num_batches" not in k)


def test_a_torchvision_state_dict_is_loaded_and_its_classifier_left_out(tmp_path, capsys):
    torch.manual_seed(5)
    weights = torchvision.models.resnet18().state_dict()
    torch.save(weights, tmp_path / "r18.pth")
    trainer = fresh(tmp_path, f"model.init_from={tmp_path / 'r18.pth'}")
    assert_starts_from(trainer, weights)
    err = capsys.readouterr().err
    assert "model.init_from: the backbone starts from" in err and "left out: fc.weight, fc.bias" in err


@pytest.mark.parametrize("prefix", ["module.encoder_q.", "module.base_encoder."])
def test_moco_and_moco_v3_checkpoints_give_their_query_backbone(tmp_path, prefix):
    torch.manual_seed(6)
    weights = torchvision.models.resnet18().state_dict()
    other = torchvision.models.resnet18().state_dict()  # the key encoder: must not be taken
    key = "module.encoder_k." if "encoder_q" in prefix else "module.momentum_encoder."
    state = {**{prefix + k: v for k, v in weights.items() if not k.startswith("fc.")},
             **{f"{prefix}fc.0.weight": torch.zeros(3, 512)}, **{key + k: v for k, v in other.items()},
             "module.queue": torch.zeros(16, 4)}
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": state}, tmp_path / "moco.pth.tar")
    assert_starts_from(fresh(tmp_path, f"model.init_from={tmp_path / 'moco.pth.tar'}"), weights)


def test_a_checkpoint_of_this_engine_starts_another_run_and_a_resume_never_reads_the_file(tmp_path):
    first = tmp_path / "first"
    train_main([*TINY, f"train.out_dir={first}", "train.epochs=1", "train.steps_per_epoch=2", "eval.at_start=false"])
    (checkpoint,) = (first / "checkpoints").glob("checkpoint_*.pt")
    copy = tmp_path / "init.pt"
    copy.write_bytes(checkpoint.read_bytes())
    weights = {k.removeprefix("backbone."): v for k, v in torch.load(copy, weights_only=True)["encoder_q"].items()
               if k.startswith("backbone.")}
    second = [*TINY, f"train.out_dir={tmp_path / 'second'}", f"model.init_from={copy}", "eval.at_start=false",
              "train.steps_per_epoch=2"]
    trainer = Trainer(load_config([], [*second, "train.epochs=1"]))
    trainer.prepare_run_dir()
    assert_starts_from(trainer, weights)
    assert train_main([*second, "train.epochs=1"]) == 0
    copy.unlink()  # gone: a resume holds its own weights and does not look for it
    assert train_main([*second, "train.epochs=2", "train.resume=auto"]) == 0


@pytest.mark.fault("input")
@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_bytes(b"not a torch file"), "cannot read it"),
    (lambda p: torch.save({"conv1.weight": torch.zeros(1)}, p), "has shape [1] there and [64, 3, 7, 7]"),
    (lambda p: torch.save({"stem.weight": torch.zeros(1)}, p), "the backbone's conv1.weight is not in it"),
    (lambda p: torch.save({**torchvision.models.resnet18().state_dict(), "layer9.w": torch.zeros(1)}, p),
     "layer9.w is not a tensor of the backbone"),
])
def test_a_bad_weights_file_is_one_line_and_exit_2(tmp_path, capsys, make, message):
    path = tmp_path / "w.pth"
    make(path)
    assert train_main([*TINY, f"train.out_dir={tmp_path / 'run'}", f"model.init_from={path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config key 'model.init_from'") and message in err and "\n" not in err, err
