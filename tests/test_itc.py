"""method=itc (image–text contrast) against hand computations: the multi-positive targets (a
caption's own image in the batch and in the queue), the distillation targets and their ramp,
the soft cross-entropy, the clamp of a learned temperature; the whole queue step against ALBEF's
ITC written here in ALBEF's own layout, and the in-batch step against open_clip's ClipLoss, on one
process and, gathered with its gradients, on two; the settings the method refuses."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from test_pairs import PAIRS_TINY, karpathy

from moco_engine.config.loading import load_config
from moco_engine.config.schema import ConfigError, UserError
from moco_engine.method.itc import itc_step
from moco_engine.method.losses import (
    distill_ramp,
    distilled_targets,
    multi_positive_targets,
    soft_cross_entropy,
)
from moco_engine.method.norms import SplitBatchNorm
from moco_engine.run.trainer import Trainer

# Two small towers: resnet18 on 16 px images, a 1-layer 32-wide BERT without dropout (so that a
# copy of the towers computes exactly what they compute), D = 16, B = 4.
ITC = ["method=itc", "data.image_size=16", "optim.batch_size=4", "text_model.params.layers=1",
       "text_model.params.hidden=32", "text_model.params.heads=2", "text_model.params.intermediate=64",
       "text_model.params.dropout=0"]
LR, MOMENTUM = 0.06, 0.9


@pytest.fixture(scope="module")
def pairs_root(tmp_path_factory):
    """A Karpathy-split folder: 20 training images, 3 captions each (test_pairs.karpathy)."""
    return karpathy(tmp_path_factory.mktemp("pairs"))


def itc_overrides(root, out_dir, *extra):
    return [*PAIRS_TINY, f"data.root={root}", "data.text.vocab_size=64", f"train.out_dir={out_dir}", *ITC, *extra]


def itc_trainer(root, out_dir, *extra) -> Trainer:
    trainer = Trainer(load_config([], itc_overrides(root, out_dir, *extra)))
    trainer.encoder_q.train()
    if trainer.encoder_k is not None:
        trainer.encoder_k.train()
    return trainer


def close(a, b, rel=1e-5):
    """a equals b to float32 rounding (relative to b's largest entry)."""
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    return a.shape == b.shape and bool((a - b).abs().max() <= rel * b.abs().max() + 1e-7)


def one_line(e: BaseException) -> str:
    message = str(e.value if hasattr(e, "value") else e)
    assert "\n" not in message.strip(), message
    return message


# ------------------------------------------------------------------------------ the formulas by hand
def test_multi_positive_targets_spread_each_row_over_its_image_in_the_batch_and_the_queue():
    # Batch ids [3, 5]; candidates: the batch's own two, then a queue holding 5, an empty slot
    # (-1) and 3 twice. Row 0 (image 3): columns 0, 4, 5; row 1 (image 5): columns 1, 2.
    targets = multi_positive_targets(torch.tensor([3, 5]), torch.tensor([3, 5, 5, -1, 3, 3]))
    third, half = 1 / 3, 1 / 2
    assert targets.dtype == torch.float32
    assert torch.allclose(targets, torch.tensor([[third, 0, 0, 0, third, third], [0, half, half, 0, 0, 0]]))
    # Unique ids and an empty queue: the identity (CLIP's labels arange(B)).
    assert torch.equal(multi_positive_targets(torch.tensor([0, 7, 2]), torch.tensor([0, 7, 2, -1, -1])),
                       torch.eye(3, 5))


def test_distilled_targets_mix_the_momentum_softmax_into_the_targets():
    log2, log3 = math.log(2), math.log(3)
    momentum_logits = torch.tensor([[0.0, log3, 0.0], [log2, 0.0, log2]])  # softmax: [1, 3, 1]/5, [2, 1, 2]/5
    targets = torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]])
    # 0.4·softmax + 0.6·targets: [0.08 + 0.3, 0.24, 0.08 + 0.3], [0.16, 0.08 + 0.6, 0.16]
    expected = torch.tensor([[0.38, 0.24, 0.38], [0.16, 0.68, 0.16]])
    assert torch.allclose(distilled_targets(momentum_logits, targets, 0.4), expected)
    assert torch.allclose(distilled_targets(momentum_logits, targets, 0.0), targets)
    assert torch.allclose(distilled_targets(momentum_logits, targets, 1.0), torch.tensor([[1, 3, 1], [2, 1, 2]]) / 5)


def test_the_distillation_ramps_in_over_epoch_0_as_albefs_pretrain_does():
    # ALBEF's Pretrain.py: alpha = config['alpha'] * min(1, i / len(data_loader)) in epoch 0, alpha after.
    ramp = [distill_ramp(0.4, torch.tensor(step), 4) for step in range(7)]
    assert all(r.dtype == torch.float32 and r.dim() == 0 for r in ramp)
    assert torch.allclose(torch.stack(ramp), torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 0.4, 0.4]))
    assert float(distill_ramp(0.4, torch.tensor(0), 0)) == pytest.approx(0.4)  # no epoch length: alpha at once


def test_soft_cross_entropy_is_cross_entropy_on_one_hot_targets_and_a_hand_value_on_spread_ones():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 0.3, -2.0], [-1.0, 4.0, 1.0]])
    labels = torch.tensor([0, 2, 1])
    assert close(soft_cross_entropy(logits, F.one_hot(labels, 3).float()), F.cross_entropy(logits, labels))
    # Row 0: log softmax [0, ln 3] = [ln 1/4, ln 3/4], targets [1/2, 1/2]: (ln 4 + ln 4/3)/2 = ln(16/3)/2.
    # Row 1: log softmax [0, 0] = [ln 1/2, ln 1/2], target [1, 0]: ln 2. The batch's mean of the two.
    spread = soft_cross_entropy(torch.tensor([[0.0, math.log(3)], [0.0, 0.0]]), torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    assert spread.dim() == 0 and close(spread, (math.log(16 / 3) / 2 + math.log(2)) / 2)


# ------------------------------------------------------------------------- the queue step, as ALBEF's
class AlbefItc:
    """ALBEF's image–text contrast in ALBEF's own layout (salesforce/ALBEF, models/model_retrieval.py:
    ``ALBEF.forward``'s ``loss_ita``, ``copy_params``, ``_momentum_update``, ``_dequeue_and_enqueue``;
    the clamp of a learned temp is models/model_pretrain.py's ``self.temp.clamp_(0.001, 0.5)``).

    The towers stand for ALBEF's encoders and projections (``image_feat = normalize(vision_proj(...))``):
    deep copies of the engine's, with its optimizer (SGD) re-made over the copy. Two departures,
    both the engine's by design: K need not be a multiple of the batch (the columns wrap modulo K,
    where ALBEF asserts ``queue_size % batch_size == 0``), and the EMA is applied right after the
    optimizer step, where ALBEF's forward applies it first thing in the next step with the same
    online weights (the same update; its first one, on copies, changes nothing).
    """

    def __init__(self, trainer: Trainer):
        parts, optim = trainer.parts, trainer.cfg.optim
        self.model = copy.deepcopy(parts.encoder_q)  # .image, .text, .temp
        self.model_m = copy.deepcopy(parts.encoder_k.encoder)
        queues = parts.negatives
        self.image_queue = queues.image.keys.T.clone()  # (D, K)
        self.text_queue = queues.text.keys.T.clone()  # (D, K)
        self.idx_queue = queues.image.index[None, :].clone()  # (1, K)
        self.queue_ptr = int(queues.image.ptr)
        self.queue_size = queues.image.size
        self.optimizer = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=LR,
                                         momentum=optim.momentum, weight_decay=optim.weight_decay)

    def forward(self, image, text, alpha, idx):
        with torch.no_grad():
            self.model.temp.clamp_(0.001, 0.5)
        temp = self.model.temp
        image_feat = self.model.image(image)
        text_feat = self.model.text(text)

        idx = idx.view(-1, 1)
        idx_all = torch.cat([idx.t(), self.idx_queue.clone().detach()], dim=1)
        pos_idx = torch.eq(idx, idx_all).float()
        sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)

        with torch.no_grad():
            image_feat_m = self.model_m.image(image)
            image_feat_all = torch.cat([image_feat_m.t(), self.image_queue.clone().detach()], dim=1)
            text_feat_m = self.model_m.text(text)
            text_feat_all = torch.cat([text_feat_m.t(), self.text_queue.clone().detach()], dim=1)
            sim_i2t_m = image_feat_m @ text_feat_all / temp
            sim_t2i_m = text_feat_m @ image_feat_all / temp
            sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
            sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets

        sim_i2t = image_feat @ text_feat_all / temp
        sim_t2i = text_feat @ image_feat_all / temp
        loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
        loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
        loss_ita = (loss_i2t + loss_t2i) / 2
        with torch.no_grad():  # the same step without distillation: the test shows that alpha mattered
            plain = -(torch.sum(F.log_softmax(sim_i2t, 1) * sim_targets, 1).mean()
                      + torch.sum(F.log_softmax(sim_t2i, 1) * sim_targets, 1).mean()) / 2
        return loss_ita, loss_i2t, loss_t2i, temp.detach().clone(), pos_idx, plain, image_feat_m, text_feat_m

    def step(self, image, text, idx, alpha, lr, momentum):
        loss_ita, loss_i2t, loss_t2i, temp, pos_idx, plain, image_feat_m, text_feat_m = self.forward(
            image, text, alpha, idx)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad()
        loss_ita.backward()
        self.optimizer.step()
        self._momentum_update(momentum)
        self._dequeue_and_enqueue(image_feat_m, text_feat_m, idx.view(-1, 1))
        return {"loss": loss_ita, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i, "temperature": temp,
                "pos_idx": pos_idx, "plain": plain}

    @torch.no_grad()
    def _momentum_update(self, momentum):
        for param, param_m in zip(self.model.parameters(), self.model_m.parameters()):
            param_m.data = param_m.data * momentum + param.data * (1.0 - momentum)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat, text_feat, idx):
        batch_size = image_feat.shape[0]  # one process: concat_all_gather is the identity
        cols = (self.queue_ptr + torch.arange(batch_size)) % self.queue_size  # ALBEF: ptr:ptr + batch_size
        self.image_queue[:, cols] = image_feat.T
        self.text_queue[:, cols] = text_feat.T
        self.idx_queue[:, cols] = idx.T
        self.queue_ptr = (self.queue_ptr + batch_size) % self.queue_size


def assert_same_grads(trainer: Trainer, ref: AlbefItc):
    """The engine's towers took the reference's gradients, and its queues hold the reference's."""
    engine = dict(trainer.encoder_q.named_parameters())
    for name, p in ref.model.named_parameters():
        assert (p.grad is None) == (engine[name].grad is None), name
        if p.grad is not None:
            assert close(engine[name].grad, p.grad, 1e-4), f"{name}.grad"
    queues = trainer.negatives
    assert close(queues.image.keys, ref.image_queue.T, 1e-4) and close(queues.text.keys, ref.text_queue.T, 1e-4)
    assert torch.equal(queues.image.index, ref.idx_queue[0]) and torch.equal(queues.text.index, ref.idx_queue[0])
    assert int(queues.image.ptr) == int(queues.text.ptr) == ref.queue_ptr


def assert_same_towers(trainer: Trainer, ref: AlbefItc):
    """The towers and the momentum towers (their EMA) are the reference's."""
    for engine, theirs in ((trainer.encoder_q, ref.model), (trainer.encoder_k.encoder, ref.model_m)):
        engine = dict(engine.named_parameters())
        for name, p in theirs.named_parameters():
            assert close(engine[name], p, 1e-4), name


def test_the_queue_step_is_albefs_itc_with_multi_positive_targets_distillation_and_a_learned_temperature(
        tmp_path, pairs_root):
    """Two steps of the engine and of ALBEF's ITC (AlbefItc) from the same towers and queues:
    K = 6 with B = 4 (the second step wraps round the queue), distill_alpha 0.4 ramped over the
    3 steps of epoch 0 (0, then 0.4/3), a learned T. Step 1 is the loader's first batch; step 2
    repeats an image of step 1, now in the queue, and has two views of another (two positives in
    the batch, one in the queue). Each step's loss and gradients, and the queues after it (the
    momentum features and ids enqueued) are compared, then the towers and their EMA. (GroupNorm:
    BatchNorm over 4 near-uniform images amplifies float32 rounding to 1e-3 within a few steps.)"""
    trainer = itc_trainer(pairs_root, tmp_path / "run", "negatives.kind=queue", "queue.size=6", "model.norm=group",
                          "loss.distill_alpha=0.4", "loss.learn_temperature=true", "loss.temperature=0.07")
    parts, queues = trainer.parts, trainer.negatives
    assert parts.steps_per_epoch == 3 and queues.image.size == 6 and trainer.encoder_q.temp.requires_grad
    ref = AlbefItc(trainer)
    batches = iter(trainer.loaders.train)
    (images_1, captions_1), _, ids_1 = next(batches)
    (images_2, _), _, ids_2 = next(batches)
    other_view = images_1[1:2] + 0.1 * torch.randn(images_1[1:2].shape, generator=torch.Generator().manual_seed(0))
    ids = torch.cat([ids_1[:2], ids_1[1:2], ids_2[3:]])  # image 0 and 1 of step 1 (1 twice), a new one
    steps = [(images_1, captions_1, ids_1),
             (torch.cat([images_1[:2], other_view, images_2[3:]]),
              trainer.loaders.source.captions.drawn(trainer.cfg.train.seed, 0, ids), ids)]
    for i, (images, captions, ids) in enumerate(steps):
        alpha = 0.4 * min(1, i / parts.steps_per_epoch)  # ALBEF's Retrieval.py, epoch 0
        out = itc_step(parts, images, captions, ids, LR, MOMENTUM)
        expected = ref.step(images, captions, ids, alpha, LR, MOMENTUM)
        for key in ("loss", "loss_i2t", "loss_t2i", "temperature"):
            assert close(out[key], expected[key]), (i, key, out[key], expected[key])
        assert float(out["distill_alpha"]) == pytest.approx(alpha)
        assert_same_grads(trainer, ref)
        positives = expected["pos_idx"].sum(1).tolist()
        assert positives == [[1.0] * 4, [2.0, 3.0, 3.0, 1.0]][i]  # the queue's positives counted
    assert abs(float(expected["plain"] - expected["loss"].detach())) > 1e-3  # the distillation changed the loss
    assert int(queues.image.ptr) == 2  # 8 entries in K = 6: the last two wrapped to the front
    assert_same_towers(trainer, ref)  # after two SGD steps and two EMA updates
    assert trainer.encoder_q.temp.item() != 0.07  # T learned


# --------------------------------------------------------------------------------------- the clamp
def test_an_empty_queue_start_scores_only_written_slots(tmp_path, pairs_root):
    """queue.start=empty: the first step's logits are the batch's momentum features alone (the
    loss of a queue of K=0), the second step's the batch and the 4 slots written by the first,
    each by hand from the same towers; the random start (ALBEF's) scores all K slots."""
    losses = {}
    for start in ("empty", "random"):
        trainer = itc_trainer(pairs_root, tmp_path / start, "negatives.kind=queue", "queue.size=10", "model.norm=group",
                              f"queue.start={start}")
        parts, queues = trainer.parts, trainer.negatives
        batches = iter(trainer.loaders.train)
        for step in range(2):
            (images, captions), _, ids = next(batches)
            towers, momentum = copy.deepcopy(parts.encoder_q), copy.deepcopy(parts.encoder_k)
            keys_image, keys_text, keys_ids = (t.clone() for t in queues.entries())
            out = itc_step(parts, images, captions, ids, LR, MOMENTUM)
            with torch.no_grad():
                image, text = towers(images, captions)
                image_m, text_m = momentum(images, captions)
                kept = slice(0, 4 * step) if start == "empty" else slice(None)  # the slots written so far
                all_image = torch.cat([image_m, keys_image[kept]])
                all_text = torch.cat([text_m, keys_text[kept]])
                targets = (ids[:, None] == torch.cat([ids, keys_ids[kept]])[None, :]).float()
                targets = targets / targets.sum(1, keepdim=True)
                i2t = -(F.log_softmax(image @ all_text.T / 0.1, 1) * targets).sum(1).mean()
                t2i = -(F.log_softmax(text @ all_image.T / 0.1, 1) * targets).sum(1).mean()
            assert close(out["loss"], (i2t + t2i) / 2), (start, step)
            losses[start, step] = float(out["loss"])
    assert losses["empty", 0] < losses["random", 0]  # 4 columns against 14: the random slots count


@pytest.fixture(scope="module")
def clip_trainer(tmp_path_factory, pairs_root):
    """CLIP's loss (in-batch negatives) with a learned T from 0.07; its tests start from its state as they find it."""
    return itc_trainer(pairs_root, tmp_path_factory.mktemp("clip") / "run", "negatives.kind=in_batch",
                       "loss.learn_temperature=true", "loss.temperature=0.07")


def test_a_learned_temperature_is_clamped_before_the_step_divides_by_it_and_a_fixed_one_never(
        tmp_path, pairs_root, clip_trainer):
    trainer = clip_trainer
    (images, captions), _, ids = next(iter(trainer.loaders.train))
    temp = trainer.encoder_q.temp
    for start, used in ((0.9, 0.5), (1e-5, 0.001)):
        with torch.no_grad():
            temp.fill_(start)
        towers = copy.deepcopy(trainer.encoder_q)
        image, text = towers.image(images), towers.text(captions)
        labels = torch.arange(len(ids))
        loss = (F.cross_entropy(image @ text.T / used, labels) + F.cross_entropy(text @ image.T / used, labels)) / 2
        out = itc_step(trainer.parts, images, captions, ids, LR, MOMENTUM)
        assert float(out["temperature"]) == pytest.approx(used, rel=1e-6)  # the T the step divided by
        assert close(out["loss"], loss)
        assert temp.item() != pytest.approx(start)
    fixed = itc_trainer(pairs_root, tmp_path / "fixed", "negatives.kind=in_batch", "loss.temperature=0.9")
    out = itc_step(fixed.parts, images, captions, ids, LR, MOMENTUM)
    assert float(out["temperature"]) == pytest.approx(0.9) and fixed.encoder_q.temp.item() == pytest.approx(0.9)
    assert not fixed.encoder_q.temp.requires_grad


@pytest.mark.parametrize("temperature", ["0.9", "0.0005"])
def test_a_learned_temperature_must_start_inside_the_clamp(temperature):
    with pytest.raises(ConfigError) as e:
        load_config([], ["method=itc", "data.name=pairs", "loss.learn_temperature=true", f"loss.temperature={temperature}"])
    assert one_line(e) == (f"config key 'loss.temperature' = {temperature}: a learned T starts inside its clamp "
                           "[0.001, 0.5] (loss.learn_temperature=true)")
    load_config([], ["method=itc", "data.name=pairs", f"loss.temperature={temperature}"])  # a fixed T: any


# ------------------------------------------------------------------------------ CLIP's in-batch loss
def clip_loss(towers, images, captions):
    """open_clip's ClipLoss on one process (src/open_clip/loss.py, world_size 1): logit_scale = 1/T,
    labels = arange(N), (CE(logits_per_image) + CE(logits_per_text)) / 2."""
    image_features, text_features = towers.image(images), towers.text(captions)
    logit_scale = 1 / towers.temp
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    labels = torch.arange(logits_per_image.shape[0], dtype=torch.long)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def test_the_in_batch_step_is_open_clips_clip_loss_with_its_gradient(clip_trainer):
    trainer = clip_trainer
    with torch.no_grad():
        trainer.encoder_q.temp.fill_(0.07)  # whatever the clamp's test left
    assert trainer.encoder_k is None  # CLIP's: no momentum towers
    norms = {type(m) for m in trainer.encoder_q.image.modules()}
    assert torch.nn.BatchNorm2d in norms and SplitBatchNorm not in norms  # model.bn_splits (4) ignored, as itc says
    (images, captions), _, ids = next(iter(trainer.loaders.train))
    assert len(set(ids.tolist())) == len(ids)
    towers = copy.deepcopy(trainer.encoder_q)
    loss = clip_loss(towers, images, captions)
    loss.backward()
    out = itc_step(trainer.parts, images, captions, ids, LR, MOMENTUM)
    assert close(out["loss"], loss)
    engine = dict(trainer.encoder_q.named_parameters())
    for name, p in towers.named_parameters():
        assert close(engine[name].grad, p.grad, 1e-4), name
    assert towers.temp.grad.item() != 0.0  # T took its gradient


@pytest.mark.slow  # a launch of 2 processes that import transformers
@pytest.mark.distributed
def test_the_gathered_clip_loss_on_two_processes_is_one_process_on_the_global_batch(tmp_path, pairs_root):
    """Under torchrun (2 ranks, gloo) each rank scores its B images and captions against the
    global batch gathered with gradients (open_clip's gather_with_grad, local_loss): the mean of
    the ranks' losses, and every rank's gradients after DDP's all-reduce, are ClipLoss and its
    gradient on one process given the concatenated global batch of 2B (GroupNorm: no statistics
    shared between samples, so nothing else differs)."""
    from itc_batch_worker import BATCH, global_batch

    overrides = itc_overrides(pairs_root, tmp_path / "run", "negatives.kind=in_batch", "model.norm=group",
                              "loss.learn_temperature=true", "loss.temperature=0.07", "train.device=cpu")
    worker = ROOT / "tests" / "itc_batch_worker.py"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(worker), str(tmp_path), *overrides], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]

    single = itc_trainer(pairs_root, tmp_path / "single", "negatives.kind=in_batch", "model.norm=group",
                         "loss.learn_temperature=true", "loss.temperature=0.07", f"optim.batch_size={2 * BATCH}")
    towers = single.encoder_q
    assert all(torch.equal(rank["before"][k], p) for rank in ranks for k, p in towers.named_parameters())  # one start
    images, captions, _ = global_batch(single, 2)
    loss = clip_loss(towers, images, captions)
    loss.backward()
    assert close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss)  # each rank's: the mean over its own rows
    assert not close(ranks[0]["loss"], ranks[1]["loss"])
    for rank in ranks:
        assert rank["grads"].keys() == {k for k, p in towers.named_parameters() if p.grad is not None}
        for name, p in towers.named_parameters():
            if p.grad is not None:
                assert close(rank["grads"][name], p.grad, 1e-4), name


# -------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kind", ["memory_bank", "momentum_batch"])
def test_itc_refuses_a_memory_bank_and_the_momentum_batch_in_one_line(kind):
    with pytest.raises(ConfigError) as e:
        load_config([], ["method=itc", "data.name=pairs", f"negatives.kind={kind}"])
    assert one_line(e).startswith(f"config key 'negatives.kind' = '{kind}': method=itc ")
    assert "takes negatives.kind=queue (two queues) or in_batch (CLIP's loss)" in str(e.value)


def test_distillation_without_the_queues_momentum_towers_is_refused_in_one_line(tmp_path, pairs_root):
    cfg = load_config([], itc_overrides(pairs_root, tmp_path / "run", "negatives.kind=in_batch",
                                        "loss.distill_alpha=0.4"))
    with pytest.raises(ConfigError) as e:
        Trainer(cfg)
    assert one_line(e) == ("config key 'loss.distill_alpha' = 0.4: momentum distillation needs the momentum towers "
                           "of negatives.kind=queue, not in_batch")


def test_itc_ignores_model_bn_splits_as_it_says():
    """The image tower has no split-BN, so model.bn_splits's rules do not refuse itc's settings."""
    load_config([], ["method=itc", "data.name=pairs", "optim.batch_size=2"])  # bn_splits 4 > B: ignored
    load_config([], ["method=itc", "data.name=pairs", "model.bn=sync"])
    with pytest.raises(ConfigError, match=r"'model.bn_splits' = 4: cannot exceed optim.batch_size \(2\)"):
        load_config([], ["optim.batch_size=2"])  # MoCo's split-BN: refused


def test_the_memory_check_counts_both_queues(tmp_path, pairs_root, monkeypatch):
    """A device with room for one queue of K=4,096 x D=16 but not for two: refused before anything
    is built, in one line naming both queues (the registry's queue would count one)."""
    one_queue = 4096 * 16 * 8 + 4096 * 8  # float32 keys and their float32 start, and the ids
    monkeypatch.setattr("moco_engine.method.step.available_memory", lambda device: int(1.5 * one_queue))
    with pytest.raises(UserError) as refused:
        itc_trainer(pairs_root, tmp_path / "run", "negatives.kind=queue", "queue.size=4096")
    assert one_line(refused).startswith("config key 'queue.size': the image and text queues of K=4096 features of "
                                        "D=16 needs 0.0 GiB")


def test_each_batch_shows_the_captions_its_items_draw_in_its_epoch_from_any_skip(tmp_path, pairs_root):
    """The captions follow the sampler's host order (the device path's indices are never read
    back): each batch's are exactly CaptionTokens.drawn of its own indices, in epochs 0 and 1 and
    after a resume's skip."""
    trainer = itc_trainer(pairs_root, tmp_path / "run", "negatives.kind=in_batch")
    loaders, seed = trainer.loaders, trainer.cfg.train.seed
    for epoch, skip in ((0, 0), (1, 0), (1, 4)):
        loaders.sampler.set_epoch(epoch, skip=skip)
        seen = []
        for (_, captions), _, indices in loaders.train:
            expected = loaders.source.captions.drawn(seed, epoch, indices)
            assert all(torch.equal(captions[k], expected[k]) for k in expected), (epoch, skip)
            seen += indices.tolist()
        order = [i for _, i in loaders.sampler]
        assert seen == order[: len(seen)] and len(seen) >= 8
