"""What a run watches in its own numbers: a loss or a state that is no longer finite (the run
stops, naming the last good checkpoint), steps skipped for it (``train.max_nonfinite_skips``),
and embeddings losing their spread (a warning, once an epoch)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from moco_engine.config.schema import Config
from moco_engine.run import checkpoint as ckpt
from moco_engine.run import snapshot


class NonFiniteLoss(Exception):
    """The loss or the weights became NaN or infinite; nothing from that point on was saved."""


class Watch:
    """The checks of one run (``cfg``, writing to ``run_dir``)."""

    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.collapse_warned = -1  # the epoch of the last collapse warning

    def diverged(self, what: str) -> NonFiniteLoss:
        """The error to raise: ``what`` and the newest checkpoint that verifies and holds finite numbers."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the files passed over are not news here
            try:
                good = ckpt.latest_checkpoint(self.run_dir, accept=snapshot.unusable)
            except ckpt.CheckpointError:
                good = None
        return NonFiniteLoss(f"{what}; " + (f"the last good checkpoint is {good[0]}" if good
                                            else "no good checkpoint was written"))

    def check_loss(self, mean_loss: float, step: int) -> None:
        """A log window's mean loss, checked before any save (NaN weights never overwrite a
        good checkpoint).

        Raises:
            NonFiniteLoss: it is NaN or infinite.
        """
        if not math.isfinite(mean_loss):
            raise self.diverged(f"non-finite loss ({mean_loss}) in the steps up to step {step}")

    def skipped(self, skips: int, loss: float, step: int) -> str:
        """The warning for the ``skips``-th step skipped for its non-finite ``loss``.

        Raises:
            NonFiniteLoss: past ``train.max_nonfinite_skips``.
        """
        limit = self.cfg.train.max_nonfinite_skips
        if skips > limit:
            raise self.diverged(f"non-finite loss ({loss}) at step {step}, after {limit} skipped steps "
                                "(train.max_nonfinite_skips)")
        return f"non-finite loss ({loss}) at step {step}: step skipped ({skips} of at most {limit})"

    def collapse(self, embed_std: float, epoch: int, step: int) -> str | None:
        """A warning (at most one an epoch) when the queries lose their spread: embed_std·sqrt(D)
        below ``track.collapse_threshold``, where 1 is the spread of points uniform on the sphere."""
        spread = embed_std * math.sqrt(self.cfg.model.dim)
        threshold = self.cfg.track.collapse_threshold
        if spread >= threshold or self.collapse_warned == epoch:
            return None
        self.collapse_warned = epoch
        return f"embeddings collapsing at step {step}: embed_std·sqrt(D) = {spread:.3f} < track.collapse_threshold {threshold}"
