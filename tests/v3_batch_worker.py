"""One MoCo v3 step on fixed batches, run by tests/test_moco_v3.py twice: under torchrun, rank r
given its own B items (plain BatchNorm: each rank's statistics its own), and in one process
given both ranks' items as one batch of 2B with split-BN over 2 slices (each slice's statistics
its own: the ranks'). Every per-sample output is then the same in both, so the step's gathering
of keys, its labels offset by rank and DDP's averaging of gradients are what the two compare.

    python -m torch.distributed.run --nproc_per_node=2 tests/v3_batch_worker.py OUT_DIR key=value ...
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moco_engine.config.loading import load_config  # noqa: E402
from moco_engine.run.trainer import Trainer  # noqa: E402
from moco_engine.runtime import distributed as dist  # noqa: E402

BATCH = 8  # B, one rank's batch


def one_step(overrides: list[str], ranks: list[int]) -> dict:
    """A Trainer of ``overrides`` at batch len(ranks)·B; one step on the items of ``ranks``, in
    rank order (rank r: B fixed random items, indices r·B ...). Returns the loss and f_q's and the
    predictor's parameters before and after the step."""
    trainer = Trainer(load_config([], [*overrides, f"optim.batch_size={BATCH * len(ranks)}"]))
    views = [[torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(100 * r + v)) for r in ranks]
             for v in (1, 2)]
    indices = torch.cat([torch.arange(BATCH) + BATCH * r for r in ranks])

    def parameters() -> dict:  # f_q and its predictor, under DDP's "module." too
        return {k.removeprefix("module."): v.detach().clone() for k, v in trainer.parts.model_q.named_parameters()}

    before = parameters()
    out = trainer.train_step(torch.cat(views[0]), torch.cat(views[1]), indices)
    return {"loss": out["loss"].detach(), "before": before, "after": parameters()}


def main() -> int:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    dist.setup("cpu")
    try:
        torch.save(one_step(overrides, [dist.rank()]), out / f"rank{dist.rank()}.pt")
    finally:
        dist.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
