"""Training with each objective of the registry, and BYOL on the momentum machinery."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY
from torchvision import transforms as T

from moco_engine.config.loading import load_config
from moco_engine.method.objectives import LOSSES, build_objective
from moco_engine.run.trainer import Trainer


@pytest.mark.parametrize("kind,names", [
    ("queue", sorted(set(LOSSES) - {"nce"})),  # every objective (nce is the memory bank's, tested with it)
    ("memory_bank", ["triplet", "debiased", "mochi"]),
    ("in_batch", ["nt_xent", "lifted", "npair"]),
])
def test_objectives_train_a_step_over_each_negative_source(tmp_path, kind, names):
    trainer = Trainer(load_config([], [*TINY, f"train.out_dir={tmp_path / kind}", f"negatives.kind={kind}", "train.epochs=10",
                                       "loss.mochi_hardest=16", "loss.mochi_mix=8", "loss.mochi_mix_query=4"]))
    trainer.loaders.sampler.set_epoch(0)
    (x_q, x_k), _, idx = next(iter(trainer.loaders.train))
    last = [m for m in trainer.encoder_q.head.modules() if isinstance(m, torch.nn.Linear)][-1]
    for name in names:
        trainer.cfg.loss.name = name
        trainer.parts.objective = build_objective(trainer.cfg.loss, trainer.negatives)  # bound once per run
        before = last.weight.detach().clone()
        metrics = trainer.train_step(x_q, x_k, idx)
        assert torch.isfinite(metrics["loss"]), (kind, name)
        assert not torch.equal(last.weight, before), (kind, name)  # the objective's gradient reached f_q


@pytest.mark.slow  # a few minutes on 2 cores: four forward passes a step
def test_a_short_byol_run_lowers_its_loss_without_collapse(tmp_path):
    cfg = load_config([], [*TINY, f"train.out_dir={tmp_path / 'run'}", "method=byol", "data.synthetic_size=320",
                           "optim.batch_size=32", "train.steps_per_epoch=0", "train.epochs=3", "train.log_every=1",
                           "model.momentum=0.99", "model.momentum_schedule=cosine", "loss.byol_hidden_dim=64",
                           "model.head=mlp_bn", "optim.lr=0.05", "eval.knn_every=0"])
    mild = T.Compose([T.ToTensor(), T.Lambda(lambda x: x - 0.5 + 0.05 * torch.randn_like(x))])
    trainer = Trainer(cfg, view=mild)
    assert trainer.predictor is not None and type(trainer.negatives).__name__ == "NoNegatives"
    trainer.fit()
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "step"]
    losses = [r["loss"] for r in steps]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, [round(x, 3) for x in losses]
    # No collapse: the projections keep their spread (1/sqrt(D) = 0.25 for points spread on the sphere).
    assert min(r["embed_std"] for r in steps[-5:]) > 0.05
    assert steps[-1]["momentum"] > steps[0]["momentum"]  # BYOL's cosine schedule towards 1


def test_byol_checkpoints_its_predictor_and_resumes(tmp_path):
    args = [*TINY, f"train.out_dir={tmp_path / 'run'}", "method=byol", "loss.byol_hidden_dim=32", "train.epochs=1"]
    first = Trainer(load_config([], args))
    first.fit()
    second = Trainer(load_config([], [*args[:-1], "train.epochs=2", "train.resume=auto"]))
    second.prepare_run_dir()
    for a, b in zip(first.predictor.state_dict().values(), second.predictor.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(Exception, match="method"):  # a MoCo config cannot resume a BYOL run
        Trainer(load_config([], [*TINY, f"train.out_dir={tmp_path / 'run'}", "train.resume=auto"])).prepare_run_dir()
