"""How far a run has come: the Trainer's own counters, as one object a checkpoint keeps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Progress:
    """The run's counters (a checkpoint holds them as top-level keys of its snapshot).

    Attributes:
        epoch: epochs completed.
        step: optimizer steps taken (a skipped non-finite step counts: its batch is used up).
        step_in_epoch: steps taken in the current epoch (where a resume goes on).
        last_eval: the last monitor result.
        best_eval: each monitor figure's best over the whole run, resumes included.
        wandb_run_id: the W&B run a resume continues (None: none started).
        nonfinite_skips: steps skipped for a NaN/inf loss (``train.max_nonfinite_skips``).
        eval_pending: an epoch's evaluation was due and not finished (a resume runs it first).
    """

    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)
    best_eval: dict[str, float] = field(default_factory=dict)
    wandb_run_id: str | None = None
    nonfinite_skips: int = 0
    eval_pending: bool = False

    def state_dict(self) -> dict[str, Any]:
        """The counters as a snapshot's entries (copies: later changes do not reach them)."""
        return {"epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch,
                "last_eval": dict(self.last_eval), "best_eval": dict(self.best_eval), "wandb_run_id": self.wandb_run_id,
                "nonfinite_skips": self.nonfinite_skips, "eval_pending": self.eval_pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The counters of a snapshot; one written before a counter existed gives that counter's start."""
        self.epoch, self.step = state.get("epoch", 0), state.get("step", 0)
        self.step_in_epoch = state.get("step_in_epoch", 0)
        self.last_eval, self.best_eval = dict(state.get("last_eval", {})), dict(state.get("best_eval", {}))
        self.wandb_run_id = state.get("wandb_run_id")
        self.nonfinite_skips = state.get("nonfinite_skips", 0)
        self.eval_pending = state.get("eval_pending", False)
