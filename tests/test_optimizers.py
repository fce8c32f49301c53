"""LARS (MoCo v3's), AdamW and the warm-up from zero, against their formulas computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY

from moco_engine import Trainer, load_config
from moco_engine.method.optimizers import LARS, build_optimizer
from moco_engine.method.schedules import lr_at


def norm(t: torch.Tensor) -> float:
    return math.sqrt(sum(float(v) ** 2 for v in t.flatten()))


def test_lars_follows_moco_v3s_formula_by_hand():
    w = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0], [0.0, 1.0]]))
    b = torch.nn.Parameter(torch.tensor([0.3, -0.7, 0.2]))
    lr, wd, eta, mu = 0.5, 0.1, 0.001, 0.9
    opt = LARS([w, b], lr=lr, weight_decay=wd, momentum=mu, trust_coefficient=eta)
    grads = [(torch.tensor([[0.2, 0.1], [-0.4, 0.3], [0.05, -0.1]]), torch.tensor([0.1, -0.2, 0.3])),
             (torch.tensor([[-0.1, 0.2], [0.3, 0.0], [0.2, 0.1]]), torch.tensor([-0.3, 0.1, 0.05]))]
    w_ref, b_ref = w.detach().clone(), b.detach().clone()
    buf_w, buf_b = torch.zeros_like(w_ref), torch.zeros_like(b_ref)
    for g_w, g_b in grads:
        w.grad, b.grad = g_w.clone(), g_b.clone()
        opt.step()
        d = g_w + wd * w_ref  # two dimensions: weight decay, then the trust ratio
        d = d * (eta * norm(w_ref) / norm(d))
        buf_w = mu * buf_w + d
        w_ref = w_ref - lr * buf_w
        buf_b = mu * buf_b + g_b  # one dimension: neither
        b_ref = b_ref - lr * buf_b
        assert torch.allclose(w, w_ref, atol=1e-7) and torch.allclose(b, b_ref, atol=1e-7)


def test_lars_with_a_zero_norm_and_with_solo_learns_clip():
    zero = torch.nn.Parameter(torch.zeros(2, 2))
    LARS([zero], lr=0.1, weight_decay=0.0).step()  # no gradient: nothing happens
    zero.grad = torch.ones(2, 2)
    LARS([zero], lr=0.1, weight_decay=0.0, momentum=0.0).step()
    assert torch.allclose(zero, torch.full((2, 2), -0.1))  # ‖p‖ = 0: ratio 1
    p = torch.nn.Parameter(torch.full((2, 2), 100.0))
    p.grad = torch.full((2, 2), 1e-3)
    LARS([p], lr=0.1, weight_decay=0.0, momentum=0.0, trust_coefficient=0.02, clip=True).step()
    # ratio 0.02·200/0.002 = 2000 is capped at lr: the step is lr·grad, as plain SGD's
    assert torch.allclose(p, torch.full((2, 2), 100.0 - 0.1 * 1e-3))


def test_build_optimizer_leaves_frozen_parameters_out():
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    net[0].requires_grad_(False)
    for name, kind in (("sgd", torch.optim.SGD), ("lars", LARS), ("adamw", torch.optim.AdamW)):
        cfg = load_config([], [f"optim.name={name}"]).optim
        opt = build_optimizer(cfg, net.parameters())
        assert isinstance(opt, kind) and len(opt.param_groups[0]["params"]) == 2


def test_the_warm_up_from_zero_is_moco_v3s_adjust_learning_rate():
    cfg = load_config([], ["optim.warmup_from_zero=true", "optim.warmup_epochs=2.5", "train.epochs=10", "optim.lr=1.0"])
    spe = 4
    for step in range(40):
        epoch = step / spe  # the official's fractional epoch
        expected = epoch / 2.5 if epoch < 2.5 else 0.5 * (1 + math.cos(math.pi * (epoch - 2.5) / (10 - 2.5)))
        assert lr_at(cfg, step, spe) == pytest.approx(expected, abs=1e-12), step
    assert lr_at(cfg, 0, spe) == 0.0


@pytest.mark.parametrize("name", ["lars", pytest.param("adamw", marks=pytest.mark.slow)])
def test_a_run_with_each_optimizer_resumes_bit_identically(tmp_path, name):
    args = [*TINY, f"optim.name={name}", "optim.lr=0.01", "optim.warmup_epochs=1", "optim.warmup_from_zero=true"]
    straight = Trainer(load_config([], [*args, f"train.out_dir={tmp_path / 'a'}"]))
    straight.fit()
    stopped = Trainer(load_config([], [*args, f"train.out_dir={tmp_path / 'b'}"]))  # the same run, stopped after its first epoch
    stopped.prepare_run_dir()
    stopped.train_epoch()
    stopped.save()
    del stopped
    resumed = Trainer(load_config([], [*args, "train.resume=auto", f"train.out_dir={tmp_path / 'b'}"]))
    resumed.fit()
    for a, b in zip(straight.encoder_q.state_dict().values(), resumed.encoder_q.state_dict().values()):
        assert torch.equal(a, b)
    state = resumed.optimizer.state_dict()["state"]
    assert state and all(("mu" if name == "lars" else "exp_avg") in s for s in state.values())
