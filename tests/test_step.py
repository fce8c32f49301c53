"""The step functions on a tiny encoder, against the same step computed by hand: the logits, the
loss, SGD, the EMA'd key encoder and the negatives after the update, for the asymmetric and the
symmetric loss and for each kind of negatives."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from torch import nn

from moco_engine.config.loading import load_config
from moco_engine.config.schema import LossConfig
from moco_engine.method.encoders import Encoder, MomentumEncoder
from moco_engine.method.memory_bank import MemoryBank
from moco_engine.method.moco import moco_step
from moco_engine.method.negatives import InBatch, Queue
from moco_engine.method.objectives import Objective, build_objective
from moco_engine.method.step import Skipped, StepParts, key_function

B, D, K, N, T, LR, M = 4, 5, 7, 10, 0.2, 0.5, 0.75


def tiny_parts(kind: str, symmetric: bool, loss: str = "infonce", check_finite: bool = False) -> StepParts:
    torch.manual_seed(0)
    encoder_q = Encoder(nn.Sequential(nn.Flatten(), nn.Linear(12, 6)), nn.Linear(6, D))
    negatives = {"queue": lambda: Queue(K, D),
                 "memory_bank": lambda: MemoryBank(N, D, K, positive="bank", update="momentum", momentum=0.5),
                 "in_batch": InBatch}[kind]()
    encoder_k = None if negatives.end_to_end else MomentumEncoder(encoder_q)
    with torch.no_grad():  # f_k apart from f_q, so the EMA's two sides differ
        for p in encoder_k.parameters() if encoder_k is not None else []:
            p.mul_(0.5)
    return StepParts(
        model_q=encoder_q, encoder_q=encoder_q, encoder_k=encoder_k, predictor=None,
        keys=key_function(encoder_q, encoder_k, shuffle=False), negatives=negatives,
        objective=build_objective(LossConfig(name=loss, temperature=T), negatives),
        optimizer=torch.optim.SGD(encoder_q.parameters(), lr=0.0), scaler=torch.amp.GradScaler("cpu", enabled=False),
        device=torch.device("cpu"), amp_dtype=None, temperature=T, symmetric=symmetric, check_finite=check_finite,
    )


def by_hand(parts: StepParts, x_q, x_k, idx, kind: str, symmetric: bool, seed: int):
    """The step written out: returns (loss, positive logits, f_q's and f_k's new parameters, the
    source's expected buffer after the update)."""
    f_q = copy.deepcopy(parts.encoder_q)
    f_k = None if parts.encoder_k is None else copy.deepcopy(parts.encoder_k.encoder)
    source = copy.deepcopy(parts.negatives)
    torch.manual_seed(seed)  # the bank samples its K negatives from the global RNG
    directions = [(x_q, x_k), (x_k, x_q)] if symmetric else [(x_q, x_k)]
    loss, keys, first_pos = 0.0, [], None
    for a, b in directions:
        q = F.normalize(f_q.head(f_q.backbone(a)), dim=1)
        if kind == "in_batch":
            k = F.normalize(f_q.head(f_q.backbone(b)), dim=1)  # end to end, with gradients
            own = idx[None, :] == idx[:, None]
            l_pos = (q * k).sum(1, keepdim=True)
            l_neg = (q @ torch.cat([k, q]).t()).masked_fill(torch.cat([own, own], 1), float("-inf"))
        else:
            with torch.no_grad():
                k = F.normalize(f_k.head(f_k.backbone(b)), dim=1)
            if kind == "queue":
                l_pos, l_neg = (q * k).sum(1, keepdim=True), q @ source.keys.t()
            else:
                sampled = torch.randint(0, N, (K,))
                l_pos = (q * source.bank[idx]).sum(1, keepdim=True)  # Wu et al.'s positive: v_i
                l_neg = (q @ source.bank[sampled].t()).masked_fill(sampled[None, :] == idx[:, None], float("-inf"))
        logits = torch.cat([l_pos, l_neg], 1) / T
        loss = loss + F.cross_entropy(logits, torch.zeros(B, dtype=torch.long))
        keys.append(k.detach())
        first_pos = l_pos.mean() if first_pos is None else first_pos
    grads = torch.autograd.grad(loss, list(f_q.parameters()))
    new_q = [p.detach() - LR * g for p, g in zip(f_q.parameters(), grads)]  # plain SGD
    new_k = None if f_k is None else [M * pk + (1 - M) * pq for pk, pq in zip(f_k.parameters(), new_q)]
    enqueued = torch.cat(keys[::-1])  # the demo's order: the key of x_q first
    if kind == "queue":
        expected = source.keys.clone()
        for i, key in enumerate(enqueued):
            expected[i % K] = key
    elif kind == "memory_bank":
        indices = idx.repeat(len(directions))
        expected = source.bank.clone()
        for i in set(idx.tolist()):
            mean_key = enqueued[indices == i].mean(0)  # an item's keys of both directions: their mean
            expected[i] = F.normalize(0.5 * source.bank[i] + 0.5 * mean_key, dim=0)
    else:
        expected = None
    return loss.detach(), first_pos.detach(), new_q, new_k, expected


@pytest.mark.parametrize("kind", ["queue", "memory_bank", "in_batch"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_one_moco_step_equals_the_step_computed_by_hand(kind, symmetric):
    parts = tiny_parts(kind, symmetric)
    g = torch.Generator().manual_seed(1)
    x_q, x_k = torch.randn(B, 3, 2, 2, generator=g), torch.randn(B, 3, 2, 2, generator=g)
    idx = torch.tensor([3, 0, 7, 9])
    loss, l_pos, new_q, new_k, expected = by_hand(parts, x_q, x_k, idx, kind, symmetric, seed=5)

    torch.manual_seed(5)
    metrics = moco_step(parts, x_q, x_k, idx, lr=LR, momentum=M)
    torch.testing.assert_close(metrics["loss"], loss)
    torch.testing.assert_close(metrics["logit_pos"], l_pos)
    for p, want in zip(parts.encoder_q.parameters(), new_q):
        torch.testing.assert_close(p.detach(), want)
    if kind == "in_batch":
        assert parts.encoder_k is None  # end to end: no momentum copy at all
    else:
        for p, want in zip(parts.encoder_k.parameters(), new_k):
            torch.testing.assert_close(p, want)  # the EMA towards the *updated* f_q
    if kind == "queue":
        torch.testing.assert_close(parts.negatives.keys, expected)
        assert int(parts.negatives.ptr) == B * (2 if symmetric else 1) % K
        ring = [-1] * K
        for i, item in enumerate(idx.repeat(2 if symmetric else 1).tolist()):
            ring[i % K] = item  # whose key each slot holds, the oldest overwritten first
        assert parts.negatives.index.tolist() == ring
    if kind == "memory_bank":
        torch.testing.assert_close(parts.negatives.bank, expected)


def test_a_bound_hyper_parameter_reaches_its_loss():
    parts = tiny_parts("queue", False, loss="triplet")
    q, p = F.normalize(torch.randn(B, D), dim=1), F.normalize(torch.randn(B, D), dim=1)
    neg = parts.negatives.negatives()
    small = build_objective(LossConfig(name="triplet", triplet_margin=0.1), parts.negatives)(q, p, neg, None)
    large = build_objective(LossConfig(name="triplet", triplet_margin=3.0), parts.negatives)(q, p, neg, None)
    assert large > small


def test_nce_keeps_its_normaliser_only_after_the_optimizer_step_and_never_for_a_skipped_one():
    parts = tiny_parts("memory_bank", False, loss="nce", check_finite=True)
    bank = parts.negatives
    x = torch.randn(B, 3, 2, 2)
    idx = torch.arange(B)
    good = parts.objective
    parts.objective = Objective(lambda *args: good(*args) * float("nan"))
    parts.objective.commit, parts.objective.discard = good.commit, good.discard
    buffers = [b.clone() for b in parts.encoder_q.buffers()]
    assert isinstance(moco_step(parts, x, x, idx, LR, M), Skipped)
    assert torch.isnan(bank.log_z) and good.pending is None  # the skipped step's estimate is gone
    assert all(torch.equal(a, b) for a, b in zip(buffers, parts.encoder_q.buffers()))
    parts.objective = good
    moco_step(parts, x, x, idx, LR, M)
    assert torch.isfinite(bank.log_z)  # the first estimate, kept after the step


@pytest.mark.parametrize("method", [
    ["model.bn_split_form=per_slice"], ["model.bn_split_form=grouped"], ["model.bn_split_form=strided"],
    ["model.bn_split_form=one_pass"], ["negatives.kind=memory_bank", "loss.name=nce"],
    ["method=moco_v3", "negatives.kind=momentum_batch", "model.head=mlp_bn", "model.bn=plain"],
    ["method=byol", "model.head=mlp_bn"],
], ids=["per_slice", "grouped", "strided", "one_pass", "memory_bank", "moco_v3", "byol"])
def test_no_step_reads_the_device(tmp_path, method):
    """Issue 34: a step never waits for the device (no item, bool, nonzero, tolist, cpu): on a
    GPU the host then queues the next step while this one runs."""
    from moco_engine.run.trainer import Trainer
    from moco_engine.tools.opcount import count_ops, step_counters

    trainer = Trainer(load_config([], [*TINY, "train.channels_last=true", f"train.out_dir={tmp_path}", *method]))
    (x_q, x_k), _, idx = next(iter(trainer.loaders.train))
    step = lambda: trainer.train_step(x_q, x_k, idx)  # noqa: E731
    step()  # the first step makes the optimizer's state
    assert count_ops(step, step_counters(trainer.optimizer)).host_reads == {}
