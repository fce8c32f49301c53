"""Image–text contrast, ``method=itc``: an image tower and a text tower trained into one space
on image–caption pairs (``data.name=pairs``, or shards with ``.txt`` captions).

Two kinds of negatives, one step:

- ``negatives.kind=queue``: ALBEF's ITC (Li et al. 2021; salesforce/ALBEF). The momentum copies
  of both towers, an image queue and a text queue of K momentum features filled from the gathered
  batch, each entry with its image id (``models/model_pretrain.py``: ``image_queue``,
  ``text_queue``, ``_dequeue_and_enqueue``; the ids are ``models/model_retrieval.py``'s
  ``idx_queue``). Every caption of the same image, in the batch and in the queue, is a positive:
  the target is spread over them (``model_retrieval.py``'s ``pos_idx / pos_idx.sum(1)``). Unlike
  ALBEF, K need not be a multiple of the global batch (the engine's queue wraps), and the queues
  may start empty (``queue.start=empty``: a slot is scored once written) instead of random.
  Momentum distillation (``loss.distill_alpha``, ALBEF's 0.4) softens the targets with the
  momentum towers' own similarities, ramped in over epoch 0 as ALBEF's ``Pretrain.py`` does.
- ``negatives.kind=in_batch``: CLIP's symmetric loss (Radford et al. 2021) as open_clip computes
  it (``src/open_clip/loss.py``, ``ClipLoss`` with ``gather_with_grad``): the global batch's
  features gathered with their gradients, no momentum towers.

One direction's loss is ``soft_cross_entropy(sim / T, targets)``; the step's is the mean of
image→text and text→image (ALBEF's ``loss_ita``, CLIP's ``(CE_i + CE_t) / 2``). The temperature is
fixed (``loss.temperature``) or learned from it (``loss.learn_temperature``) and clamped to
[0.001, 0.5] before each step's forward pass (ALBEF's ``self.temp.clamp_(0.001, 0.5)``).

The step, in order::

    T.clamp_(0.001, 0.5)                                 a learned T only
    v, t = f_q(images, captions)                         (B, D) unit each, with gradients
    queue:    v_m, t_m = f_k(images, captions)           (B, D) momentum features, no gradients
              V = [v_m; image queue], Tx = [t_m; text queue], ids = [idx; id queue]   (B + K, ...)
    in_batch: V, Tx, ids = all_gather(v, t, idx)         (G, ...) with gradients
    targets = multi_positive_targets(idx, ids)            (B, B + K) or (B, G)
    (distillation: alpha·softmax(v_m·Txᵀ / T) + (1 − alpha)·targets, and t_m·Vᵀ's likewise)
    loss = (CE(v·Txᵀ / T, targets_i2t) + CE(t·Vᵀ / T, targets_t2i)) / 2
    backward; optimizer step
    θ_k ← m·θ_k + (1 − m)·θ_q                            both towers, one fused op
    image queue ← all_gather(v_m); text queue ← all_gather(t_m); id queue ← all_gather(idx)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moco_engine.config.schema import Config, ConfigError
from moco_engine.method.encoders import Encoder, build_encoder
from moco_engine.method.losses import (
    distill_ramp,
    distilled_targets,
    multi_positive_targets,
    soft_cross_entropy,
)
from moco_engine.method.negatives import STORAGE_DTYPES, InBatch, NegativeSource, Queue, queue_bytes
from moco_engine.method.step import (
    BufferGuard,
    Skipped,
    StepParts,
    begin,
    optimize,
    register_method,
    set_lr,
)
from moco_engine.runtime import distributed as dist
from moco_engine.runtime.precision import autocast

#: ALBEF's clamp of a learned temperature (models/model_pretrain.py).
TEMPERATURE_RANGE = (0.001, 0.5)


class TwoTowers(nn.Module):
    """f_q of image–text contrast: an image tower, a text tower and the temperature.

    Attributes:
        image: ``model``'s encoder, images (B, 3, S, S) -> (B, D) unit vectors.
        text: ``text_model``'s encoder, captions {"input_ids", "attention_mask"} (B, W) -> (B, D) unit.
        temp: T, a 0-d parameter (trained only with ``loss.learn_temperature``). The momentum copy
            of the towers carries one too, moved by the EMA and never read: ALBEF's momentum
            model has none, and its distillation divides by the online T, as this step does.
        locked: per tower, whether its backbone is frozen (LiT): no gradients, and kept in eval
            mode, so a locked ResNet's BatchNorm statistics stay the pretrained ones.
    """

    def __init__(self, image: Encoder, text: Encoder, temperature: float, learn_temperature: bool,
                 locked: tuple[bool, bool] = (False, False)):
        super().__init__()
        self.image, self.text = image, text
        self.temp = nn.Parameter(torch.tensor(float(temperature)), requires_grad=learn_temperature)
        self.locked = locked
        for tower, frozen in zip((image, text), locked):
            if frozen:
                tower.backbone.requires_grad_(False)

    @property
    def backbone(self) -> nn.Module:
        """The image tower's backbone: what ``model.init_from`` loads and the image exports write."""
        return self.image.backbone

    @property
    def normalize(self) -> bool:
        return self.image.normalize

    def forward(self, images: Tensor, captions: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(images (B, 3, S, S), captions (B, W) token ids and mask) -> (image (B, D), text (B, D))."""
        return self.image(images), self.text(captions)

    def train(self, mode: bool = True) -> TwoTowers:
        super().train(mode)
        for tower, frozen in zip((self.image, self.text), self.locked):
            if frozen:
                tower.backbone.eval()
        return self


class ItcQueues(NegativeSource):
    """ALBEF's three queues, each any K: the momentum image features, the momentum text
    features, and the image id of every entry (``index`` of either queue; -1 at the start, as
    ALBEF's -100: no item's id). They start as random unit vectors, as ALBEF's do, or empty
    (``queue.start=empty``: a slot is scored once written), and are identical on every rank
    (filled from the gathered batch).

    Buffers (persistent): ``image.*`` and ``text.*`` (:class:`~moco_engine.method.negatives.Queue`'s),
    ``steps`` () int64: the steps taken, the distillation's ramp (a skipped step counts: its
    batch is used up).

    Attributes:
        alpha: the momentum distillation's weight once ramped in (``loss.distill_alpha``; 0: off).
        empty_start: unwritten slots score no logit. From scratch the random start is a trap: every
            real feature beats a random vector, so the towers gain by giving all inputs the one
            direction the others share, and collapse (RESULTS.md, "Image-text contrast on Flickr8k").
    """

    stored = True

    def __init__(self, size: int, dim: int, dtype: str = "float32", alpha: float = 0.0, empty_start: bool = False):
        super().__init__()
        self.alpha, self.empty_start = alpha, empty_start
        self.image = Queue(size, dim, False, dtype)
        self.text = Queue(size, dim, False, dtype)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def entries(self) -> tuple[Tensor, Tensor, Tensor]:
        """The queues as they are: image (K, D), text (K, D), ids (K,) (never changed later: the
        queues write out of place)."""
        return self.image.keys, self.text.keys, self.image.index

    def unscored(self, batch: int) -> Tensor | None:
        """(B + K,) bool: the columns of [batch; queue] that score no logit (the unwritten slots
        with ``empty_start``), or None."""
        if not self.empty_start:
            return None
        return torch.cat([torch.zeros(batch, dtype=torch.bool, device=self.image.index.device), self.image.index < 0])

    @torch.no_grad()
    def enqueue(self, image: Tensor, text: Tensor, ids: Tensor) -> None:
        """Take in the gathered momentum features (G, D) each and their image ids (G,)."""
        self.image.update(image, ids)
        self.text.update(text, ids)

    def metrics(self, indices: Tensor) -> dict[str, Tensor]:
        """The image queue's fill and age, and the share of the batch whose image is in the queue."""
        found = self.image.metrics(indices)
        return {"queue_fill": found["queue_fill"], "queue_age_mean": found["queue_age_mean"],
                "queue_same_image": found["queue_same_instance"]}


def build_two_towers(cfg: Config, input_shape: Any) -> TwoTowers:
    """The two towers for pairs whose views have ``input_shape`` = {"image": (3, S, S), "text":
    the token views' shapes}: ``model`` the image tower, ``text_model`` the text tower, both to
    ``model.dim``.

    Raises:
        ConfigError: inputs that are not pairs; a setting this method cannot train with (named).
    """
    if not isinstance(input_shape, dict) or set(input_shape) != {"image", "text"}:
        raise ConfigError(f"config key 'method' = {cfg.method!r}: it trains on image-caption pairs (data.name=pairs, or shards with captions); "
                          f"data.name={cfg.data.name} gives items of shape {input_shape}")
    for key in ("train.compile", "train.cuda_graphs"):
        if getattr(cfg.train, key.split(".")[1]):
            raise ConfigError(f"config key '{key}' = true: method={cfg.method} runs its two towers uncompiled "
                              "(its warm-up compiles one tower's forward pass); set it to false")
    if cfg.loss.distill_alpha > 0 and cfg.negatives.kind != "queue":
        raise ConfigError(f"config key 'loss.distill_alpha' = {cfg.loss.distill_alpha}: momentum distillation needs "
                          f"the momentum towers of negatives.kind=queue, not {cfg.negatives.kind}")
    # Plain BatchNorm in the image tower: the method ignores model.bn_splits (split-BN is MoCo's
    # stand-in for shuffle-BN's per-GPU statistics; no key batch is shuffled here).
    image = build_encoder(type(cfg.model)(**{**vars(cfg.model), "bn_splits": 1}), input_shape["image"])
    text_cfg = cfg.text_model
    text_cfg = type(text_cfg)(**{**vars(text_cfg), "dim": cfg.model.dim, "normalize": True, "bn_splits": 1})
    text = build_encoder(text_cfg, input_shape["text"])
    return TwoTowers(image, text, cfg.loss.temperature, cfg.loss.learn_temperature,
                     (cfg.model.locked, cfg.text_model.locked))


def build_itc_negatives(cfg: Config, num_items: int) -> NegativeSource:
    """``negatives.kind=queue``: :class:`ItcQueues` of K = ``queue.size``; ``in_batch``: the global
    batch, end to end (CLIP's)."""
    if cfg.negatives.kind == "in_batch":
        return InBatch()
    if cfg.queue.dtype not in STORAGE_DTYPES:
        raise ConfigError(f"config key 'queue.dtype' = {cfg.queue.dtype!r}: must be one of {', '.join(STORAGE_DTYPES)}")
    return ItcQueues(cfg.queue.size, cfg.model.dim, cfg.queue.dtype, cfg.loss.distill_alpha, cfg.queue.start == "empty")


def planned_queues(cfg: Config, num_items: int) -> tuple[str, str, int]:
    """The two queues' buffers (each a ``queue_bytes``), or none in-batch."""
    if cfg.negatives.kind != "queue":
        return "negatives.kind", "no stored negatives", 0
    key, what, needed = queue_bytes(cfg, num_items)
    return key, f"the image and text queues of K={cfg.queue.size} features of D={cfg.model.dim}", 2 * needed


REFUSED = "scores images against captions: it takes negatives.kind=queue (two queues) or in_batch (CLIP's loss)"


@register_method("itc", encoder=build_two_towers, source=build_itc_negatives, pairs=True, planned=planned_queues,
                 # text_model's: D, unit outputs and the EMA are model's; only model.init_from is read.
                 ignores=("loss.name", "loss.symmetric", "queue.mask_same_instance", "model.bn_splits",
                          "text_model.dim", "text_model.normalize", "text_model.momentum",
                          "text_model.momentum_schedule", "text_model.bn_splits", "text_model.init_from"),
                 refuses={"memory_bank": REFUSED, "momentum_batch": REFUSED})
def itc_step(parts: StepParts, images: Tensor, captions: dict[str, Tensor], indices: Tensor, lr: float,
             momentum: float) -> dict[str, Tensor] | Skipped:
    """One image–text step on images (B, 3, S, S) and one caption each (B, W) of the items
    (images) ``indices`` (B,), at learning rate ``lr`` and EMA momentum ``momentum``."""
    begin(parts)
    set_lr(parts.optimizer, lr)
    towers: TwoTowers = parts.encoder_q
    queues = parts.negatives if isinstance(parts.negatives, ItcQueues) else None
    alpha, source_metrics = None, {}  # the distillation's weight this step, (): only with it on
    if queues is not None:
        source_metrics = queues.metrics(indices)  # the queues before this batch
        if queues.alpha > 0:
            alpha = distill_ramp(queues.alpha, queues.steps, parts.steps_per_epoch)
        queues.steps += 1
    if towers.temp.requires_grad:
        with torch.no_grad():
            towers.temp.clamp_(*TEMPERATURE_RANGE)
    guard = BufferGuard(parts) if parts.check_finite else None
    with autocast(parts.device, parts.amp_dtype):
        image, text = parts.model_q(images, captions)  # (B, D) unit each, with gradients
        if queues is not None:
            with torch.no_grad():
                image_m, text_m = parts.encoder_k(images, captions)  # (B, D) momentum features
    image, text = image.float(), text.float()
    temp = towers.temp
    if queues is not None:
        queue_image, queue_text, queue_ids = queues.entries()
        all_image = torch.cat([image_m.float(), queue_image.float()])  # (B + K, D)
        all_text = torch.cat([text_m.float(), queue_text.float()])
        ids = torch.cat([indices, queue_ids])  # (B + K,)
        unscored = queues.unscored(len(indices))
    else:
        unscored = None
        all_image, all_text = dist.all_gather_with_grad(image), dist.all_gather_with_grad(text)  # (G, D)
        ids = dist.all_gather_cat(indices, same_size=True)  # equal batches on every rank (EpochSampler)
    targets = multi_positive_targets(indices, ids)  # (B, C)
    targets_i2t = targets_t2i = targets

    def scored(sim: Tensor) -> Tensor:  # an unwritten slot's logit is -inf (queue.start=empty)
        return sim if unscored is None else sim.masked_fill(unscored, float("-inf"))

    if alpha is not None:
        with torch.no_grad():
            targets_i2t = distilled_targets(scored(image_m.float() @ all_text.T / temp), targets, alpha)
            targets_t2i = distilled_targets(scored(text_m.float() @ all_image.T / temp), targets, alpha)
    sim_i2t = scored(image @ all_text.T / temp)  # (B, C)
    sim_t2i = scored(text @ all_image.T / temp)
    loss_i2t = soft_cross_entropy(sim_i2t, targets_i2t)
    loss_t2i = soft_cross_entropy(sim_t2i, targets_t2i)
    loss = (loss_i2t + loss_t2i) / 2

    if guard is not None and not guard.finite(loss):
        return Skipped(loss.detach())
    used = temp.detach().clone()  # the T this step divided by (the optimizer step moves a learned one)
    optimize(parts, loss)

    # State changes, after the optimizer step.
    if queues is not None:
        parts.encoder_k.update(parts.encoder_q, momentum)  # θ_k ← m·θ_k + (1 − m)·θ_q, both towers
        # Equal shares on every rank (EpochSampler): every step's batch is the same size everywhere.
        queues.enqueue(dist.all_gather_cat(image_m.detach().float(), same_size=True),
                       dist.all_gather_cat(text_m.detach().float(), same_size=True),
                       dist.all_gather_cat(indices, same_size=True))
    with torch.no_grad():
        hit = targets.gather(1, sim_i2t.argmax(1, keepdim=True)).squeeze(1) > 0  # the top caption is a positive
        return {"loss": loss.detach(), "loss_i2t": loss_i2t.detach(), "loss_t2i": loss_t2i.detach(),
                "temperature": used, "top1": hit.float().mean() * 100, "distill_alpha": torch.zeros((), device=parts.device) if alpha is None else alpha,
                "embed_std": image.std(dim=0).mean(), "text_embed_std": text.std(dim=0).mean(),
                **source_metrics}
