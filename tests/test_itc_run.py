"""method=itc as a run (issue 42's image–text stage): stopped mid-epoch and resumed bit-identical,
in one process and under torchrun; bad input one line; the figures W&B gets; the settings the
methods ignore; LiT (a locked image backbone, started from a MoCo run of this engine)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY
from test_pairs import PAIRS_TINY, karpathy

from moco_engine.config.loading import load_config
from moco_engine.config.rules import ignored_warning
from moco_engine.config.schema import UserError
from moco_engine.run.checkpoint import latest_checkpoint
from moco_engine.run.signals import StopRequested
from moco_engine.run.trainer import Trainer

# PAIRS_TINY as two small towers: 16 px images, a 1-layer 32-wide BERT, batch 4 (3 steps an epoch of
# the 20 training images), AdamW, so the learned T moves a little each step and stays inside its clamp.
ITC = [*PAIRS_TINY, "method=itc", "data.text.vocab_size=64", "data.image_size=16", "optim.batch_size=4",
       "optim.name=adamw", "optim.lr=0.001", "text_model.params.layers=1", "text_model.params.hidden=32",
       "text_model.params.heads=2", "text_model.params.intermediate=64", "loss.learn_temperature=true",
       "loss.temperature=0.1", "eval.knn_every=0", "eval.retrieval_split=val"]
# ALBEF's negatives with K = 10, no multiple of the batch (the queue wraps mid-batch), and momentum
# distillation, which ramps in over epoch 0's 3 steps.
QUEUE = ["negatives.kind=queue", "queue.size=10", "loss.distill_alpha=0.4"]
KINDS = {"queue": QUEUE, "in_batch": ["negatives.kind=in_batch"]}
#: Everything a checkpoint holds that a resumed run must reproduce exactly.
SECTIONS = ("encoder_q", "encoder_k", "negatives", "optimizer", "scaler", "ranks", "tokenizer")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return karpathy(tmp_path_factory.mktemp("pairs"))


def itc_cfg(out, root, *extra):
    return load_config([], [*ITC, f"data.root={root}", f"train.out_dir={out}", *extra])


def leaves(state):
    return torch.utils._pytree.tree_leaves(state)


def assert_same_state(a: dict, b: dict) -> None:
    for section in SECTIONS:
        x, y = leaves(a[section]), leaves(b[section])
        assert len(x) == len(y), section
        for u, v in zip(x, y):
            assert (torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v), section


def recording(trainer: Trainer, draws: list) -> Trainer:
    """Record each step's items and the captions drawn for them (the token ids the text tower saw)."""
    step = trainer.train_step

    def recorded(images, captions, indices):
        draws.append((indices.tolist(), captions["input_ids"].tolist()))
        return step(images, captions, indices)

    trainer.train_step = recorded
    return trainer


# ---------------------------------------------------------------------------------------------- exact
def test_the_image_tower_has_plain_batchnorm_as_the_ignored_bn_splits_says(tmp_path, root):
    cfg = itc_cfg(tmp_path, root, "model.bn_splits=2")
    assert ignored_warning(cfg) == "warning: method=itc ignores model.bn_splits=2"
    norms = {type(m).__name__ for m in Trainer(cfg).encoder_q.image.modules() if "Norm" in type(m).__name__}
    assert norms == {"BatchNorm2d"}  # not SplitBatchNorm: the setting is ignored, as the warning says
