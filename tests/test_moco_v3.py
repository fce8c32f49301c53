"""MoCo v3's step on a tiny encoder against the same step computed by hand (moco-v3's
moco/builder.py): the predictor, each view's own pass, the 2T-scaled symmetric loss over the
batch's momentum keys (and a queue beside them), SGD, the EMA of f_q without the predictor;
the momentum index; ``momentum_batch`` for MoCo v1/v2."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from torch import nn

from moco_engine import Trainer, load_config
from moco_engine.config.schema import LossConfig
from moco_engine.method.encoders import Encoder, MomentumEncoder, OnlineNetwork
from moco_engine.method.heads import v3_mlp
from moco_engine.method.moco_v3 import moco_v3_step
from moco_engine.method.negatives import MomentumBatch, Queue
from moco_engine.method.objectives import build_objective
from moco_engine.method.schedules import momentum_at
from moco_engine.method.step import StepParts, key_function

B, D, K, T, LR, M = 4, 5, 6, 0.2, 0.5, 0.75


def tiny_parts(kind: str) -> StepParts:
    torch.manual_seed(0)
    encoder_q = Encoder(nn.Sequential(nn.Flatten(), nn.Linear(12, 6)), v3_mlp(2, 6, 8, D))
    predictor = v3_mlp(2, D, 8, D, last_bn=False)  # ResNet's predictor: no last BN
    online = OnlineNetwork(encoder_q, predictor)
    encoder_k = MomentumEncoder(encoder_q)
    with torch.no_grad():  # f_k apart from f_q, so the EMA's two sides differ
        for p in encoder_k.parameters():
            p.mul_(0.5)
    negatives = Queue(K, D) if kind == "queue" else MomentumBatch()
    return StepParts(
        model_q=online, encoder_q=encoder_q, encoder_k=encoder_k, predictor=predictor,
        keys=key_function(online, encoder_k, shuffle=False), negatives=negatives,
        objective=build_objective(LossConfig(), negatives), optimizer=torch.optim.SGD(online.parameters(), lr=0.0),
        scaler=torch.amp.GradScaler("cpu", enabled=False), device=torch.device("cpu"), amp_dtype=None,
        temperature=T, symmetric=True, check_finite=False, ema_ahead=1,
    )


@pytest.mark.parametrize("kind", ["momentum_batch", "queue"])
def test_one_moco_v3_step_equals_the_step_computed_by_hand(kind):
    parts = tiny_parts(kind)
    g = torch.Generator().manual_seed(1)
    x_1, x_2 = torch.randn(B, 3, 2, 2, generator=g), torch.randn(B, 3, 2, 2, generator=g)
    idx = torch.tensor([3, 0, 7, 9])
    online = copy.deepcopy(parts.model_q)
    f_k = copy.deepcopy(parts.encoder_k.encoder)
    queue = parts.negatives.keys.clone() if kind == "queue" else None

    def query(x):  # each view its own pass: the BatchNorms see that view's batch alone
        return F.normalize(online.predictor(online.encoder.head(online.encoder.backbone(x))), dim=1)

    with torch.no_grad():
        k_1, k_2 = (F.normalize(f_k.head(f_k.backbone(x)), dim=1) for x in (x_1, x_2))
    loss = 0.0
    for q, k in ((query(x_1), k_2), (query(x_2), k_1)):
        logits = q @ (k if queue is None else torch.cat([k, queue])).t() / T
        loss = loss + F.cross_entropy(logits, torch.arange(B)) * 2 * T  # key i is query i's positive
    grads = torch.autograd.grad(loss, list(online.parameters()))
    new_online = [p.detach() - LR * g for p, g in zip(online.parameters(), grads)]
    new_q = new_online[: len(list(online.encoder.parameters()))]  # the encoder's come first; the predictor's last
    new_k = [M * pk + (1 - M) * pq for pk, pq in zip(f_k.parameters(), new_q)]

    metrics = moco_v3_step(parts, x_1, x_2, idx, lr=LR, momentum=M)
    torch.testing.assert_close(metrics["loss"], loss.detach())
    for p, want in zip(parts.model_q.parameters(), new_online):
        torch.testing.assert_close(p.detach(), want)
    assert len(list(parts.encoder_k.parameters())) == len(new_k)  # the predictor has no momentum copy
    for p, want in zip(parts.encoder_k.parameters(), new_k):
        torch.testing.assert_close(p, want)
    if kind == "queue":  # both views' keys enqueued, after the step that used the queue as it was
        expected = queue.clone()
        for i, key in enumerate(torch.cat([k_1, k_2])):
            expected[i % K] = key
        torch.testing.assert_close(parts.negatives.keys, expected)


def v3_trainer(tmp_path, *extra):
    return Trainer(load_config([], [*TINY, "method=moco_v3", "negatives.kind=momentum_batch", "model.head=mlp_bn",
                                    "model.hidden_dim=32", "loss.temperature=0.2", "model.bn=plain",
                                    f"train.out_dir={tmp_path}", *extra]))


def test_the_ema_after_step_t_uses_the_momentum_of_step_t_plus_1(tmp_path):
    trainer = v3_trainer(tmp_path, "model.momentum=0.9", "model.momentum_schedule=cosine", "train.epochs=1")
    trainer.loaders.sampler.set_epoch(0)
    (x_1, x_2), _, idx = next(iter(trainer.loaders.train))
    before = [p.detach().clone() for p in trainer.encoder_k.parameters()]
    trainer.train_step(x_1, x_2, idx)
    q, k = trainer.encoder_q.parameters(), trainer.encoder_k.parameters()
    m_1 = momentum_at(0.9, "cosine", 1, trainer.total_steps)  # MoCo v3: m_{t+1} before the keys of t + 1
    assert m_1 != momentum_at(0.9, "cosine", 0, trainer.total_steps)
    for k0, pq, pk in zip(before, q, k):
        torch.testing.assert_close(pk, m_1 * k0 + (1 - m_1) * pq.detach())


def assert_same_state(a, b):
    for section in ("encoder_q", "encoder_k", "predictor", "negatives", "optimizer"):
        flat_a, flat_b = torch.utils._pytree.tree_leaves(a[section]), torch.utils._pytree.tree_leaves(b[section])
        assert len(flat_a) == len(flat_b), section
        for x, y in zip(flat_a, flat_b):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, section


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny"])
def test_a_moco_v3_run_resumed_is_bit_identical_to_a_straight_one(tmp_path, arch, capsys):
    vit = ["model.patch_size=8", "model.head=mlp3_bn", "model.predictor_last_bn=true", "model.freeze_patch_embed=true",
           "optim.name=adamw", "optim.lr=1e-3"] if arch == "vit_tiny" else []
    extra = [f"model.arch={arch}", *vit, "optim.batch_size=8", "model.momentum_schedule=cosine"]
    straight = v3_trainer(tmp_path / "a", *extra, "loss.name=triplet")  # its own loss: loss.name ignored, named
    straight.fit()
    assert "method=moco_v3 ignores loss.name=triplet" in capsys.readouterr().err
    stopped = v3_trainer(tmp_path / "b", *extra, "loss.name=triplet")  # the same run, stopped after its first epoch
    stopped.prepare_run_dir()
    stopped.train_epoch()
    stopped.save()
    del stopped
    resumed = v3_trainer(tmp_path / "b", *extra, "loss.name=triplet", "train.resume=auto")
    resumed.fit()
    assert resumed.step == straight.step == 6 and resumed.predictor is not None
    assert_same_state(straight.state_dict(), resumed.state_dict())


def test_moco_without_a_queue_trains_on_the_batchs_momentum_keys(tmp_path):
    moco = Trainer(load_config([], [*TINY, "negatives.kind=momentum_batch", f"train.out_dir={tmp_path / 'm'}"]))
    assert moco.fit()["steps"] == 6 and moco.negatives.memory_bytes() == 0


@pytest.mark.slow  # three launches of 2 processes
@pytest.mark.distributed
def test_moco_v3_under_torchrun_stopped_and_resumed_is_bit_identical(tmp_path):
    from test_distributed import EXACT, assert_same_ranks, stopped_and_resumed, torchrun

    v3 = ["method=moco_v3", "negatives.kind=momentum_batch", "model.head=mlp_bn", "model.hidden_dim=32",
          "loss.temperature=0.2", "model.momentum_schedule=cosine"]
    straight, _ = torchrun(tmp_path / "straight", *EXACT, *v3)
    assert straight[0]["world"] == 2 and straight[0]["step"] == 6
    assert_same_ranks(straight, stopped_and_resumed(tmp_path / "stopped", *v3))


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("vit_tiny", marks=pytest.mark.slow)])
def test_two_processes_step_as_one_process_with_twice_the_batch(tmp_path, arch):
    """Under torchrun (2 ranks, gloo) each rank's queries meet the keys of both ranks, labelled
    B·rank + i; the mean of the ranks' losses and the parameters after the step equal one
    process's on both ranks' items (2B) to float32 rounding (tests/v3_batch_worker.py: split-BN
    over 2 slices gives the one process the ranks' BatchNorm statistics, so nothing else differs)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from v3_batch_worker import one_step

    overrides = [*TINY, "method=moco_v3", f"model.arch={arch}", "model.patch_size=8", "model.head=mlp_bn",
                 "model.bn=plain", "model.bn_splits=1", "negatives.kind=momentum_batch", "optim.name=lars",
                 "optim.warmup_epochs=0", "optim.lr=0.5", "train.device=cpu", f"train.out_dir={tmp_path}/run"]
    worker = Path(__file__).with_name("v3_batch_worker.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(worker), str(tmp_path), *overrides, "train.overwrite=true"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    single = one_step([*overrides, f"train.out_dir={tmp_path}/single", "model.bn_splits=2"], [0, 1])
    assert ranks[0]["before"].keys() == single["before"].keys()
    assert all(torch.equal(ranks[0]["before"][k], v) for k, v in single["before"].items())  # the same start
    mean = (ranks[0]["loss"] + ranks[1]["loss"]) / 2  # each rank's loss: the mean over its own queries
    assert torch.allclose(mean, single["loss"], rtol=1e-5, atol=1e-6), (mean, single["loss"])
    assert not torch.allclose(ranks[0]["loss"], ranks[1]["loss"])  # the ranks had different items
    moved = [k for k, v in single["after"].items() if not torch.equal(v, single["before"][k])]
    assert len(moved) > 10
    # Every parameter's update, to float32 rounding through the backward of a deep network (1e-7 for
    # the few whose gradient is zero in exact arithmetic: a LayerNorm bias before the head's first BN).
    for rank in ranks:
        for k in moved:
            update, theirs = single["after"][k] - single["before"][k], rank["after"][k] - rank["before"][k]
            assert (update - theirs).abs().max() <= 1e-3 * update.abs().max() + 1e-7, k


def test_moco_v3_refuses_end_to_end_negatives():
    with pytest.raises(Exception, match=r"'negatives.kind' = 'in_batch': method=moco_v3 takes its keys"):
        load_config([], ["method=moco_v3", "negatives.kind=in_batch"])
