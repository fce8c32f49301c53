"""One ``method=itc`` step with in-batch negatives (CLIP's loss) on a fixed global batch, run by
tests/test_itc.py under torchrun: rank r takes items r·B ... r·B + B − 1 of a global batch of
world·B (:func:`global_batch`: seeded images, the source's captions of items 0 ... world·B − 1,
cut to one width), steps once, and saves its loss, its towers' gradients after DDP's all-reduce
and the towers as they started.

    python -m torch.distributed.run --nproc_per_node=2 tests/itc_batch_worker.py OUT_DIR key=value ...
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moco_engine.config.loading import load_config  # noqa: E402
from moco_engine.method.itc import itc_step  # noqa: E402
from moco_engine.run.trainer import Trainer  # noqa: E402
from moco_engine.runtime import distributed as dist  # noqa: E402

BATCH = 4  # B, one rank's batch
LR, MOMENTUM = 0.06, 0.9


def global_batch(trainer: Trainer, world: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """The global batch of world·B items: images (G, 3, S, S) from a fixed seed, the captions the
    source draws for items 0 ... G − 1 in epoch 0 (one width for all), and their ids (G,)."""
    size = trainer.cfg.data.image_size
    images = torch.randn(world * BATCH, 3, size, size, generator=torch.Generator().manual_seed(7))
    ids = torch.arange(world * BATCH)
    captions = trainer.loaders.source.captions.drawn(trainer.cfg.train.seed, 0, ids)
    return images, captions, ids


def main() -> int:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    dist.setup("cpu")
    try:
        trainer = Trainer(load_config([], [*overrides, f"optim.batch_size={BATCH}"]))
        images, captions, ids = global_batch(trainer, dist.world_size())
        mine = slice(BATCH * dist.rank(), BATCH * (dist.rank() + 1))
        towers = trainer.encoder_q.train()
        before = {k: v.detach().clone() for k, v in towers.named_parameters()}
        metrics = itc_step(trainer.parts, images[mine], {k: v[mine] for k, v in captions.items()}, ids[mine], LR,
                           MOMENTUM)
        grads = {k: p.grad.clone() for k, p in towers.named_parameters() if p.grad is not None}
        torch.save({"loss": metrics["loss"], "before": before, "grads": grads}, out / f"rank{dist.rank()}.pt")
    finally:
        dist.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
